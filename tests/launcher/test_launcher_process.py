"""``tgi-npu-launcher`` as a process over FAKE shards (``fake_shard.py`` posing as
``text-generation-server`` on PATH): command lines, env, readiness, teardown, exit codes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import requests
from processes import fake_server_bin, launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fake_bin():
    return fake_server_bin()


def test_two_fake_shards_serve_then_sigterm_exits_zero(bloom_dir, fake_bin):
    record = tempfile.mkdtemp(prefix="rec")
    run = launch(
        bloom_dir,
        "--num-shard",
        "2",
        "--max-input-tokens",
        "32",
        "--max-total-tokens",
        "64",
        "--max-batch-prefill-tokens",
        "64",
        env={"FAKE_SHARD_RECORD": record, "LOG_LEVEL": "info"},
        path_prefix=fake_bin,
    )
    try:
        run.wait_ready(60)
        r = requests.post(
            run.url + "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}}
        )
        assert r.status_code == 200 and "generated_text" in r.json()
    finally:
        code = run.stop()
    assert code == 0, run.output()
    out = run.output()
    assert "fake shard 1 loading" in out  # shard JSON log lines are re-emitted
    calls = {p.name: json.loads(p.read_text()) for p in Path(record).iterdir()}
    assert set(calls) == {"download-weights-x.json", "serve-0.json", "serve-1.json"}
    assert calls["download-weights-x.json"]["argv"] == [
        "download-weights",
        str(bloom_dir),
        "--extension",
        ".safetensors",
        "--logger-level",
        "INFO",
        "--json-output",
        "--merge-lora",
    ]
    serve = calls["serve-1.json"]
    argv = serve["argv"]
    assert (
        argv[:2] == ["serve", str(bloom_dir)]
        and "--sharded" in argv
        and argv[-2:] == ["--max-input-tokens", "32"]
    )
    uds = argv[argv.index("--uds-path") + 1]
    assert not os.path.exists(f"{uds}-0") and not os.path.exists(f"{uds}-1")
    env = serve["env"]
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("1", "2", "localhost")
    assert (
        env["MAX_TOTAL_TOKENS"] == "64" and "LOG_LEVEL" not in env and env["PREFIX_CACHING"] == "0"
    )


def test_shard_crash_during_startup_exits_nonzero_with_its_stderr(bloom_dir, fake_bin):
    run = launch(bloom_dir, env={"FAKE_SHARD_CRASH_AFTER": "0.2"}, path_prefix=fake_bin)
    assert run.process.wait(60) == 1
    out = run.output()
    assert "Shard 0 exited with code 3" in out and "simulated CUDA error" in out


def test_shard_crash_while_serving_tears_down(bloom_dir, fake_bin):
    run_dir = tempfile.mkdtemp(prefix="crash")
    run = launch(
        bloom_dir,
        "--num-shard",
        "2",
        "--max-input-tokens",
        "32",
        "--max-total-tokens",
        "64",
        "--max-batch-prefill-tokens",
        "64",
        env={"FAKE_SHARD_CRASH_FILE": f"{run_dir}/crash"},
        path_prefix=fake_bin,
    )
    run.wait_ready(60)
    Path(f"{run_dir}/crash").touch()
    assert run.process.wait(60) == 1
    out = run.output()
    assert "simulated crash while serving" in out and "Shards stopped" in out


def test_download_failure_aborts(bloom_dir, fake_bin):
    run = launch(bloom_dir, env={"FAKE_SHARD_DOWNLOAD_FAIL": "1"}, path_prefix=fake_bin)
    assert run.process.wait(60) == 1
    assert "fake download failed: no such model" in run.output()
