"""Bounded loopback load benchmark for tgi-npu-launcher (a script, not a test).

Streams ``/generate_stream`` requests at 1, 8 and 32 concurrent clients and prints requests/s,
generated tokens/s, time-to-first-token and inter-token-latency percentiles, and - from the
router's Prometheus counters - how each decode step's wall time splits between the shard's
forward pass, the shard's post-processing, and everything outside the shard (gRPC + router).

    python benchmarks/load.py                       # writes a tiny random BLOOM and launches it
    python benchmarks/load.py --model-id DIR        # launches tgi-npu-launcher on DIR
    python benchmarks/load.py --url http://127.0.0.1:3000   # an already running server

Traffic goes to 127.0.0.1 only; every level is bounded by --requests and --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pour déguster un ortolan, il faut tout d'abord",
    "def add(a, b):\n    return a + b",
    "Text generation inference serves large language models",
]


@dataclass
class Sample:
    ttft: float
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: bool = True


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def one_request(
    session: aiohttp.ClientSession, url: str, prompt: str, max_new_tokens: int
) -> Sample:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}
    start = time.perf_counter()
    last = None
    sample = Sample(ttft=float("nan"))
    async with session.post(url + "/generate_stream", json=body) as resp:
        if resp.status != 200:
            return Sample(ttft=float("nan"), ok=False)
        async for raw in resp.content:
            if not raw.startswith(b"data:"):
                continue
            now = time.perf_counter()
            event = json.loads(raw[5:])
            if "error" in event:
                sample.ok = False
                break
            if last is None:
                sample.ttft = now - start
            else:
                sample.itl.append(now - last)
            last = now
            sample.tokens += 1
    return sample


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for name in (
        "tgi_batch_inference_duration",
        "tgi_batch_forward_duration",
        "tgi_batch_decode_duration",
    ):
        for stat in ("sum", "count"):
            m = re.search(rf'^{name}_{stat}{{method="decode"}} (\S+)$', text, re.MULTILINE)
            out[f"{name}_{stat}"] = float(m.group(1)) if m else 0.0
    return out


async def level(
    url: str, concurrency: int, requests: int, max_seconds: float, max_new_tokens: int
) -> None:
    timeout = aiohttp.ClientTimeout(total=max_seconds + 60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await one_request(session, url, PROMPTS[0], 2)  # warm the path
        before = await scrape(session, url)
        samples: list[Sample] = []
        issued = 0
        deadline = time.perf_counter() + max_seconds

        async def worker(w: int) -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                i = issued
                issued += 1
                samples.append(
                    await one_request(session, url, PROMPTS[i % len(PROMPTS)], max_new_tokens)
                )

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - start
        after = await scrape(session, url)
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft for s in ok]
    itl = [x for s in ok for x in s.itl]
    tokens = sum(s.tokens for s in ok)
    print(f"\n== {concurrency} concurrent clients: {len(ok)}/{len(samples)} ok in {wall:.2f}s ==")
    print(f"  requests/s {len(ok) / wall:8.2f}   generated tokens/s {tokens / wall:9.1f}")
    print(
        "  TTFT  ms  p50 {:7.1f}  p90 {:7.1f}  p99 {:7.1f}".format(
            *(1000 * pct(ttft, q) for q in (50, 90, 99))
        )
    )
    print(
        "  ITL   ms  p50 {:7.1f}  p90 {:7.1f}  p99 {:7.1f}".format(
            *(1000 * pct(itl, q) for q in (50, 90, 99))
        )
    )
    d = {k: after[k] - before[k] for k in after}
    steps = d["tgi_batch_inference_duration_count"]
    wall_step = d["tgi_batch_inference_duration_sum"]
    if steps and wall_step > 0:
        fwd = d["tgi_batch_forward_duration_sum"] / wall_step
        post = d["tgi_batch_decode_duration_sum"] / wall_step
        print(
            f"  decode steps {int(steps)}: mean {1000 * wall_step / steps:.2f} ms; forward {100 * fwd:.1f}%, "
            f"shard post-processing {100 * post:.1f}%, outside the shard's forward {100 * (1 - fwd):.1f}% "
            f"(gRPC + router {100 * (1 - fwd - post):.1f}%)"
        )
    if itl:
        print(f"  mean ITL {1000 * statistics.mean(itl):.2f} ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_launcher(model_id: str, extra: list[str], name: str = "bench") -> tuple[subprocess.Popen, str]:
    """``tgi-npu-launcher`` on ``model_id`` at a free loopback port, its log in a temporary file
    named after ``name``; returns the process and its URL."""
    port = free_port()
    uds = tempfile.mkdtemp(prefix=name, dir="/tmp") + "/s"
    env = {**os.environ}
    env.setdefault("TGI_NPU_KV_CACHE_FRACTION", "0.05")
    cmd = [
        sys.executable,
        "-m",
        "tgi_npu_backend.launcher",
        "--model-id",
        model_id,
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
    log_path = tempfile.mkstemp(prefix=f"{name}-launcher", suffix=".log")[1]
    print(f"starting: {' '.join(cmd)}  (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"launcher exited with {proc.returncode}")
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise SystemExit(f"{url} not ready after {timeout}s")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="an already running server on 127.0.0.1")
    p.add_argument(
        "--model-id", help="launch tgi-npu-launcher on this model (default: a tiny random BLOOM)"
    )
    p.add_argument("--arch", choices=["bloom", "gemma"], default="bloom")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=64, help="requests per level (bounded)")
    p.add_argument(
        "--max-seconds", type=float, default=60.0, help="per level; no new requests after it"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("launcher_args", nargs="*", help="extra tgi-npu-launcher flags (after --)")
    args = p.parse_args()

    proc = None
    url = args.url
    if url is None:
        model_id = args.model_id
        if model_id is None:
            from tgi_npu_backend.demo import write_checkpoint

            model_id = str(write_checkpoint(tempfile.mkdtemp(prefix="bench-model"), args.arch))
            print(f"wrote a tiny RANDOM-WEIGHT {args.arch} checkpoint to {model_id}")
        extra = args.launcher_args or [
            "--max-input-tokens",
            "256",
            "--max-total-tokens",
            "512",
            "--max-batch-prefill-tokens",
            "2048",
        ]
        proc, url = start_launcher(model_id, extra)
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load {host}: this benchmark only targets 127.0.0.1")
    try:
        asyncio.run(wait_ready(url, proc, 300))
        for c in (int(x) for x in args.concurrency.split(",")):
            asyncio.run(level(url, c, max(args.requests, c), args.max_seconds, args.max_new_tokens))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            print(f"\nlauncher exited with {proc.wait(60)}")


if __name__ == "__main__":
    main()
