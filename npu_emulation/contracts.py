"""Documented preconditions of the torch_npu operators, each raising with the rule and its source.

Every failure is a ``ContractError`` (a RuntimeError, like the device's own errors) whose message
names the operator, the argument, the rule, and where the rule is written. Line numbers refer to
the files of the torch-npu 2.13.0 wheel (``schemas.WHEEL``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# --- sources ------------------------------------------------------------------------------------
PA_DOC = "torch_npu 2.13.0 _atb_api_docs.py, _npu_paged_attention_v2"
FA_DOC = "torch_npu 2.13.0 _atb_api_docs.py, _npu_flash_attention_v2"
PREFIX_DOC = "torch_npu 2.13.0 _atb_api_docs.py, _npu_flash_attention_prefix_v2"
# The non-_v2 ATB ops have no docstring in the wheel; they run the same ATB operations
# (PagedAttention, SelfAttention PA_ENCODER), whose shared rules are the _v2 docs plus the CANN
# ATB reference (hiascend.com ascendtbapi: PagedAttentionOperation "功能列表" and
# SelfAttentionOperation "calcType为PA_ENCODER时输入输出").
ATB_PA_REF = "CANN ATB PagedAttentionOperation reference (hiascend ascendtbapi, mask/contextLens table)"
ATB_SA_REF = "CANN ATB SelfAttentionOperation PA_ENCODER reference (hiascend ascendtbapi ascendtb_01_0281)"
RMS_DOC = "torch_npu 2.13.0 _op_plugin_docs.py, npu_rms_norm"
ADD_RMS_DOC = "op-plugin docs torch_npu.npu_add_rms_norm (参数说明/约束说明)"
ROTARY_DOC = "torch_npu 2.13.0 _op_plugin_docs.py, npu_rotary_mul 约束说明"
SOC_310P = (
    "torch_npu 2.13.0 _atb_api_docs.py, _npu_paged_attention_v2 lines 257/264/279 (Atlas 推理系列 "
    "= 310P: NZ caches, fp16 only)"
)

HALF = (torch.float16, torch.bfloat16)
NNAL_MESSAGE = (
    "Please check that the nnal package is installed. "
    "Please run 'source set_env.sh' in the NNAL installation path."
)


class ContractError(RuntimeError):
    """A documented precondition of a torch_npu operator is violated."""


def fail(op: str, arg: str, rule: str, source: str) -> None:
    raise ContractError(f"{op}: {arg}: {rule} [{source}]")


# --- generic checks -----------------------------------------------------------------------------


def nnal_present(op: str, nnal_missing: bool) -> None:
    """The real ATB wrappers load libop_plugin_atb.so lazily and re-raise on every call
    (torch_npu 2.13.0 op_plugin/atb/_atb_ops.py lines 59-88)."""
    if nnal_missing:
        cause = OSError("libatb.so: cannot open shared object file: No such file or directory")
        raise OSError(None, NNAL_MESSAGE) from cause


def dtype_in(op: str, name: str, t: Tensor, allowed: Sequence[torch.dtype], source: str) -> None:
    if t.dtype not in allowed:
        names = "/".join(str(d).removeprefix("torch.") for d in allowed)
        fail(op, name, f"dtype {str(t.dtype).removeprefix('torch.')} is not supported ({names})", source)


def half_tensors(op: str, tensors: dict[str, Tensor], family: str, source: str) -> None:
    """Each of ``tensors``: fp16/bf16 (fp16 only on 310P) and contiguous, checked in that order."""
    for name, t in tensors.items():
        dtype_in(op, name, t, HALF, source)
        soc_dtype(op, name, t, family)
        contiguous(op, name, t)


def same_dtype(op: str, tensors: dict[str, Tensor | None], source: str) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.dtype != first.dtype:
            fail(op, name, f"dtype {t.dtype} differs from {first_name}'s {first.dtype}: one dtype "
                 "across query/key/value/caches/mask/out", source)


def soc_dtype(op: str, name: str, t: Tensor, family: str) -> None:
    if family == "310P" and t.dtype == torch.bfloat16:
        fail(op, name, "bfloat16 is not supported on 310P (Atlas inference series): fp16 only",
             SOC_310P)


def nz_required(op: str, name: str, family: str) -> None:
    """310P runs the ATB attention ops on FRACTAL_NZ caches/masks; the emulation has only ND."""
    if family == "310P":
        fail(op, name, "310P (Atlas inference series) requires FRACTAL_NZ caches and masks "
             "([num_blocks, heads*head_size/16, block_size, 16]); an ND tensor was passed and the "
             "emulation models only the ND layout of A2/A3", SOC_310P)


def contiguous(op: str, name: str, t: Tensor | None) -> None:
    if t is not None and not t.is_contiguous():
        fail(op, name, f"must be contiguous (shape {tuple(t.shape)}, stride {t.stride()}): the ATB "
             "kernels read raw ND memory", "ATB ops take ND-format device tensors (_atb_api_docs.py "
             "'支持ND格式'); torch_npu passes the storage as is")


def ndim(op: str, name: str, t: Tensor, dims: Sequence[int], shape_doc: str, source: str) -> None:
    if t.dim() not in dims:
        fail(op, name, f"shape {tuple(t.shape)} must be {shape_doc}", source)


def int32(op: str, name: str, t: Tensor, source: str) -> None:
    if t.dtype != torch.int32:
        fail(op, name, f"dtype {t.dtype} must be int32", source)


def host(op: str, name: str, t: Tensor, source: str) -> None:
    """Lengths the ATB ops read on the host (NOTE: every tensor is a CPU tensor in the emulation,
    so this only fires for meta/other devices; on a device it is the real contract)."""
    if t.device.type != "cpu":
        fail(op, name, f"must be a host (CPU) tensor, got device {t.device}", source)


def lengths_tensor(op: str, name: str, t: Tensor, batch: int | None, source: str) -> list[int]:
    int32(op, name, t, source)
    host(op, name, t, source)
    ndim(op, name, t, (1,), "[batch]", source)
    if batch is not None and t.shape[0] != batch:
        fail(op, name, f"has {t.shape[0]} entries for {batch} sequences", source)
    return [int(x) for x in t.tolist()]


def positive_lengths(op: str, name: str, lens: Sequence[int], source: str) -> None:
    if not lens:
        fail(op, name, "empty: at least one sequence", source)
    for i, n in enumerate(lens):
        if n <= 0:
            fail(op, name, f"entry {i} is {n}: lengths must be positive", source)


def total_tokens(op: str, name: str, lens: Sequence[int], tokens: int, source: str) -> None:
    if sum(lens) != tokens:
        fail(op, name, f"sums to {sum(lens)} but the query has {tokens} tokens: nTokens is the sum "
             "of the per-sequence lengths", source)


def heads(op: str, num_heads: int, num_kv_heads: int, q_heads: int, kv_heads: int,
          source: str) -> int:
    """Checks num_heads/num_kv_heads against the shapes; returns the effective kv head count."""
    if num_heads <= 0:
        fail(op, "num_heads", f"is {num_heads}: must be set to the query head count (> 0)", source)
    if num_heads != q_heads:
        fail(op, "num_heads", f"is {num_heads} but query has {q_heads} heads", source)
    kv = num_kv_heads if num_kv_heads > 0 else num_heads  # ATB: kvHeadNum = 0 means headNum
    if kv != kv_heads:
        fail(op, "num_kv_heads", f"is {num_kv_heads} (= {kv} kv heads) but key/cache has "
             f"{kv_heads} heads", source)
    if num_heads % kv != 0:
        fail(op, "num_kv_heads", f"GQA needs num_heads % num_kv_heads == 0, got {num_heads} % {kv}",
             source)
    return kv


def block_size(op: str, bs: int, head_size_k: int, head_size_v: int, family: str, source: str,
               allow_256: bool) -> None:
    """_npu_paged_attention_v2 规格约束 lines 275-285."""
    exception_256 = allow_256 and family == "A2" and bs == head_size_k == head_size_v == 256
    if bs % 16 != 0 and not exception_256:
        fail(op, "key_cache.shape[1] (block_size)", f"block_size {bs} must be a multiple of 16 "
             "(line 275: block_size % 16 == 0)", source)
    if bs > 128 and not exception_256:
        fail(op, "key_cache.shape[1] (block_size)", f"block_size {bs} must be <= 128 (line 276; "
             "the only exception, line 285, is block_size = head_size = 256 on A2 for "
             "non-quantized BSND decode)", source)
    if family == "310P" and bs * head_size_k > 128 * 128:
        fail(op, "key_cache.shape[1] (block_size)", f"block_size * head_size = {bs * head_size_k} "
             "> 128*128 on 310P (line 280)", source)


def head_sizes(op: str, head_size_k: int, head_size_v: int, bs: int | None, source: str) -> None:
    """_npu_paged_attention_v2 lines 278/280, _npu_flash_attention_v2 line 361."""
    if head_size_k == head_size_v:
        if not 0 < head_size_k <= 256:
            fail(op, "head_size", f"{head_size_k} outside (0, 256] (equal K/V head sizes)", source)
    else:
        for name, hs in (("key head_size", head_size_k), ("value head_size", head_size_v)):
            if not 0 < hs <= 576:
                fail(op, name, f"{hs} outside (0, 576] (different K/V head sizes)", source)
        if bs is not None and max(head_size_k, head_size_v) > 256 and bs > 128:
            fail(op, "block_size", f"{bs} > 128 with a head_size above 256", source)


def block_table(op: str, table: Tensor, num_blocks: int, lens: Sequence[int], bs: int,
                source: str, rows: int | None = None) -> None:
    int32(op, "block_table", table, source)
    ndim(op, "block_table", table, (2,), "[batch, max_num_blocks_per_query]", source)
    contiguous(op, "block_table", table)
    if rows is not None and table.shape[0] != rows:
        fail(op, "block_table", f"has {table.shape[0]} rows for {rows} sequences", source)
    need = max(math.ceil(n / bs) for n in lens)
    if need > table.shape[1]:
        fail(op, "block_table", f"has {table.shape[1]} columns but a sequence of {max(lens)} "
             f"tokens needs {need} blocks of {bs}", source)
    if table.numel():
        lo, hi = int(table.min()), int(table.max())
        if lo < 0 or hi >= num_blocks:
            bad = lo if lo < 0 else hi
            fail(op, "block_table", f"holds block id {bad} outside the pool [0, {num_blocks}): "
                 "block_tables中元素的值须在[0, num_blocks)之间 (line 277)", source)


def paged_cache(op: str, name: str, cache: Tensor, source: str) -> tuple[int, int, int, int]:
    """ND cache [num_blocks, block_size, kv_heads, head_size] (A2/A3, line 256/263)."""
    ndim(op, name, cache, (4,), "ND [num_blocks, block_size, kv_heads, head_size] (A2/A3)", source)
    contiguous(op, name, cache)
    return tuple(cache.shape)  # type: ignore[return-value]


def out_tensor(op: str, out: Tensor, shape: tuple[int, ...], dtype: torch.dtype, source: str) -> None:
    if tuple(out.shape) != shape:
        fail(op, "out", f"shape {tuple(out.shape)} must be {shape} ([num_tokens, num_heads, "
             "head_size_v])", source)
    if out.dtype != dtype:
        fail(op, "out", f"dtype {out.dtype} must be the query's {dtype}", source)
    contiguous(op, "out", out)


def finite_or_neg_inf(op: str, name: str, t: Tensor, source: str) -> None:
    if bool(torch.isnan(t).any()) or bool((t == float("inf")).any()):
        fail(op, name, "holds NaN or +inf: an additive mask may hold only finite values and -inf",
             source)
