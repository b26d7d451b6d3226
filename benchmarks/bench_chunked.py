"""Chunked prefill vs whole-prompt prefill: how long prompts arriving stall running streams
(a script, not a test).

Eight streams decode; then long prompts (``--long`` tokens, 2k-4k by default) arrive one after
another, each when the previous one produced its first token. The same workload runs twice on
one shard (``text-generation-server serve``), driven over gRPC as TGI's v3 router drives it
(``tests/router_sim.py``):

* **unchunked**: a new prompt goes to ``Prefill`` whole, then joins the running batch in
  ``Decode([running, new])``: every stream waits for the whole prefill;
* **chunked**: the router cuts the prompt at ``--max-batch-prefill-tokens`` (``chunk_len``),
  sends ``Prefill(new, cached_batch=running)`` and the shard cuts the following chunks, so
  each pass carries one chunk and every stream's next token.

Printed per mode: the streams' inter-token latency (ITL) p50 with no arrival, p50/p99 while the
long prompts are prefilled, the p99 / no-arrival-p50 ratio (goal for chunked: within 3x), and each
long prompt's time to first token. Ratios between modes are measured in the same run.

    python benchmarks/bench_chunked.py                      # ~2-4 min on 2 cores
    python benchmarks/bench_chunked.py --long 2000 3000 4000 --max-batch-prefill-tokens 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from router_sim import WORDS, RouterSim, start_shard, text_of_tokens  # noqa: E402

def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_mode(sim: RouterSim, chunked: bool, longs: list[str], max_prefill: int,
             quiet_steps: int, streams: int) -> dict:
    stream_reqs = [sim.request(f"stream {i} " + " ".join(WORDS[i:]), max_new_tokens=2000,
                               ignore_eos=True) for i in range(streams)]
    stream_ids = {r.id for r in stream_reqs}
    stamps: dict[int, list[float]] = {r.id: [] for r in stream_reqs}
    first_token: dict[int, float] = {}
    arrival: dict[int, float] = {}
    live: set[int] = set(stream_ids)

    def consume(gens) -> None:
        now = time.perf_counter()
        for g in gens:
            if g.request_id in stream_ids:
                stamps[g.request_id].append(now)
            elif g.request_id not in first_token:
                first_token[g.request_id] = now
            if g.HasField("generated_text"):
                live.discard(g.request_id)
                sim.release(g.request_id)

    gens, current = sim.prefill(sim.batch(stream_reqs))
    consume(gens)
    pending = list(longs)
    queue = []
    step = 0
    window_start = None
    while True:
        step += 1
        waiting = [rid for rid in arrival if rid not in first_token]
        if step > quiet_steps and not waiting and not queue and pending:
            req = sim.request(pending.pop(0), max_new_tokens=2)
            arrival[req.id] = time.perf_counter()
            window_start = window_start or arrival[req.id]
            live.add(req.id)
            queue.append(req)
        if not pending and not queue and all(rid in first_token for rid in arrival):
            break
        if queue:
            if chunked:
                budget = max_prefill - current.current_tokens
                new = sim._cut(queue, budget) if budget > 0 else None
                if new is not None:
                    gens, current = sim.prefill(sim.batch(new), current)
                    consume(gens)
                    current = sim._maybe_filter(current, live)
            else:
                gens, new = sim.prefill(sim.batch(queue))
                queue.clear()
                consume(gens)
                new = sim._maybe_filter(new, live)
                if new is not None:
                    gens, current = sim.decode([current, new])
                    consume(gens)
                    current = sim._maybe_filter(current, live)
                    continue
        gens, current = sim.decode([current])
        consume(gens)
        current = sim._maybe_filter(current, live)
    window_end = max(first_token.values())
    if current is not None:
        sim.clear(current.id)
    for rid in list(live):
        sim.release(rid)

    quiet, busy = [], []
    for times in stamps.values():
        for a, b in zip(times, times[1:]):
            gap = b - a
            if b <= window_start:
                quiet.append(gap)
            elif a < window_end:
                busy.append(gap)
    ttft = [first_token[r] - arrival[r] for r in sorted(arrival)]
    return {
        "quiet_p50": pct(quiet[len(quiet) // 4 :], 50),  # skip the first steps (warming up)
        "busy_p50": pct(busy, 50),
        "busy_p99": pct(busy, 99),
        "ttft": ttft,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long", type=int, nargs="+", default=[2000, 3000, 4000], help="long prompt tokens")
    ap.add_argument("--max-batch-prefill-tokens", type=int, default=512)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--quiet-steps", type=int, default=20, help="decode steps before the first arrival")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--model-dir", default=None, help="reuse a checkpoint (else a random BLOOM)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from tgi_npu_backend.demo import write_checkpoint

    model_dir = args.model_dir or write_checkpoint(
        Path(tempfile.mkdtemp()) / "bloom", "bloom", seed=0, hidden_size=args.hidden,
        n_layer=args.layers, n_head=8,
    )
    max_total = max(args.long) + 2100
    uds = f"/tmp/tgi-bench-{uuid.uuid4().hex[:8]}"
    proc = start_shard(model_dir, uds, env={"TGI_NPU_KV_CACHE_FRACTION": "0.05"})
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, truncation_side="left")
        sim = RouterSim(f"{uds}-0", tokenizer)
        info = sim.startup(max_input=max(args.long), max_total=max_total,
                           max_prefill=args.max_batch_prefill_tokens)
        assert info.support_chunking, "the shard runs with PREFILL_CHUNKING=0"
        longs = [text_of_tokens(tokenizer, 100 + i, n) for i, n in enumerate(args.long)]
        print(f"model: BLOOM hidden {args.hidden}, {args.layers} layers (random weights), float32 CPU; "
              f"{args.streams} streams; long prompts {args.long} tokens; "
              f"max_batch_prefill_tokens {args.max_batch_prefill_tokens}; load {os.getloadavg()[0]:.1f}")
        results = {}
        for name in ("unchunked", "chunked"):
            results[name] = run_mode(sim, name == "chunked", longs, args.max_batch_prefill_tokens,
                                     args.quiet_steps, args.streams)
        print(f"{'mode':10} {'ITL p50 quiet':>14} {'ITL p50 busy':>13} {'ITL p99 busy':>13} "
              f"{'p99/quiet p50':>14}   TTFT of the long prompts")
        for name, r in results.items():
            ttft = ", ".join(f"{t * 1e3:.0f}" for t in r["ttft"])
            print(f"{name:10} {r['quiet_p50'] * 1e3:12.1f}ms {r['busy_p50'] * 1e3:11.1f}ms "
                  f"{r['busy_p99'] * 1e3:11.1f}ms {r['busy_p99'] / r['quiet_p50']:13.1f}x   [{ttft}] ms")
        u, c = results["unchunked"], results["chunked"]
        print(f"p99 ITL during long prefills: unchunked / chunked = {u['busy_p99'] / c['busy_p99']:.1f}x; "
              f"chunked p99 within 3x of its quiet p50: {c['busy_p99'] <= 3 * c['quiet_p50']}; "
              f"mean TTFT chunked / unchunked = {statistics.mean(c['ttft']) / statistics.mean(u['ttft']):.2f}x; "
              f"load {os.getloadavg()[0]:.1f}")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
