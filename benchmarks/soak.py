"""Bounded loopback soak of tgi-npu-launcher (a script, not a test).

Sends --requests requests (default 10,000) at --concurrency clients (default 64): mixed routes
(``/generate``, ``/generate_stream``, ``/v1/chat/completions``, ``/v1/completions``), mixed
sampling parameters (greedy, temperature/top-k/top-p/typical-p, penalties, seeds, watermark, stop
sequences, top-n), a share of streams cancelled mid-stream (--cancel, default 1/4) and a few
invalid bodies (--bad). It prints:

* KV blocks free in the router's allocator before and after (they must be equal);
* RSS of the launcher and of the shard at the start and at the end (growth should stay < 5%);
* every greedy request whose answer differs from the same request served alone (none expected).

    python benchmarks/soak.py                     # writes a tiny random BLOOM and launches it
    python benchmarks/soak.py --model-id DIR      # launches tgi-npu-launcher on DIR
    python benchmarks/soak.py --url http://127.0.0.1:3000 --launcher-pid N --shard-pid M

Traffic goes to 127.0.0.1 only; the run is bounded by --requests and --max-seconds. "Start" RSS is
taken after the solo reference runs and a warm-up burst of 2 x --concurrency requests (so Python's
and the allocators' pools are primed); "end" after the soak, once the server is idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlparse

import aiohttp
from load import LOOPBACK, start_launcher, wait_ready  # benchmarks/load.py
from load import PROMPTS as LOAD_PROMPTS

PROMPTS = [
    *LOAD_PROMPTS,
    "Hello 深度学习 world",
    "Once upon a time, in a land far away,",
    "numbers: 1 2 3 4 5 6 7",
    "Ascend NPUs run paged attention",
]
GREEDY_LENGTHS = (4, 12, 24)
SAMPLING = [
    {"do_sample": True, "temperature": 0.7, "top_k": 40},
    {"do_sample": True, "top_p": 0.9, "repetition_penalty": 1.2},
    {"temperature": 1.3, "typical_p": 0.8, "frequency_penalty": 0.5},
    {"do_sample": True, "watermark": True, "top_n_tokens": 3},
    {"do_sample": True, "temperature": 0.5, "stop": [" the", "\n"]},
]
BAD_BODIES = [
    b'{"inputs": "x", "parameters": {"temperature": NaN}}',
    b'{"inputs": "x", "parameters": {"top_k": 1099511627776}}',
    b'{"inputs": "x", "parameters": {"stop": ["\\ud800"]}}',
    b'{"inputs": ""}',
    b"{not json",
]


@dataclass
class Outcome:
    kind: str  # ok | cancelled | bad | error
    mismatch: str | None = None
    compared: bool = False  # a greedy answer checked against its solo answer


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def shard_pids(launcher_pid: int) -> list[int]:
    """``text-generation-server serve`` processes whose parent is the launcher."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and b" serve " in cmd:
            pids.append(int(entry))
    return pids


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float | None:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


async def idle(session: aiohttp.ClientSession, url: str, timeout: float = 60.0) -> None:
    """Wait until the router has no batch running and nothing queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        size = await metric(session, url, "tgi_batch_current_size")
        queue = await metric(session, url, "tgi_queue_size")
        if not size and not queue:
            return
        await asyncio.sleep(0.2)


async def generate_ids(session, url: str, prompt: str, max_new_tokens: int) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
    async with session.post(url + "/generate", json=body) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"solo request failed: {resp.status} {data}")
    return [t["id"] for t in data["details"]["tokens"]]


async def stream_ids(resp: aiohttp.ClientResponse, stop_after: int | None) -> list[int] | None:
    """Token ids of a ``/generate_stream`` answer; None if cancelled after ``stop_after``."""
    ids = []
    async for raw in resp.content:
        if not raw.startswith(b"data:"):
            continue
        event = json.loads(raw[5:])
        if "error" in event:
            raise RuntimeError(event["error"])
        ids.append(event["token"]["id"])
        if stop_after is not None and len(ids) >= stop_after:
            resp.close()  # the client goes away mid-stream
            return None
    return ids


async def one(session, url: str, i: int, rng: random.Random, args, solo: dict) -> Outcome:
    roll = rng.random()
    if roll < args.bad:
        async with session.post(
            url + "/generate",
            data=rng.choice(BAD_BODIES),
            headers={"Content-Type": "application/json"},
        ) as resp:
            await resp.read()
            return Outcome("bad" if resp.status in (400, 422) else "error")
    prompt = PROMPTS[i % len(PROMPTS)]
    greedy = rng.random() < 0.5
    n = rng.choice(GREEDY_LENGTHS) if greedy else rng.randint(1, 24)
    params = {"max_new_tokens": n}
    if not greedy:
        params.update(rng.choice(SAMPLING))
        params["seed"] = rng.randrange(2**64)
    cancel = rng.random() < args.cancel
    route = rng.random()
    try:
        if cancel or route < 0.4:
            async with session.post(
                url + "/generate_stream", json={"inputs": prompt, "parameters": params}
            ) as resp:
                if resp.status != 200:
                    return Outcome("error", f"stream {resp.status}: {await resp.text()}")
                ids = await stream_ids(resp, rng.randint(1, 3) if cancel else None)
            if ids is None:
                return Outcome("cancelled")
        elif route < 0.7:
            params["details"] = True
            async with session.post(
                url + "/generate", json={"inputs": prompt, "parameters": params}
            ) as resp:
                data = await resp.json()
                if resp.status != 200:
                    return Outcome("error", f"generate {resp.status}: {data}")
            ids = [t["id"] for t in data["details"]["tokens"]]
        elif route < 0.85:
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": n,
                "temperature": 0 if greedy else 0.8,
                "seed": params.get("seed"),
            }
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                data = await resp.json()
                return Outcome(
                    "ok" if resp.status == 200 else "error",
                    None if resp.status == 200 else f"chat {resp.status}: {data}",
                )
        else:
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0 if greedy else 0.8}
            async with session.post(url + "/v1/completions", json=body) as resp:
                data = await resp.json()
                return Outcome(
                    "ok" if resp.status == 200 else "error",
                    None if resp.status == 200 else f"completions {resp.status}: {data}",
                )
    except (aiohttp.ClientError, RuntimeError, asyncio.TimeoutError) as err:
        return Outcome("error", f"{type(err).__name__}: {err}")
    if greedy:
        want = solo[(prompt, n)]
        if ids != want:
            return Outcome(
                "ok", f"greedy {prompt!r} max_new_tokens={n}: {ids} != solo {want}", True
            )
        return Outcome("ok", compared=True)
    return Outcome("ok")


async def soak(url: str, args, launcher_pid: int | None, shard_pid: int | None) -> int:
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=args.concurrency + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        print("solo answers of the greedy requests ...", flush=True)
        solo = {}
        for prompt in PROMPTS:
            for n in GREEDY_LENGTHS:
                solo[(prompt, n)] = await generate_ids(session, url, prompt, n)
        rng = random.Random(args.seed)
        warm = [one(session, url, i, rng, args, solo) for i in range(2 * args.concurrency)]
        await asyncio.gather(*warm)
        await idle(session, url)
        blocks_before = await metric(session, url, "tgi_kv_blocks_free")
        rss_start = {
            "launcher": rss_kib(launcher_pid) if launcher_pid else None,
            "shard": rss_kib(shard_pid) if shard_pid else None,
        }
        print(f"KV blocks free before: {blocks_before}; RSS start (KiB): {rss_start}", flush=True)

        outcomes: list[Outcome] = []
        issued = 0
        start = time.monotonic()
        deadline = start + args.max_seconds

        async def worker() -> None:
            nonlocal issued
            while issued < args.requests and time.monotonic() < deadline:
                i = issued
                issued += 1
                outcomes.append(await one(session, url, i, rng, args, solo))
                if len(outcomes) % 1000 == 0:
                    print(
                        f"  {len(outcomes)} requests, {time.monotonic() - start:.0f}s", flush=True
                    )

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.monotonic() - start
        await idle(session, url)
        await asyncio.sleep(1.0)
        blocks_after = await metric(session, url, "tgi_kv_blocks_free")
        rss_end = {
            "launcher": rss_kib(launcher_pid) if launcher_pid else None,
            "shard": rss_kib(shard_pid) if shard_pid else None,
        }

    kinds = Counter(o.kind for o in outcomes)
    mismatches = [o.mismatch for o in outcomes if o.kind == "ok" and o.mismatch]
    errors = [o.mismatch for o in outcomes if o.kind == "error"]
    print(
        f"\n{len(outcomes)} requests in {wall:.0f}s ({len(outcomes) / wall:.1f}/s) at "
        f"{args.concurrency} concurrent: {dict(kinds)}"
    )
    print(
        f"KV blocks free: before {blocks_before}, after {blocks_after} "
        f"({'equal' if blocks_before == blocks_after else 'DIFFERENT'})"
    )
    for name in ("launcher", "shard"):
        a, b = rss_start[name], rss_end[name]
        if a and b:
            print(
                f"RSS {name}: start {a / 1024:.1f} MiB, end {b / 1024:.1f} MiB "
                f"({100 * (b - a) / a:+.1f}%)"
            )
    compared = sum(o.compared for o in outcomes)
    print(f"greedy answers differing from their solo answer: {len(mismatches)} of {compared}")
    for m in mismatches[:20]:
        print("  " + m)
    if errors:
        print(f"errors: {len(errors)}")
        for e in Counter(errors).most_common(10):
            print(f"  {e[1]} x {e[0][:300]}")
    return 0 if not mismatches and not errors and blocks_before == blocks_after else 1


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="an already running server on 127.0.0.1")
    p.add_argument("--launcher-pid", type=int, help="with --url: the launcher's pid (RSS)")
    p.add_argument("--shard-pid", type=int, help="with --url: the shard's pid (RSS)")
    p.add_argument("--model-id", help="launch on this model (default: a tiny random BLOOM)")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--cancel", type=float, default=0.25, help="share cancelled mid-stream")
    p.add_argument("--bad", type=float, default=0.02, help="share of invalid bodies")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="no new requests after it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("launcher_args", nargs="*", help="extra tgi-npu-launcher flags (after --)")
    args = p.parse_args()

    proc = None
    url = args.url
    launcher_pid, shard_pid = args.launcher_pid, args.shard_pid
    if url is None:
        model_id = args.model_id
        if model_id is None:
            from tgi_npu_backend.demo import write_checkpoint

            model_id = str(write_checkpoint(tempfile.mkdtemp(prefix="soak-model"), "bloom"))
            print(f"wrote a tiny RANDOM-WEIGHT bloom checkpoint to {model_id}")
        extra = args.launcher_args or [
            "--max-input-tokens",
            "256",
            "--max-total-tokens",
            "512",
            "--max-batch-prefill-tokens",
            "2048",
            "--max-concurrent-requests",
            "256",
        ]
        proc, url = start_launcher(model_id, extra, name="soak")
        launcher_pid = proc.pid
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load {host}: this soak only targets 127.0.0.1")
    code = 1
    try:
        asyncio.run(wait_ready(url, proc, 300))
        if proc is not None:
            shards = shard_pids(proc.pid)
            shard_pid = shards[0] if shards else None
        code = asyncio.run(soak(url, args, launcher_pid, shard_pid))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            print(f"launcher exited with {proc.wait(120)}")
    sys.exit(code)


if __name__ == "__main__":
    main()
