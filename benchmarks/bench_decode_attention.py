"""The CPU backend's decode attention: native kernel against PyTorch ops (a script, not a test).

Two parts, each alternating the two implementations in one process (the machine is shared: the
ratios are what to compare):

1. **The attention alone**: ``CpuBackend.decode`` over 24 layers' float32 caches of the
   bloom-560m shape (16 heads of 64, blocks of 16), ``--batch`` sequences of 36-212 tokens each
   in consecutive blocks (as the router allocates them), and one sequence of 84 tokens. The
   PyTorch figure includes its per-pass plan (``prepare``), the native one does not need it.
2. **A whole decode step of the shard** (``--model-dir``, the bloom-560m-shaped checkpoint
   ``bench_throughput.py`` writes): ``Generator.decode`` at batch 32 and 1 on the generator
   thread, the backend's ``native`` switched off and on step by step.

    python benchmarks/bench_decode_attention.py             # both parts (~2 min)
    python benchmarks/bench_decode_attention.py --no-model  # part 1 only (~20 s)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tgi_npu_backend.kernels import AttentionMetadata, Phase
from tgi_npu_backend.kernels.cpu import CpuBackend

LAYERS, HEADS, HEAD_DIM, BLOCK = 24, 16, 64, 16


def attention_alone(batch: int, rounds: int) -> tuple[float, float]:
    """Median seconds over ``rounds`` of 24 layers' decode attention: (PyTorch, native)."""
    lens = [84] if batch == 1 else [36 + 176 * i // (batch - 1) for i in range(batch)]
    tables, at = [], 1
    for n in lens:
        count = -(-n // BLOCK)
        tables.append(list(range(at, at + count)))
        at += count
    caches = [(torch.randn(at, HEADS, BLOCK, HEAD_DIM), torch.randn(at, HEADS, BLOCK, HEAD_DIM))
              for _ in range(LAYERS)]
    query = torch.randn(batch, HEADS, HEAD_DIM)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / HEADS) for h in range(HEADS)])
    meta = AttentionMetadata.build(
        phase=Phase.DECODE,
        slot_mapping=[t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, lens)],
        block_tables=tables, context_lens=[n - 1 for n in lens], query_lens=[1] * batch,
        block_size=BLOCK, device=torch.device("cpu"),
    )
    backends = {"torch": CpuBackend(native=False), "native": CpuBackend()}
    if backends["native"].native is None:
        raise SystemExit("the native kernel did not build here (see the log above)")
    times: dict[str, list[float]] = {name: [] for name in backends}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, backend in backends.items():
                start = time.perf_counter()
                prepared = backend.prepare(meta)
                for k, v in caches:
                    backend.decode(query, k, v, prepared, HEAD_DIM**-0.5, slopes)
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["torch"]), statistics.median(times["native"])


def whole_steps(model_dir: Path, batch: int, steps: int) -> tuple[float, float, int]:
    """Median seconds of the shard's decode step with the PyTorch decode and with the native
    kernel, alternated step by step; and in how many pairs the native step was faster."""
    from router_sim import params, text_input
    from tgi_npu_backend.launcher.allocator import BlockAllocator
    from tgi_npu_backend.launcher.warmup import build_warmup_request

    from tgi_npu_backend import wire
    from tgi_npu_backend.config import ServerConfig
    from tgi_npu_backend.load import build_generator
    from tgi_npu_backend.pb import generate_pb2 as pb

    gen = build_generator(ServerConfig(model_id=str(model_dir), device="cpu", kv_cache_fraction=0.05))
    gen.warmup(wire.batch_requests(build_warmup_request(256, 4096, 512, None).batch), 256, 4096, 512)
    alloc = BlockAllocator(gen.kv_cache.num_slots, gen.block_size)
    text = " ".join(["the quick brown fox jumps"] * 60)
    reqs = []
    for i in range(batch):
        n = 64 if batch == 1 else 16 + 176 * i // (batch - 1)
        a = alloc.allocate(n + steps + 1)
        reqs.append(pb.Request(
            id=i, inputs=text, input_chunks=text_input(text), truncate=n, parameters=params(),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=steps + 1, ignore_eos_token=True),
            blocks=list(a.blocks), slots=list(a.slots)))
    gen.prefill(0, wire.batch_requests(pb.Batch(id=0, requests=reqs, size=batch)))
    backend = gen.runner.backend
    kernel = backend.native
    times: dict[bool, list[float]] = {False: [], True: []}
    for s in range(steps):
        native = s % 2 == 1
        backend.native = kernel if native else None
        start = time.perf_counter()
        gen.decode([0])
        times[native].append(time.perf_counter() - start)
    faster = sum(n < t for t, n in zip(times[False], times[True]))
    return statistics.median(times[False]), statistics.median(times[True]), faster


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=24, help="decode steps per whole-step A/B")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/tgi-npu-bench-bloom560m"))
    p.add_argument("--no-model", action="store_true", help="only the attention alone")
    args = p.parse_args()

    for batch in (args.batch, 1):
        t, n = attention_alone(batch, args.rounds)
        print(f"decode attention alone, {LAYERS} layers, batch {batch}: PyTorch {t * 1e3:.1f} ms, "
              f"native {n * 1e3:.1f} ms ({t / n:.2f}x)", flush=True)
    if args.no_model:
        return

    from bench_throughput import ensure_checkpoint

    from tgi_npu_backend.server import torch_thread

    model_dir = ensure_checkpoint(args.model_dir)
    with torch_thread() as worker:  # the server's generator thread (inference mode)
        for batch, steps in ((args.batch, args.steps), (1, 2 * args.steps)):
            t, n, faster = worker.submit(whole_steps, model_dir, batch, steps).result()
            print(f"shard decode step, batch {batch}: PyTorch decode {t * 1e3:.1f} ms, native "
                  f"{n * 1e3:.1f} ms ({t / n:.2f}x; native faster in {faster}/{steps // 2} "
                  f"alternated pairs)", flush=True)


if __name__ == "__main__":
    main()
