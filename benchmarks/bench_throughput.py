"""Throughput of the shard against HF transformers static batching (a script, not a test).

One invocation measures, on this machine and in this run (the ratios are what to compare: the
machine is shared and absolute figures move between runs):

1. **Continuous batching vs static batching.** ``--requests`` prompts of ``--min-prompt`` ..
   ``--max-prompt`` tokens (evenly spread), ``--new-tokens`` new tokens each (EOS ignored),
   all arriving at once. Our shard runs as ``text-generation-server serve`` under a router-like
   gRPC loop (``tests/router_sim.py``: the v3 router's startup, warmup, block allocator, prefill
   batches up to ``--max-batch-prefill-tokens``, Decode/FilterBatch); HF transformers runs
   ``generate`` on one left-padded batch of the same token ids, in this process. Prints
   tokens/s of both, the ratio, time to first token and inter-token latency, and the ratio per
   CPU-second (the CPU time each side used: less sensitive to other load on a shared machine).
   ``--rounds N`` alternates the two N times and prints the median ratios.
2. **Batch-1 decode against the memory-bandwidth bound.** One request, the shard's client-side
   inter-token latency vs HF's KV-cache loop, and vs ``weight bytes / GEMV bandwidth`` (a
   ``[rows, hidden] @ [hidden]`` GEMV over 1 GiB, MKL's and oneDNN's, the faster). In
   ``--batch1-rounds`` rounds, each request between two bandwidth samples: the fraction of the
   bound per round (its own samples' higher bandwidth), their median, and the strictest figure
   (the run's highest sample against the median ITL).
3. **Host time per decode step** at ``--host-batch`` requests on a tiny model: ``bench_host.py``,
   run in a process of its own (one torch thread): ``Generator.decode`` plus the response's
   protobuf, minus the model's forward and LM head; with the CPU attention backend's per-pass plan
   as its own figure, and the same host time with the NPU backend's plan in its place.

The model is the bloom-560m shape (24 layers, hidden 1024, 16 heads, 250,880 vocabulary) with
random weights, written locally with ``tgi_npu_backend.demo.write_checkpoint`` (the tests'
checkpoint generator) and reused from ``--model-dir`` on later runs.

    python benchmarks/bench_throughput.py                 # everything once (~8 min on 2 cores)
    python benchmarks/bench_throughput.py --rounds 3      # shard and HF alternated three times
    python benchmarks/bench_throughput.py --skip-hf --skip-batch1 --py-spy /tmp/shard.txt
    python benchmarks/bench_throughput.py --host-only     # only part 3 (= bench_host.py, ~1 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from router_sim import RouterSim, start_shard

from tgi_npu_backend.load import load_tokenizer
from tgi_npu_backend.pb import generate_pb2 as pb

BLOOM_560M = {"vocab_size": 250880, "hidden_size": 1024, "n_layer": 24, "n_head": 16}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "text", "generation", "inference", "serves", "large", "language", "models", "over", "gRPC", "and", "HTTP", "paged", "attention", "with", "ALiBi", "for", "BLOOM", "rotary", "embeddings", "Gemma", "numbers", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "once", "upon", "a", "time", "there", "was", "a", "little", "model"]


def now() -> float:
    return time.perf_counter()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


# ---------------------------------------------------------------------------------- workload
def ensure_checkpoint(model_dir: Path) -> Path:
    config = model_dir / "config.json"
    if config.exists():
        cfg = json.loads(config.read_text())
        if all(cfg.get(k) == v for k, v in BLOOM_560M.items()):
            return model_dir
    from tgi_npu_backend.demo import write_checkpoint

    print(f"writing a random-weight bloom-560m-shaped checkpoint to {model_dir} ...", flush=True)
    return write_checkpoint(model_dir, "bloom", seed=0, **BLOOM_560M)


def make_prompts(tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (text, length) pairs; the text has more than ``length`` tokens and both sides keep
    its last ``length`` tokens (left truncation, as the router's ``truncate``)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [round(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]
    prompts = []
    for length in lengths:
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (2 * length + 8,), generator=g)]
        text = " ".join(words)
        assert len(tokenizer(text)["input_ids"]) >= length
        prompts.append((text, length))
    return prompts


def prompt_ids(tokenizer, prompts) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=n)["input_ids"] for t, n in prompts]


# ---------------------------------------------------------------------------------- our shard
def shard_run(router: RouterSim, prompts, new_tokens: int, max_prefill: int) -> dict:
    """All requests arrive at t0; prefill batches of up to ``max_prefill`` prompt tokens are
    admitted between decode steps (as the router's queue), decoding batches are concatenated."""
    requests = [router.request(t, max_new_tokens=new_tokens, truncate=n, ignore_eos=True)
                for t, n in prompts]
    times: dict[int, list[float]] = {r.id: [] for r in requests}
    forward_ns: list[int] = []  # the shard's own forward time per Decode (forward + sampling)
    queue, live, current = list(requests), set(), None
    t0 = now()

    def consume(gens) -> None:
        t = now()
        for g in gens:
            times[g.request_id].append(t)
            if g.HasField("generated_text"):
                live.discard(g.request_id)
                router.release(g.request_id)

    while queue or live:
        new = None
        if queue:
            admit, tokens = [], 0
            while queue and tokens + len(queue[0].slots) - new_tokens + 1 <= max_prefill:
                tokens += len(queue[0].slots) - new_tokens + 1
                admit.append(queue.pop(0))
            admit = admit or [queue.pop(0)]
            live.update(r.id for r in admit)
            gens, new = router.prefill(router.batch(admit))
            consume(gens)
            new = router._maybe_filter(new, live)
        current = router._maybe_filter(current, live)
        batches = [b for b in (current, new) if b is not None]
        if batches:
            resp = router._all("Decode", pb.DecodeRequest(batches=batches))[-1]
            forward_ns.append(resp.forward_ns)
            consume(resp.generations)
            current = resp.batch if resp.HasField("batch") else None
            current = router._maybe_filter(current, live)
    elapsed = now() - t0
    out = summarize(times, t0, elapsed)
    out["decode_forward_p50"] = pct(forward_ns, 50) / 1e9
    return out


def summarize(times: dict[int, list[float]], t0: float, elapsed: float) -> dict:
    tokens = sum(len(t) for t in times.values())
    ttft = [t[0] - t0 for t in times.values()]
    itl = [b - a for t in times.values() for a, b in itertools.pairwise(t)]
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
            "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90),
            "itl_p50": pct(itl, 50), "itl_p90": pct(itl, 90), "itl_mean": statistics.fmean(itl) if itl else 0.0}


def with_shard(model_dir: Path, uds: str, fn, kv_fraction: float, cpu_gemm: str | None):
    """Run ``fn(proc)`` with a shard up; its output goes to ``{uds}.log`` (a pipe nobody reads
    would fill and stall it). Prints how the shard runs its float32 linears (its log says)."""
    env = {"TGI_NPU_KV_CACHE_FRACTION": str(kv_fraction)}
    if cpu_gemm:
        env["TGI_NPU_CPU_GEMM"] = cpu_gemm
    proc = start_shard(model_dir, uds, env=env, extra_args=["--logger-level", "INFO"], timeout=600)
    log = open(f"{uds}.log", "w", buffering=1)  # noqa: SIM115 (closed below)
    drains = [threading.Thread(target=lambda s=s: [log.write(x) for x in s], daemon=True)
              for s in (proc.stdout, proc.stderr)]
    for t in drains:
        t.start()
    time.sleep(1.0)  # the startup lines reach the log
    for line in Path(f"{uds}.log").read_text().splitlines():
        if "float32 CPU linears" in line or "reordered into oneDNN" in line:
            try:
                line = json.loads(line)["text"]
            except (ValueError, KeyError):
                pass
            print("shard: " + line.strip(), flush=True)
    try:
        return fn(proc)
    except BaseException:
        log.flush()
        print(f"shard exit status {proc.poll()}; log tail ({uds}.log):\n"
              + Path(f"{uds}.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        proc.kill()
        proc.wait()
        log.close()


def py_spy_summary(raw: Path, top: int = 25) -> str:
    """Self time per leaf Python frame (and per function anywhere on the stack) from py-spy's
    ``--format raw`` (collapsed stacks)."""
    leaf, inclusive, total = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        leaf[frames[-1]] += n
        for f in set(frames):
            inclusive[f.split(" (")[0]] += n
    out = [f"py-spy: {total} samples; self time by leaf frame:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in leaf.most_common(top)]
    out += ["inclusive time by function:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out)


# ---------------------------------------------------------------------------------- HF
def hf_run(model, ids: list[list[int]], new_tokens: int, pad_id: int) -> dict:
    """``generate`` on one left-padded batch (greedy, exactly ``new_tokens`` tokens each)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(now())  # once per step, after that step's forward
            return scores

    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    t0 = now()
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                       logits_processor=LogitsProcessorList([Stamp()]))
    elapsed = now() - t0
    return summarize({i: list(stamps) for i in range(len(ids))}, t0, elapsed)


# ---------------------------------------------------------------------------------- bandwidth
def gemv_bandwidth(hidden: int, gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s of the fastest float32 ``[rows, hidden] @ [hidden]`` GEMV over ``gib`` GiB here
    (median of ``repeats``): MKL's (``F.linear``), oneDNN's, or the native one-row kernel's
    (``device_kernels/cpu_gemm.c``, where it runs), whichever streams fastest."""
    from tgi_npu_backend.models.layers.cpu_gemm import KERNELS, available

    rows = int(gib * 2**30 / 4 / hidden)
    w = torch.randn(rows, hidden)
    x = torch.randn(1, hidden)
    best = 0.0
    for gemv in (KERNELS[name] for name in available(("mkl", "onednn", "native"))):
        times = []
        for _ in range(repeats):
            t = now()
            gemv(x, w)
            times.append(now() - t)
        best = max(best, w.numel() * 4 / statistics.median(times))
    return best


def linears_alone(model, repeats: int = 5) -> dict[str, float]:
    """Seconds for one row through every ``nn.Linear`` of ``model`` (the LM head included), back
    to back, with each float32 CPU kernel the shard may run a plain weight with at one row
    (``cpu_gemm.ONE_ROW_KERNELS``; kernels alternated, median of ``repeats``): the part of a
    batch-1 step that reads the weights, without the small ops between them."""
    from tgi_npu_backend.models.layers.cpu_gemm import KERNELS, ONE_ROW_KERNELS, available

    kernels = {name: KERNELS[name] for name in available(ONE_ROW_KERNELS)}
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, kernel in kernels.items():
                t = now()
                for w in weights:
                    kernel(inputs[w.shape[1]], w, None)
                times[name].append(now() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------------------- main
def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "tgi-npu-bench-bloom560m")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=192)
    p.add_argument("--max-batch-prefill-tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate shard and HF runs this many times (a shared machine is noisy)")
    p.add_argument("--batch1-new-tokens", type=int, default=32)
    p.add_argument("--batch1-rounds", type=int, default=3,
                   help="batch-1 runs, each between two GEMV bandwidth samples (its bound)")
    p.add_argument("--host-batch", type=int, default=32)
    p.add_argument("--host-steps", type=int, default=100)
    p.add_argument("--host-rounds", type=int, default=3)
    p.add_argument("--kv-cache-fraction", type=float, default=0.12)
    p.add_argument("--cpu-gemm", choices=("auto", "packed", "plain"), default=None,
                   help="the shard's TGI_NPU_CPU_GEMM (default: as in this environment, else auto)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-batch1", action="store_true")
    p.add_argument("--skip-host", action="store_true")
    p.add_argument("--host-only", action="store_true", help="only the host time per step")
    p.add_argument("--py-spy", type=Path, default=None,
                   help="record the shard with py-spy during the first throughput run (raw stacks here)")
    args = p.parse_args()
    if args.host_only:
        host_part(args)
        return

    model_dir = ensure_checkpoint(args.model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompts = make_prompts(tokenizer, args.requests, args.min_prompt, args.max_prompt)
    ids = prompt_ids(tokenizer, prompts)
    print(f"workload: {args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens "
          f"({sum(map(len, ids))} in all), {args.new_tokens} new tokens each; float32; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    uds = os.path.join(tempfile.mkdtemp(), "shard")
    max_total = args.max_prompt + max(args.new_tokens, args.batch1_new_tokens)
    hf = None
    if not (args.skip_hf and args.skip_batch1):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def hf_timed(prompt_ids_: list[list[int]], new_tokens: int) -> dict:
        cpu = time.process_time()
        res = hf_run(hf, prompt_ids_, new_tokens, tokenizer.pad_token_id)
        res["cpu_s"] = time.process_time() - cpu
        return res

    def session(proc):
        router = RouterSim(f"{uds}-0", tokenizer)
        router.startup(max_input=args.max_prompt, max_total=max_total,
                       max_prefill=args.max_batch_prefill_tokens)

        def ours(reqs, new_tokens: int) -> dict:
            cpu = proc_cpu_seconds(proc.pid)
            res = shard_run(router, reqs, new_tokens, args.max_batch_prefill_tokens)
            res["cpu_s"] = proc_cpu_seconds(proc.pid) - cpu
            return res

        ratios = []
        for r in range(args.rounds):
            spy = None
            if args.py_spy and r == 0:
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--rate", "50",
                                        "--format", "raw", "--output", str(args.py_spy), "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            mine = ours(prompts, args.new_tokens)
            if spy is not None:
                spy.send_signal(2)
                spy.wait()
                print(py_spy_summary(args.py_spy))
            report(f"[round {r + 1}] shard (continuous batching, gRPC)", mine)
            if args.skip_hf:
                continue
            theirs = hf_timed(ids, args.new_tokens)
            report(f"[round {r + 1}] HF transformers (static batch, generate)", theirs)
            ratios.append((mine["tok_s"] / theirs["tok_s"],
                           theirs["cpu_s"] / mine["cpu_s"]))
            print(f"[round {r + 1}] throughput shard / HF: {ratios[-1][0]:.2f}x wall-clock, "
                  f"{ratios[-1][1]:.2f}x per CPU-second", flush=True)
        if ratios:
            print(f"throughput ratio shard / HF over {len(ratios)} round(s): median "
                  f"{statistics.median(r[0] for r in ratios):.2f}x wall-clock (goal >= 2.5x), "
                  f"{statistics.median(r[1] for r in ratios):.2f}x per CPU-second", flush=True)
        if args.skip_batch1:
            return
        # Rounds of [GEMV bandwidth, the shard's request, GEMV bandwidth, HF's loop]: the
        # machine's bandwidth drifts by 20% and more between minutes, so each round's bound comes
        # from the samples bracketing its own request (the higher: the stricter), and the strict
        # figure from the highest sample of the run against the median ITL.
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        rounds = []
        for r in range(args.batch1_rounds):
            before = gemv_bandwidth(BLOOM_560M["hidden_size"])
            mine = ours(prompts[:1], args.batch1_new_tokens)
            after = gemv_bandwidth(BLOOM_560M["hidden_size"])
            theirs = hf_timed(ids[:1], args.batch1_new_tokens)
            bound = weight_bytes / max(before, after)
            rounds.append({"bws": (before, after), "mine": mine, "theirs": theirs,
                           "fraction": bound / mine["itl_p50"]})
            print(f"[batch-1 round {r + 1}] shard ITL p50 {ms(mine['itl_p50'])} (forward "
                  f"{ms(mine['decode_forward_p50'])}), HF KV-cache loop ITL p50 "
                  f"{ms(theirs['itl_p50'])}; GEMV bandwidth {before / 1e9:.1f} / {after / 1e9:.1f} "
                  f"GB/s before / after -> bound {ms(bound)}/token; shard reaches "
                  f"{100 * rounds[-1]['fraction']:.0f}% of it", flush=True)
        itl = statistics.median(x["mine"]["itl_p50"] for x in rounds)
        hf_itl = statistics.median(x["theirs"]["itl_p50"] for x in rounds)
        best_bw = max(b for x in rounds for b in x["bws"])
        lin = linears_alone(hf)
        print(f"batch-1 decode ({prompts[0][1]}-token prompt, {args.batch1_new_tokens} tokens, "
              f"{len(rounds)} round(s)): shard ITL p50 {ms(itl)}, HF KV-cache loop {ms(hf_itl)} "
              f"({hf_itl / itl:.2f}x); {weight_bytes / 2**30:.2f} GiB of weights; the shard "
              f"reaches a median {100 * statistics.median(x['fraction'] for x in rounds):.0f}% of "
              f"its round's bound (goal >= 90%), {100 * weight_bytes / best_bw / itl:.0f}% of the "
              f"strictest (the run's best GEMV bandwidth, {best_bw / 1e9:.1f} GB/s, against the "
              f"median ITL); the model's linears alone, back to back, each its own call from Python: "
              + ", ".join(f"{name} {ms(t)} ({100 * weight_bytes / best_bw / t:.0f}%)"
                          for name, t in lin.items()),
              flush=True)

    with_shard(model_dir, uds, session, args.kv_cache_fraction, args.cpu_gemm)
    if not args.skip_host:
        # NOTE: in a fresh process, as the shard's own. After two-threaded torch work on the same
        # thread, the one-thread loop runs ~1.5x slower: host p50 1.65-1.70 against 1.09-1.11 ms
        # fresh (20 2048^2 matmuls first, alternated twice); 1.99 against 1.29 ms after this
        # script's HF runs. OMP_WAIT_POLICY=passive did not change it (1.83 ms); cause not found.
        host_part(args)


def host_part(args) -> None:
    """``bench_host.py`` in a process of its own (see the NOTE above)."""
    subprocess.run([sys.executable, str(Path(__file__).with_name("bench_host.py")),
                    "--batch", str(args.host_batch), "--steps", str(args.host_steps),
                    "--rounds", str(args.host_rounds)], check=True)


def report(name: str, r: dict) -> None:
    print(f"{name}: {r['tokens']} tokens in {r['seconds']:.1f} s = {r['tok_s']:.2f} tok/s "
          f"({r['cpu_s']:.0f} CPU-s); TTFT p50 {ms(r['ttft_p50'])} p90 {ms(r['ttft_p90'])}; "
          f"ITL p50 {ms(r['itl_p50'])} p90 {ms(r['itl_p90'])} mean {ms(r['itl_mean'])}"
          + (f"; shard forward per decode step p50 {ms(r['decode_forward_p50'])}" if "decode_forward_p50" in r else ""),
          flush=True)


if __name__ == "__main__":
    main()
