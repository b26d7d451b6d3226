"""Host time per decode step of the shard (a script, not a test; ``bench_throughput.py`` runs it).

``--batch`` requests decode together on a tiny BLOOM, in this process, on the server's generator
thread (``server.torch_thread``) with one torch thread: the Decode handler's time
(``Generator.decode`` and the response's protobuf) minus the model's forward and LM head, i.e.
what the host adds to every step. On an NPU, whose decode step is ~10-30 ms, this is what decides
throughput. Printed: p50 and p90 (goal < 1 ms), the CPU attention backend's per-pass plan, and
the same host time with the NPU backend's plan in its place (the NPU path's host work).

Then the same with the forward replayed rather than run: the host work alone. A forward pass run
on this CPU between two steps evicts the host code's instructions and data from the CPU caches,
and the host part then pays for refilling them (a handful of numpy operations measured ~10x
slower right after a few matmuls than in a loop). On an NPU the host still runs the dispatch of
every kernel of the forward pass but not the kernels: expect a figure between the two (not measured).

    python benchmarks/bench_host.py                 # ~1 min
    python benchmarks/bench_host.py --batch 8 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_throughput import WORDS, now, pct
from router_sim import params, text_input
from tgi_npu_backend.kernels.npu import NpuBackend
from tgi_npu_backend.launcher.allocator import BlockAllocator
from tgi_npu_backend.launcher.warmup import build_warmup_request

from tgi_npu_backend import wire
from tgi_npu_backend.config import ServerConfig
from tgi_npu_backend.demo import write_checkpoint
from tgi_npu_backend.load import build_generator
from tgi_npu_backend.pb import generate_pb2 as pb
from tgi_npu_backend.server import torch_thread


def _replaying(fn):
    """``fn`` run once per input shape, its output returned again on later calls."""
    outputs = {}

    def replay(x, *args, **kwargs):
        key = tuple(x.shape)
        if key not in outputs:
            outputs[key] = fn(x, *args, **kwargs)
        return outputs[key]
    return replay


def host_time(batch: int, steps: int, rounds: int = 3, replay: bool = False) -> dict:
    """Per decode step of ``batch`` requests on a tiny BLOOM, in process: the Decode handler's
    time (``Generator.decode`` + the response protobuf) minus the model forward and LM head.
    With ``replay`` the forward and LM head return the first decode step's outputs instead of
    running: nothing runs between two steps' host parts, whose code and data then stay in the
    CPU caches (the host work alone, a lower bound).

    Also split out: the CPU attention backend's per-pass plan (``CpuBackend.prepare``, its index
    arrays), and what the NPU backend's ``prepare`` costs on the host for the same metadata, to
    give the host time of the NPU path (on an NPU the plan is that backend's). ``rounds`` batches
    of ``steps`` steps each; the figures are the median over rounds of each round's p50/p90."""
    tiny = write_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "bloom", seed=0)
    gen = build_generator(ServerConfig(model_id=str(tiny), device="cpu", kv_cache_fraction=0.01))
    warm = build_warmup_request(64, 512, 128, None)
    gen.warmup(wire.batch_requests(warm.batch), 64, 512, 128)
    spent = {"model": 0.0, "plan": 0.0, "npu_plan": 0.0}
    npu = NpuBackend()

    def timed(fn, key):
        def wrapper(*a, **k):
            t = now()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += now() - t
        return wrapper

    if replay:
        gen.model.forward = _replaying(gen.model.forward)
        gen.model.compute_logits = _replaying(gen.model.compute_logits)
    gen.model.forward = timed(gen.model.forward, "model")
    gen.model.compute_logits = timed(gen.model.compute_logits, "model")
    cpu_prepare = timed(gen.runner.backend.prepare, "plan")

    def prepare(meta):
        t = now()
        npu.prepare(meta)  # the NPU path's plan for the same pass (result unused)
        spent["npu_plan"] += now() - t
        return cpu_prepare(meta)

    gen.runner.backend.prepare = prepare
    per_round: dict[str, list[float]] = {}
    for r in range(rounds):
        alloc = BlockAllocator(gen.kv_cache.num_slots, gen.block_size)
        reqs = []
        for i in range(batch):
            a = alloc.allocate(16 + steps + 1)
            text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(12))
            reqs.append(pb.Request(
                id=i, inputs=text, input_chunks=text_input(text), truncate=16, parameters=params(),
                stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=steps + 1, ignore_eos_token=True),
                blocks=list(a.blocks), slots=list(a.slots)))
        out = gen.prefill(r, wire.batch_requests(pb.Batch(id=r, requests=reqs, size=batch)))
        host, plan, npu_path, total = [], [], [], []
        for _ in range(steps):
            for k in spent:
                spent[k] = 0.0
            t = now()
            out = gen.decode([r])
            wire.step_pb(out, pb.DecodeResponse)
            dt = now() - t - spent["npu_plan"]  # the NPU plan is not part of the CPU step
            total.append(dt)
            host.append(dt - spent["model"])
            plan.append(spent["plan"])
            npu_path.append(dt - spent["model"] - spent["plan"] + spent["npu_plan"])
        gen.clear(None)
        for key, values in (("host", host), ("plan", plan), ("npu_path", npu_path), ("step", total)):
            per_round.setdefault(f"{key}_p50", []).append(pct(values, 50))
            per_round.setdefault(f"{key}_p90", []).append(pct(values, 90))
    out = {k: statistics.median(v) for k, v in per_round.items()}
    out["host_p50_rounds"] = per_round["host_p50"]
    return out



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="requests decoding together")
    p.add_argument("--steps", type=int, default=100, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    def on_generator_thread() -> tuple[dict, dict]:
        torch.set_num_threads(1)  # small ops: no waiting on a second, busy core
        return (host_time(args.batch, args.steps, args.rounds),
                host_time(args.batch, args.steps, args.rounds, replay=True))

    # the server's generator thread (loads the model, runs every step, in inference mode)
    with torch_thread() as worker:
        h, warm = worker.submit(on_generator_thread).result()
    print(f"host time per decode step at batch {args.batch} (tiny BLOOM, 1 torch thread, "
          f"model forward and LM head excluded; median of {args.rounds} rounds of "
          f"{args.steps} steps, the rounds' p50s "
          f"{' / '.join(f'{x * 1e3:.2f}' for x in h['host_p50_rounds'])} ms): "
          f"p50 {h['host_p50'] * 1e3:.2f} ms, p90 {h['host_p90'] * 1e3:.2f} ms (goal < 1 ms); "
          f"of which the CPU attention plan p50 {h['plan_p50'] * 1e3:.2f} ms; with the NPU "
          f"backend's plan instead (the NPU path's host work) p50 {h['npu_path_p50'] * 1e3:.2f} "
          f"ms, p90 {h['npu_path_p90'] * 1e3:.2f} ms; whole step p50 {h['step_p50'] * 1e3:.2f} ms")
    print(f"the same with the forward and LM head replayed instead of run (nothing runs between "
          f"two steps' host parts, which then find their code and data in the CPU caches: the "
          f"host work alone): p50 {warm['host_p50'] * 1e3:.2f} ms, p90 {warm['host_p90'] * 1e3:.2f}"
          f" ms; the NPU path's p50 {warm['npu_path_p50'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
