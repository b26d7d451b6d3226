"""Attention over the paged cache: ``_npu_paged_attention``, ``atb._npu_paged_attention_v2``
(decode, mask_type 0 and 2 = ALiBi) and ``_npu_paged_attention_splitfuse`` (mixed prefill)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import contracts as c
from . import oracle
from .calls import begin, maybe_oom, nan_fill, perturb
from .masks import additive_mask_values

PA = "_npu_paged_attention"
PA2 = "_npu_paged_attention_v2"
SF = "_npu_paged_attention_splitfuse"


def _check_paged(op: str, family: str, query: Tensor, key_cache: Tensor, value_cache: Tensor,
                 block_table: Tensor, kv_lens: Sequence[int], num_heads: int, num_kv_heads: int,
                 rows: int, out: Tensor, mask: Tensor | None, src: str) -> None:
    """What the three paged ops share (_npu_paged_attention_v2 docs lines 254-285)."""
    c.half_tensors(op, {"query": query, "key_cache": key_cache, "value_cache": value_cache},
                   family, src + " (int8 needs the quantized variants, not emulated)")
    c.same_dtype(op, {"query": query, "key_cache": key_cache, "value_cache": value_cache,
                      "mask": mask}, src)
    c.nz_required(op, "key_cache", family)
    c.ndim(op, "query", query, (3,), "[num_tokens, num_heads, head_size]", src + " line 254")
    nb, bs, kvh, hk = c.paged_cache(op, "key_cache", key_cache, src + " line 256")
    c.paged_cache(op, "value_cache", value_cache, src + " line 263")
    hv = value_cache.shape[3]
    if tuple(value_cache.shape[:3]) != (nb, bs, kvh):
        c.fail(op, "value_cache", f"shape {tuple(value_cache.shape)} does not match key_cache "
               f"{tuple(key_cache.shape)}", src)
    if query.shape[2] != hk:
        c.fail(op, "query", f"head_size {query.shape[2]} differs from key_cache's {hk}", src)
    c.heads(op, num_heads, num_kv_heads, query.shape[1], kvh, src + " lines 269/284")
    c.block_size(op, bs, hk, hv, family, src, allow_256=(op != SF))
    c.head_sizes(op, hk, hv, bs, src + " lines 278/280")
    c.positive_lengths(op, "context_lens", kv_lens, src + " line 259")
    if family == "310P" and len(kv_lens) > 2048:
        c.fail(op, "context_lens", f"batch {len(kv_lens)} > 2048 on 310P", src + " line 279")
    c.block_table(op, block_table, nb, kv_lens, bs, src + " lines 258/277", rows=rows)
    c.out_tensor(op, out, (query.shape[0], num_heads, hv), query.dtype, src + " line 272")


def _decode(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor,
            kv_lens: Sequence[int], scale: float, out: Tensor,
            bias_of: Callable[[int, int], Tensor] | None = None) -> None:
    for b, n in enumerate(kv_lens):
        k = oracle.gather_paged(key_cache, block_table[b], n)
        v = oracle.gather_paged(value_cache, block_table[b], n)
        bias = bias_of(b, n) if bias_of is not None else None
        out[b] = oracle.attention(query[b : b + 1], k, v, scale, bias=bias)[0].to(out.dtype)


def paged_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, num_kv_heads: int,
                    num_heads: int, scale_value: float, block_table: Tensor, context_lens: Tensor,
                    out: Tensor, *, workspace: Tensor | None = None) -> None:
    """Decode, one query token per sequence, no mask (ATB PagedAttention, maskType UNDEFINED)."""
    st = begin(PA)
    src = c.PA_DOC + " (same ATB PagedAttention operation)"
    lens = c.lengths_tensor(PA, "context_lens", context_lens, query.shape[0],
                            c.ATB_PA_REF + ": contextLens int32 [batch] on the host")
    _check_paged(PA, st.settings.family, query, key_cache, value_cache, block_table, lens,
                 num_heads, num_kv_heads, query.shape[0], out, None, src)
    maybe_oom(st, PA)
    nan_fill(out)
    _decode(query, key_cache, value_cache, block_table, lens, scale_value, out)
    perturb(st, PA, out)


def paged_attention_v2(query: Tensor, key_cache: Tensor, block_table: Tensor,
                       context_lens: list[int], *, value_cache: Tensor | None = None,
                       mask: Tensor | None = None, num_kv_heads: int = 0, num_heads: int = 0,
                       scale_value: float = 1.0, mask_type: int = 0,
                       workspace: Tensor | None = None, out: Tensor) -> Tensor:
    st = begin(PA2)
    src = c.PA_DOC
    st.record_mask(f"{PA2}.mask", mask)
    if value_cache is None:
        c.fail(PA2, "value_cache", "None (the MLA form that reads V from key_cache) is not "
               "emulated: pass value_cache", src + " line 262")
    if mask_type not in (0, 2):
        c.fail(PA2, "mask_type", f"{mask_type}: only 0 (UNDEFINED) and 2 (MASK_TYPE_ALIBI) are "
               "supported", src + " line 271")
    lens = [int(n) for n in context_lens]
    if len(lens) != query.shape[0]:
        c.fail(PA2, "context_lens", f"has {len(lens)} entries for {query.shape[0]} query tokens "
               "(one query token per sequence)", src + " line 259")
    _check_paged(PA2, st.settings.family, query, key_cache, value_cache, block_table, lens,
                 num_heads, num_kv_heads, query.shape[0], out, mask, src)
    bias_of = None
    if mask_type == 0 and mask is not None:
        c.fail(PA2, "mask", "passed with mask_type=0 (UNDEFINED means no mask)", src + " line 265")
    if mask_type == 2:
        if mask is None:
            c.fail(PA2, "mask", "required with mask_type=2 (ALiBi)", src + " line 265")
        c.contiguous(PA2, "mask", mask)
        batch, heads, longest = len(lens), num_heads, max(lens)
        ok4 = mask.dim() == 4 and tuple(mask.shape[:3]) == (batch, heads, 1)
        ok3 = mask.dim() == 3 and tuple(mask.shape[:2]) == (heads, 1)
        if not (ok4 or ok3) or mask.shape[-1] < longest:
            c.fail(PA2, "mask", f"shape {tuple(mask.shape)} must be [batch={batch}, num_heads="
                   f"{heads}, 1, max_seq_len>={longest}] or [num_heads, 1, max_seq_len]",
                   src + " line 266")
        additive_mask_values(PA2, "mask", mask, src)

        def bias_of(b: int, n: int) -> Tensor:  # [H, 1, n]: the kernel reads the first n columns
            return (mask[b] if ok4 else mask)[:, :, :n]

    maybe_oom(st, PA2)
    nan_fill(out)
    _decode(query, key_cache, value_cache, block_table, lens, scale_value, out, bias_of)
    perturb(st, PA2, out)
    return out


def paged_attention_splitfuse(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                              block_table: Tensor, context_lens: Tensor, mask: Tensor,
                              seq_len: Tensor, num_kv_heads: int, num_heads: int,
                              scale_value: float, out: Tensor) -> None:
    """Mixed prefill/decode over the cache (ATB PagedAttention CALC_TYPE_SPEC, MASK_TYPE_SPEC).

    context_lens = tokens in the cache per sequence (this pass's included), seq_len = query tokens
    per sequence (op-plugin test_atb_paged_attention_splitfuse.py; vllm-ascend v0.7.3).
    """
    st = begin(SF)
    src = c.ATB_PA_REF + " MASK_TYPE_SPEC; " + c.PA_DOC
    st.record_mask(f"{SF}.mask", mask)
    host_src = c.ATB_PA_REF + ": contextLens/qSeqLen int32 on the host"
    kv_lens = c.lengths_tensor(SF, "context_lens", context_lens, None, host_src)
    q_lens = c.lengths_tensor(SF, "seq_len", seq_len, len(kv_lens), host_src)
    c.positive_lengths(SF, "seq_len", q_lens, src)
    c.total_tokens(SF, "seq_len", q_lens, query.shape[0], src)
    for i, (q, n) in enumerate(zip(q_lens, kv_lens)):
        if q > n:
            c.fail(SF, "seq_len", f"sequence {i} has {q} query tokens but only {n} cached tokens "
                   "(context_lens counts this pass's tokens too)", src)
    _check_paged(SF, st.settings.family, query, key_cache, value_cache, block_table, kv_lens,
                 num_heads, num_kv_heads, len(kv_lens), out, mask, src)
    c.contiguous(SF, "mask", mask)
    if mask.dim() != 2 or mask.shape[0] != query.shape[0] or mask.shape[1] < max(kv_lens):
        c.fail(SF, "mask", f"shape {tuple(mask.shape)} must be [num_tokens={query.shape[0]}, "
               f"max_seq_len>={max(kv_lens)}]", c.ATB_PA_REF + " (MASK_TYPE_SPEC row)")
    additive_mask_values(SF, "mask", mask, src, masked_only=True)
    maybe_oom(st, SF)
    nan_fill(out)
    start = 0
    for b, (q, n) in enumerate(zip(q_lens, kv_lens)):
        k = oracle.gather_paged(key_cache, block_table[b], n)
        v = oracle.gather_paged(value_cache, block_table[b], n)
        bias = mask[start : start + q, :n][None]  # [1, q, n]: row = query token, column = key pos
        res = oracle.attention(query[start : start + q], k, v, scale_value, bias=bias)
        out[start : start + q] = res.to(out.dtype)
        start += q
    perturb(st, SF, out)
