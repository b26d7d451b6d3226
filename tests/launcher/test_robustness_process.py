"""``tgi-npu-launcher`` with the REAL shard, as a process: API_KEY from the environment, huge
truncated prompts that must not stall others, bad requests batched with good ones, and SIGTERM
draining a request in flight."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import pytest
import requests
from processes import launch

pytestmark = pytest.mark.slow

if shutil.which("text-generation-server") is None:
    pytest.skip("text-generation-server is not installed", allow_module_level=True)

FLAGS = ("--max-input-tokens", "64", "--max-total-tokens", "128",
         "--max-batch-prefill-tokens", "256", "--payload-limit", "10000000",
         "--graceful-termination-timeout", "30")
AUTH = {"Authorization": "Bearer s3cret"}


def timed(url: str, body: dict) -> tuple[float, requests.Response]:
    t = time.monotonic()
    resp = requests.post(url + "/generate", json=body, headers=AUTH, timeout=120)
    return time.monotonic() - t, resp


def test_api_key_huge_prompts_bad_neighbours_and_sigterm_drain(bloom_dir):
    run = launch(bloom_dir, *FLAGS, env={"API_KEY": "s3cret"})
    try:
        run.wait_ready(120)
        url = run.url
        small = {"inputs": "Hello there", "parameters": {"max_new_tokens": 8}}
        assert requests.post(url + "/generate", json=small, timeout=60).status_code == 401
        assert requests.get(url + "/metrics", timeout=60).status_code == 200
        timed(url, small)  # warm the path
        base = min(timed(url, small)[0] for _ in range(3))

        # Four ~2 MB prompts with truncate=10 while a small request runs (the issue: 0.16 s -> 22 s)
        huge = ("The quick brown fox jumps over the lazy dog. " * 50_000)[:2_000_000]
        results = {}

        def send_huge(i: int) -> None:
            results[i] = timed(url, {"inputs": huge, "parameters": {"max_new_tokens": 4,
                                                                     "truncate": 10}})

        threads = [threading.Thread(target=send_huge, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        latency, resp = timed(url, small)
        for t in threads:
            t.join(120)
        assert resp.status_code == 200
        assert all(r.status_code == 200 for _, r in results.values())
        print(f"8-token request: {base:.2f}s alone, {latency:.2f}s beside four 2 MB prompts")
        # NOTE: a loose bound (speed is measured by benchmarks/soak.py, not by tests): it catches
        # the defect (22 s) but not the noise of a shared 2-core machine (seen: 0.29 s and 1.9 s)
        assert latency < base + 8, f"{latency:.2f}s with the huge prompts, {base:.2f}s alone"

        # a bad request among good ones fails alone (NaN is refused before it reaches a batch)
        bad = b'{"inputs": "x", "parameters": {"temperature": NaN}}'
        outs = {}

        def good(i: int) -> None:
            outs[i] = timed(url, small)[1].status_code

        threads = [threading.Thread(target=good, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        r = requests.post(url + "/generate", data=bad, timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
        for t in threads:
            t.join(60)
        assert r.status_code == 400 and "NaN" in r.json()["error"]
        assert outs == {0: 200, 1: 200, 2: 200}

        # SIGTERM while a stream runs: it finishes, then the launcher exits 0
        tokens = []
        first = threading.Event()

        def stream() -> None:
            body = {"inputs": "Once upon a time",
                    "parameters": {"max_new_tokens": 100, "details": True}}
            with requests.post(url + "/generate_stream", json=body, headers=AUTH, stream=True,
                               timeout=120) as resp:
                for line in resp.iter_lines():
                    if line.startswith(b"data:"):
                        tokens.append(json.loads(line[5:]))
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60)
        run.process.send_signal(signal.SIGTERM)
        reader.join(120)
        assert tokens[-1]["details"]["finish_reason"] in ("length", "eos_token"), tokens[-1]
        assert tokens[-1]["generated_text"] is not None
        assert run.process.wait(60) == 0
        assert "Draining 1 in-flight request" in run.output()
    finally:
        run.stop()
