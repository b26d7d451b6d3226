"""The CPU path's native kernels, built on first use with the system's C compiler and loaded
with ctypes: the decode attention (``cpu_decode.c``), called by ``CpuBackend.decode`` for float32
caches; a float32 linear for a decode step's rows (``cpu_gemm.c``, AVX-512 only), which the
load-time calibration of ``models/layers/cpu_gemm.py`` may choose; and BLOOM's decoder blocks for
one token (``cpu_bloom.c``, AVX-512 only; it includes the other two), which
``models/bloom_one_token.py`` runs where it measures faster; and the all-greedy sampling step,
argmax and log_softmax in one call (``cpu_sample.c``, AVX-512 only), which ``logprobs.py`` runs on
float32 CPU scores. ``cpu_simd.h`` holds what the AVX-512 files share.

Why native: a decode step's attention reads each sequence's blocks once per layer, a few hundred
KiB per sequence. As PyTorch ops that is one ``bmm`` per run of blocks plus a dozen
batch-wide ops per layer, whose per-call cost, not the bytes, sets the time. Measured on the
2-core machine this project benchmarks on (``benchmarks/bench_decode_attention.py``, BLOOM-560m
shape, alternated): 32 sequences of 36-212 tokens, 24 layers, 57.5 against 148.6 ms; one
sequence 2.3 against 6.5 ms; the shard's whole decode step 423 against 550 ms at batch 32 and
118 against 132 ms at batch 1.

The build (each source its own library): ``cc -O3 -march=native -fopenmp -shared``, cached under
``$XDG_CACHE_HOME/tgi-npu-backend`` (else ``~/.cache``) by a hash of the source, the flags, the
compiler and the CPU's flags, written atomically (shards of one host may race to build it).
The kernel links to the OpenMP runtime torch already loaded (``libgomp.so.1``, found by its
soname), so it shares torch's thread pool rather than starting a second one. Where there is no
compiler, or the build fails, ``decode_kernel()`` returns None (logged once) and the backend
keeps its PyTorch decode: same results, slower; ``linear_kernel()`` returns None and the
calibration chooses among the other linears; ``bloom_kernel()`` returns None and BLOOM keeps its
PyTorch blocks; ``greedy_kernel()`` returns None and sampling keeps numpy's argmax and torch's
log_softmax.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from loguru import logger
from torch import Tensor

from tgi_npu_backend.user_cache import cache_home

SOURCE = Path(__file__).with_name("cpu_decode.c")
GEMM_SOURCE = Path(__file__).with_name("cpu_gemm.c")
BLOOM_SOURCE = Path(__file__).with_name("cpu_bloom.c")
SAMPLE_SOURCE = Path(__file__).with_name("cpu_sample.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120


def compiler() -> str | None:
    """The C compiler's path: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on PATH; None if none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _torch_lib_flags() -> list[str]:
    """Link against the OpenMP runtime shipped with torch when it ships one (its soname is the
    system's, so the loader reuses the copy torch loaded)."""
    lib = Path(torch.__file__).parent / "lib"
    if (lib / "libgomp.so.1").exists():
        return [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    return []


def _sources(source_path: Path) -> list[Path]:
    """``source_path`` and the files beside it that it includes (``#include "name.c"`` or
    ``"name.h"``), which the cache key must cover too."""
    found = [source_path]
    for line in source_path.read_text().splitlines():
        if line.startswith('#include "'):
            found += _sources(source_path.with_name(line.split('"')[1]))
    return found


def build(out_dir: Path | None = None, source_path: Path = SOURCE) -> Path:
    """The library compiled from ``source_path``, compiling it first unless cached. Raises
    RuntimeError with the compiler's output when it cannot be built."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    flags = [*FLAGS, *_torch_lib_flags()]
    source = b"\0".join(p.read_bytes() for p in _sources(source_path))
    key = hashlib.sha256(
        b"\0".join([source, " ".join(flags).encode(), cc.encode(), _cpu_flags().encode(),
                    platform.machine().encode()])
    ).hexdigest()[:16]
    out_dir = out_dir or cache_home()
    name = source_path.stem
    target = out_dir / f"{name}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run(  # noqa: PLW1510 (the return code is read below)
            [cc, *flags, "-o", tmp, str(source_path), "-lm"],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a racing shard finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _symbol(source_path: Path, name: str, what: str, log: Callable[[str], None] = logger.info):
    """The function ``name`` of the library built from ``source_path``; None, logged as ``what``
    has no native kernel, when it cannot be built or loaded."""
    try:
        return getattr(ctypes.CDLL(str(build(source_path=source_path))), name)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
        log(f"{what}: no native kernel ({err})")
        return None


_P, _I = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _I, _I, _P, _P, _I, _P, _I, _P, _P, ctypes.c_float, _I, _I, _I, _I, _I, _P, ctypes.c_int]

DecodeKernel = Callable[..., Tensor]


def _decode(fn) -> DecodeKernel:
    """``paged_decode_f32`` as ``kernel(query, key_cache, value_cache, block_tables, seq_lens,
    scale, alibi_slopes) -> [B, heads, head_dim]`` float32."""
    fn.argtypes = _ARGTYPES
    fn.restype = ctypes.c_int64

    def decode(
        query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
        seq_lens: Tensor, scale: float, alibi_slopes: Tensor | None,
    ) -> Tensor:
        b, heads, d = query.shape
        num_blocks, kv_heads, bs, _ = key_cache.shape
        if query.dtype != torch.float32 or query.stride(2) != 1:
            query = query.float().contiguous()
        if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
            raise ValueError("the native decode kernel needs contiguous KV caches")
        table = block_tables.to(torch.int32).contiguous()
        lens = seq_lens.to(torch.int32).contiguous()
        slopes = None if alibi_slopes is None else alibi_slopes.float().contiguous()
        out = torch.empty((b, heads, d), dtype=torch.float32)
        rc = fn(
            query.data_ptr(), query.stride(0), query.stride(1),
            key_cache.data_ptr(), value_cache.data_ptr(), num_blocks,
            table.data_ptr(), table.shape[1], lens.data_ptr(),
            None if slopes is None else slopes.data_ptr(), scale,
            b, heads, kv_heads, bs, d, out.data_ptr(), torch.get_num_threads(),
        )
        if rc == -1 - b:
            raise MemoryError("the native decode kernel could not allocate its score buffers")
        if rc < 0:
            seq = -1 - rc
            raise IndexError(
                f"decode sequence {seq}: {int(lens[seq])} tokens do not fit its block table row "
                f"{table[seq].tolist()} in a cache of {num_blocks} blocks of {bs}"
            )
        return out

    return decode


@functools.lru_cache(maxsize=1)
def decode_kernel() -> DecodeKernel | None:
    """The native kernel, built and loaded once per process; None (logged) when it cannot be."""
    fn = _symbol(SOURCE, "paged_decode_f32", "CPU decode attention (PyTorch ops)", logger.warning)
    if fn is None:
        return None
    logger.info("CPU decode attention: native kernel (device_kernels/cpu_decode.c)")
    return _decode(fn)


# ---------------------------------------------------------------------------------- the linear
LinearKernel = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
_LINEAR_ARGTYPES = [_P, _I, _P, _I, _P, _P, _I, _I, _I, ctypes.c_int]


def _linear(fn) -> LinearKernel | None:
    """``linear_nt_f32`` as ``kernel(x, weight, bias) = F.linear(x, weight, bias)`` for float32
    CPU tensors; None when its library was built without AVX-512 (it says so)."""
    fn.argtypes = _LINEAR_ARGTYPES
    fn.restype = ctypes.c_int64
    probe, probe_out = torch.zeros(1, 1), torch.empty(1, 1)  # both alive across the call
    if fn(probe.data_ptr(), 1, probe.data_ptr(), 1, None, probe_out.data_ptr(), 1, 1, 1, 1) < 0:
        return None

    def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not (x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)):
            raise TypeError(f"the native CPU linear takes float32 only, not {x.dtype} x {weight.dtype}")
        k = x.shape[-1]
        rows = x.reshape(-1, k)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        if weight.stride(-1) != 1:  # rows of the weight may be apart, not its elements
            weight = weight.contiguous()
        if bias is not None:
            bias = bias.contiguous()
        n = weight.shape[0]
        out = torch.empty((rows.shape[0], n), dtype=torch.float32, device=x.device)
        fn(rows.data_ptr(), rows.stride(0), weight.data_ptr(), weight.stride(0),
           None if bias is None else bias.data_ptr(), out.data_ptr(), rows.shape[0], n, k,
           torch.get_num_threads())
        return out.view(*x.shape[:-1], n)

    return linear


@functools.lru_cache(maxsize=1)
def linear_kernel() -> LinearKernel | None:
    """The native linear, built and loaded once per process; None (logged) where it cannot be
    built or this CPU has no AVX-512."""
    fn = _symbol(GEMM_SOURCE, "linear_nt_f32", "CPU linears")
    kernel = None if fn is None else _linear(fn)
    if fn is not None and kernel is None:
        logger.info("CPU linears: no native kernel (built without AVX-512)")
    return kernel


# ---------------------------------------------------------------------------------- BLOOM's blocks
class BloomBlock(ctypes.Structure):
    """``struct bloom_block`` of ``cpu_bloom.c``: one block's float32 weights and KV cache."""

    _fields_ = [(name, _P) for name in (
        "ln1_w", "ln1_b", "qkv_w", "qkv_b", "dense_w", "dense_b",
        "ln2_w", "ln2_b", "up_w", "up_b", "down_w", "down_b")] + [
        (name, _I) for name in ("qkv_ld", "dense_ld", "up_ld", "down_ld")] + [
        ("key_cache", _P), ("value_cache", _P)]


class BloomStep(ctypes.Structure):
    """``struct bloom_step`` of ``cpu_bloom.c``: the shapes, the one sequence of the step, and the
    token with the embedding table and the LayerNorms around the blocks."""

    _fields_ = [
        *[(name, _I) for name in ("hidden", "inter", "heads", "head_dim", "block_size", "num_blocks")],
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("residual_after_norm", ctypes.c_int32),
        ("slopes", _P), ("table", _P), ("max_blocks", _I), ("len", ctypes.c_int32), ("slot", _I),
        ("scratch", _P), ("nthreads", ctypes.c_int),
        *[(name, _P) for name in ("embed", "embed_ln_w", "embed_ln_b", "final_ln_w", "final_ln_b")],
        ("vocab", _I), ("token", _I),
    ]


# bloom_token_f32's return codes (cpu_bloom.c)
BLOOM_OK, BLOOM_BAD_SLOT, BLOOM_BAD_TABLE, BLOOM_NO_MEMORY, BLOOM_NO_AVX512, BLOOM_BAD_TOKEN = 0, -1, -2, -3, -4, -5


@functools.lru_cache(maxsize=1)
def bloom_kernel() -> Callable[..., int] | None:
    """``bloom_token_f32(out_ptr, blocks, count, step) -> code`` (``cpu_bloom.c``), built and
    loaded once per process; None (logged) where it cannot be built or this CPU has no AVX-512."""
    fn = _symbol(BLOOM_SOURCE, "bloom_token_f32", "BLOOM one-token blocks")
    if fn is None:
        return None
    fn.argtypes = [_P, ctypes.POINTER(BloomBlock), _I, ctypes.POINTER(BloomStep)]
    fn.restype = ctypes.c_int64
    if fn(None, None, 0, ctypes.byref(BloomStep(slot=-1))) == BLOOM_NO_AVX512:
        logger.info("BLOOM one-token blocks: no native kernel (built without AVX-512)")
        return None
    return fn


# ---------------------------------------------------------------------------------- greedy sampling
GreedyKernel = Callable[[Tensor], "tuple[Tensor, Tensor] | None"]


@functools.lru_cache(maxsize=1)
def greedy_kernel() -> GreedyKernel | None:
    """``kernel(scores) -> (ids, logprobs)``: per row of float32 CPU ``scores`` [B, V], the first
    index of its maximum (int64, as numpy's ``argmax``) and ``log_softmax`` (``cpu_sample.c``);
    None from the kernel where a row holds a NaN or +inf or only -inf (the caller's torch ops
    decide those). Built and loaded once per process; None (logged) where it cannot be built or
    this CPU has no AVX-512."""
    fn = _symbol(SAMPLE_SOURCE, "log_softmax_argmax_f32", "greedy sampling")
    if fn is None:
        return None
    fn.argtypes = [_P, _I, _I, _P, _P, ctypes.c_int]
    fn.restype = ctypes.c_int64
    if fn(None, 0, 0, None, None, 1) == -4:
        logger.info("greedy sampling: no native kernel (built without AVX-512)")
        return None

    def greedy(scores: Tensor) -> tuple[Tensor, Tensor] | None:
        if scores.dtype != torch.float32 or scores.dim() != 2 or not scores.is_contiguous():
            raise TypeError(f"the native greedy step takes contiguous float32 [B, V] scores, not "
                            f"{scores.dtype} {list(scores.shape)}")
        rows, cols = scores.shape
        logprobs = torch.empty_like(scores)
        ids = torch.empty(rows, dtype=torch.int64)
        rc = fn(scores.data_ptr(), rows, cols, logprobs.data_ptr(), ids.data_ptr(), torch.get_num_threads())
        if rc == -3:
            raise MemoryError("the native greedy step could not allocate its per-chunk sums")
        return (ids, logprobs) if rc == 0 else None

    return greedy
