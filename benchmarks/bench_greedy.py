"""The all-greedy sampling step on the CPU: the native kernel (``device_kernels/cpu_sample.c``)
against numpy's argmax plus torch's ``log_softmax``, what the chooser ran before it (a script, not
a test).

For each batch size, float32 scores over a ``--vocab``-token vocabulary (BLOOM's 250,880 by
default), the two alternated ``--rounds`` times; prints each one's median time and the ratio, and
checks that both pick the same ids.

    python benchmarks/bench_greedy.py                  # batches 1, 8 and 32 (~10 s)
    python benchmarks/bench_greedy.py --batches 1 2 4 --vocab 256000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tgi_npu_backend.kernels.cpu_native import greedy_kernel

from tgi_npu_backend.logprobs import argmax


def timed(fn, scores: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn(scores)``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(scores)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def numpy_and_torch(scores: torch.Tensor):
    return argmax(scores), torch.log_softmax(scores, dim=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--vocab", type=int, default=250880)
    p.add_argument("--rounds", type=int, default=4, help="alternations of the two")
    p.add_argument("--repeats", type=int, default=30, help="calls per round")
    args = p.parse_args()
    kernel = greedy_kernel()
    if kernel is None:
        raise SystemExit("no native greedy kernel here (it needs AVX-512 and a C compiler)")
    print(f"float32 scores, vocabulary {args.vocab}, torch threads {torch.get_num_threads()}")
    for batch in args.batches:
        scores = torch.randn(batch, args.vocab, generator=torch.Generator().manual_seed(batch)) * 4
        native = kernel(scores)
        assert native is not None and native[0].tolist() == argmax(scores).tolist()
        before, after = [], []
        for _ in range(args.rounds):
            before.append(timed(numpy_and_torch, scores, args.repeats))
            after.append(timed(kernel, scores, args.repeats))
        old, new = statistics.median(before), statistics.median(after)
        print(f"batch {batch:3d}: numpy argmax + torch log_softmax {old * 1e3:.3f} ms, native "
              f"{new * 1e3:.3f} ms ({old / new:.2f}x)")


if __name__ == "__main__":
    main()
