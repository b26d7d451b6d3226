"""Start ``tgi-npu-launcher`` as a subprocess (real or fake shards) and wait for it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_server_bin() -> str:
    """A directory holding a ``text-generation-server`` that runs ``fake_shard.py``."""
    d = tempfile.mkdtemp(prefix="fkbin")
    script = Path(d) / "text-generation-server"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "fake_shard.py"}" "$@"\n')
    script.chmod(0o755)
    return d


@dataclass
class Launched:
    process: subprocess.Popen
    url: str
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"launcher exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"launcher not ready after {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def launch(
    model_dir, *extra: str, env: dict[str, str] | None = None, path_prefix: str | None = None
) -> Launched:
    port = free_port()
    uds = tempfile.mkdtemp(prefix="uds") + "/s"
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("TGI_NPU_KV_CACHE_FRACTION", "0.02")
    if path_prefix:
        full_env["PATH"] = path_prefix + os.pathsep + full_env["PATH"]
    log_path = Path(tempfile.mkstemp(prefix="launcher", suffix=".log")[1])
    cmd = [
        sys.executable,
        "-m",
        "tgi_npu_backend.launcher",
        "--model-id",
        str(model_dir),
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--shard-uds-path",
        uds,
        "--master-port",
        str(free_port()),
        *extra,
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    return Launched(process, f"http://127.0.0.1:{port}", log_path)
