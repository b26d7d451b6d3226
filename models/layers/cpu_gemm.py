"""How a float32 linear runs on this CPU: the kernel for a plain weight by row count, and whether
the decoder linears are worth reordering into oneDNN's blocked layout at load. Which is fastest
depends on the machine (measured below), so it is measured once per process, at the load of the
first float32 CPU model big enough for it to matter (``calibrate``), unless the operator names
a choice (``TGI_NPU_CPU_GEMM``).

Kernels for rows ``x`` ``[T, in]`` and a plain weight ``W`` ``[out, in]``:

* ``onednn``: ``mkldnn._linear_pointwise(x, W)``, what Inductor uses on the CPU.
* ``mkl``: ``F.linear(x, W)``, MKL's sgemm.
* ``swapped``: ``(W @ x^T)^T``, i.e. ``F.linear(W, x)`` and one transposing copy that adds the
  bias. With a few rows, the weight becomes the GEMM's tall operand instead of its wide one.
* ``packed``: oneDNN on the weight reordered at load (``packing.pack``).
* ``swapped_chunks``: ``swapped`` over ``HEAD_CHUNK`` output rows at a time, each product
  transposed into the output while it is in cache. For a tall weight: an LM head's vocabulary.
* ``native``: ``device_kernels/cpu_gemm.c`` on the plain weight (AVX-512 CPUs with a C compiler;
  ``native_available``): tiles of weight rows stay in cache while every row of ``x`` passes over
  them, and the next tile is prefetched meanwhile.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tgi_npu_backend.kernels.cpu_native import linear_kernel
from torch import Tensor

Kernel = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN_LINEAR = _onednn_linear_available()


def onednn(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """oneDNN's linear; ``weight`` plain or reordered by ``packing.pack``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def mkl(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.linear(x, weight, bias)


def _swapped(x: Tensor, weight: Tensor, bias: Tensor | None, chunk: int | None) -> Tensor:
    """``x @ weight^T (+ bias)`` as ``(weight @ x^T)^T``, over ``chunk`` rows of ``weight`` at a
    time (None: all at once), each product transposed into its columns of the output."""
    rows = x.reshape(-1, x.shape[-1])
    n = weight.shape[0]
    out = torch.empty((rows.shape[0], n), dtype=torch.result_type(rows, weight), device=x.device)
    for start in range(0, n, chunk or max(n, 1)):
        stop = n if chunk is None else min(start + chunk, n)
        part_t = F.linear(weight[start:stop], rows).t()  # [T, stop - start], strided
        if bias is None:
            out[:, start:stop].copy_(part_t)
        else:
            torch.add(part_t, bias[start:stop], out=out[:, start:stop])
    return out.view(*x.shape[:-1], n)


def swapped(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight^T (+ bias)`` computed as ``(weight @ x^T)^T``."""
    return _swapped(x, weight, bias, None)


# NOTE: the whole swapped product of BLOOM-560m's head at 32 rows is [250880, 32], 32 MiB: its
# transposing copy reads it with a 128-byte stride, from beyond L2, and took 13-20 ms (40 ms in a
# slow spell). A chunk's [4096, 32] (512 KiB) transposes in L2. Chunks of 2k, 4k and 8k rows
# measured alike (the head alone, alternated); 4k is in the middle.
HEAD_CHUNK = 4096


def swapped_chunks(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight^T (+ bias)`` as ``swapped`` over ``HEAD_CHUNK`` rows of ``weight`` at a time."""
    return _swapped(x, weight, bias, HEAD_CHUNK)


def native_available() -> bool:
    """Whether ``native`` runs here (built on first call: ``device_kernels/cpu_native.py``)."""
    return linear_kernel() is not None


def native(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight^T (+ bias)`` through ``device_kernels/cpu_gemm.c``; only where ``native_available``."""
    kernel = linear_kernel()
    if kernel is None:
        raise RuntimeError("the native CPU linear is not available here (needs AVX-512 and a C compiler)")
    return kernel(x, weight, bias)


KERNELS: dict[str, Kernel] = {
    "onednn": onednn, "mkl": mkl, "swapped": swapped, "swapped_chunks": swapped_chunks,
    "native": native,
}


def available(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` less ``native`` where it does not run here."""
    return tuple(n for n in names if n != "native" or native_available())


SMALL_ROWS = 48  # up to this many rows a pass is "small" (a decode step), above "large" (a prefill)
# What one row (a batch-1 decode step) may run with (``native`` where it runs: its own one-row
# GEMV, not the tiles of the 2-48-row kernel).
ONE_ROW_KERNELS = ("swapped", "onednn", "mkl", "native")
HEAD_ONE_ROW_KERNELS = ("onednn", "mkl", "native")  # the LM head's one row (``calibrate_head``)


@dataclass(frozen=True)
class GemmProfile:
    """The float32 CPU choices: ``pack`` the decoder linears' weights at load; run a plain weight
    with ``small`` (up to ``SMALL_ROWS`` rows) or ``large``. ``measured``: what chose them."""

    pack: bool
    small: str = "onednn"
    large: str = "onednn"
    one: str | None = None  # for a single row (a batch-1 decode step); None: ``small``
    # for the LM head's plain float32 table at 2 .. SMALL_ROWS rows, and at one row (``head_profile``)
    head: str = "onednn"
    head_one: str = "onednn"
    measured: str = ""

    def kernel(self, rows: int) -> Kernel:
        if rows == 1 and self.one is not None:
            return KERNELS[self.one]
        return KERNELS[self.small if rows <= SMALL_ROWS else self.large]

    def head_profile(self) -> GemmProfile:
        """The LM head's kernels: ``head`` for a decode step's rows, ``head_one`` for one row,
        oneDNN for more than ``SMALL_ROWS`` (a prefill's prompt logprobs)."""
        return GemmProfile(pack=False, small=self.head, large="onednn", one=self.head_one)

    def describe(self) -> str:
        layout = "packed into oneDNN's layout" if self.pack else "plain"
        one = f" ({self.one} for one row)" if self.one not in (None, self.small) else ""
        how = (f"decoder weights {layout}; plain weights run {self.small}{one} up to {SMALL_ROWS} "
               f"rows, {self.large} above; the LM head {self.head} from 2 to {SMALL_ROWS} rows"
               f" ({self.head_one} for one row)")
        return how + (f" (measured: {self.measured})" if self.measured else "")


# NOTE: the first machine this project benchmarked on (2 cores, AVX-512 without AMX) ran the 96
# BLOOM-560m decoder projections at 32 rows in 134-144 ms packed against 224 ms plain through
# oneDNN, and oneDNN 1.25-1.9x faster than MKL at every row count: packed wins there. A later kind
# (2 cores, AVX512-FP16 and AMX), one layer's four projections over 24 layers' weights (out of
# cache), alternated: 1 row mkl 2.52 / swapped 2.64 / onednn 2.97 / packed 3.53 ms; 32 rows
# swapped 6.53 / packed 7.28 / onednn 8.23 / mkl 9.28 ms. In the model there (32 requests,
# alternated in one process): a 3,328-token prefill 16.4 s plain with MKL, 17.5 s plain with
# oneDNN, 18.5 s packed; a batch-32 decode step 556 ms plain (swapped) against 559 ms packed.
# The LM head (250,880 x 1,024, tied to the embedding): the swapped kernel's transposing copy of
# the whole [32, 250,880] logits took 13-20 ms, and a decode step with a swapped head measured 577
# against 559 ms with oneDNN's. In chunks (``swapped_chunks``), on the AMX kind, batch-32 decode
# steps alternated in one process: 427 against 445 ms and 396 against 415 ms (p50s; faster in 18
# of 28 pairs). Hence a measurement per machine, not a rule (``calibrate_head``).
PACKED = GemmProfile(pack=True)  # what a small model, or TGI_NPU_CPU_GEMM=packed, gets
# TGI_NPU_CPU_GEMM=plain
PLAIN = GemmProfile(pack=False, small="swapped", large="mkl", head="swapped_chunks")
MODES = ("auto", "packed", "plain")

PROBE_ROWS = (1, 32, 1024)  # a batch-1 decode step, a batch-32 one, a prefill's worth of rows
PROBE_MAX_OUT = 4096  # probe weights keep at most this many output rows of the real shape
COLD_BYTES = 128 * 2**20  # probe weights cycled through per timing: more than a large L3


def _seconds_per_call(run: Kernel, x: Tensor, weights: list[Tensor], bias: Tensor | None) -> float:
    start = time.perf_counter()
    for w in weights:
        run(x, w, bias)
    return (time.perf_counter() - start) / len(weights)


def _median_times(
    candidates: dict[int, tuple[str, ...]],
    setup: Callable[[str, int], tuple[Kernel, list[Tensor]]],
    in_features: int,
    repeats: int,
    generator: torch.Generator,
    bias: Tensor | None = None,
) -> dict[tuple[str, int], float]:
    """Median seconds per weight of each candidate kernel at each row count (``setup(name,
    rows)``: the kernel and the weights it runs over): one untimed call each first (first calls
    build oneDNN primitives), then the kernels alternated ``repeats`` times."""
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for rows, names in candidates.items():
            x = torch.randn(rows, in_features, generator=generator)
            for name in names:
                run, ws = setup(name, rows)
                run(x, ws[0], bias)
            for _ in range(repeats):
                for name in names:
                    run, ws = setup(name, rows)
                    times.setdefault((name, rows), []).append(_seconds_per_call(run, x, ws, bias))
    return {key: statistics.median(v) for key, v in times.items()}


@functools.lru_cache(maxsize=8)
def calibrate(out_features: int, in_features: int, repeats: int = 5) -> GemmProfile:
    """Time the kernels on random float32 weights shaped like ``[out_features, in_features]``
    (at most ``PROBE_MAX_OUT`` rows) at ``PROBE_ROWS`` rows, alternated ``repeats`` times (medians),
    and choose: for small passes the fastest plain kernel at 32 rows (``swapped``, ``onednn`` or,
    where it runs, ``native``), for one row the fastest of ``ONE_ROW_KERNELS`` at 1 row (``mkl``'s
    GEMV was 3-5% ahead of ``swapped`` there on the AMX machines, behind it at 32 rows; the native
    one-row GEMV within 3% of ``mkl`` on this single shape, either side), for large ones
    the faster at 1,024 rows (``mkl`` or ``onednn``), and packing when the packed weight beats
    those plain choices over 1 and 32 rows (geometric mean). Large
    passes do not decide the layout: they are compute-bound, and the layouts measured within ~10%
    of each other there on both machine kinds, against up to 60% at 32 rows. The few rows run over
    enough weights to leave the caches, as a model's step does. Once per shape and process; about
    2 s for BLOOM-560m's largest shape. (256 rows, tried first, favoured oneDNN where a 3,328-row
    prefill ran faster with MKL: 16.4 against 17.5 s.)
    """
    from .packing import pack  # packing imports the layers, which import this module

    n = min(out_features, PROBE_MAX_OUT)
    g = torch.Generator().manual_seed(0)
    copies = max(1, min(8, math.ceil(COLD_BYTES / (n * in_features * 4))))
    plain = [torch.randn(n, in_features, generator=g) for _ in range(copies)]
    packed = [pack(w) for w in plain]
    bias = torch.randn(n, generator=g)
    setups = {name: (run, plain) for name, run in KERNELS.items()} | {"packed": (onednn, packed)}
    candidates = {1: (*available(ONE_ROW_KERNELS), "packed"),
                  32: available(("swapped", "onednn", "packed", "native")), 1024: ("mkl", "onednn")}

    def setup(name: str, rows: int) -> tuple[Kernel, list[Tensor]]:
        run, ws = setups[name]
        return run, ws[: copies if rows < PROBE_ROWS[-1] else 1]  # a prefill's worth is compute-bound

    t = _median_times(candidates, setup, in_features, repeats, g, bias)

    def geo(name: str, rows: tuple[int, ...]) -> float:
        return math.exp(sum(math.log(t[name, r]) for r in rows) / len(rows))

    small = min((k for k in candidates[32] if k != "packed"), key=lambda k: t[k, 32])
    large = min(("mkl", "onednn"), key=lambda k: t[k, 1024])
    one = min(available(ONE_ROW_KERNELS), key=lambda k: t[k, 1])
    ratio = geo("packed", (1, 32)) / math.sqrt(t[one, 1] * t[small, 32])  # against what plain runs
    measured = "; ".join(
        f"{r} rows " + " ".join(f"{k} {t[k, r] * 1e3:.3f}" for k in candidates[r]) + " ms"
        for r in PROBE_ROWS
    ) + f"; packed / plain {ratio:.2f} on [{n}, {in_features}]"
    return GemmProfile(pack=ratio < 1.0, small=small, large=large, one=one, measured=measured)


HEAD_PROBE_ROWS = 32  # the head is timed at a batch-32 decode step's rows, and at one row


def calibrate_head(table: Tensor, repeats: int = 3) -> tuple[str, str, str]:
    """The fastest head kernels, timed on the LM head's own float32 table (no copy of it; too
    large to stay in cache), alternated ``repeats`` times (medians): at ``HEAD_PROBE_ROWS`` rows
    among ``onednn``, ``swapped_chunks`` and (where it runs) ``native``, and at one row among
    ``HEAD_ONE_ROW_KERNELS``. Returns (the first, the second, what was measured). About 1.5 s for
    BLOOM-560m's 250,880 x 1,024 table on 2 cores."""
    g = torch.Generator().manual_seed(0)
    candidates = {HEAD_PROBE_ROWS: available(("onednn", "swapped_chunks", "native")),
                  1: available(HEAD_ONE_ROW_KERNELS)}
    t = _median_times(candidates, lambda name, rows: (KERNELS[name], [table]), table.shape[1],
                      repeats, g)
    measured = f"LM head [{table.shape[0]}, {table.shape[1]}] " + "; ".join(
        f"at {rows} rows " + " ".join(f"{k} {t[k, rows] * 1e3:.1f}" for k in names) + " ms"
        for rows, names in candidates.items())
    head = min(candidates[HEAD_PROBE_ROWS], key=lambda k: t[k, HEAD_PROBE_ROWS])
    return head, min(candidates[1], key=lambda k: t[k, 1]), measured
