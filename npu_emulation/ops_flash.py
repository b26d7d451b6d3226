"""Prefill attention without a cache: ``_npu_flash_attention`` (NORM mask) and
``atb._npu_flash_attention_v2`` (no mask / NORM / ALiBi / compressed ALiBi). The prefix op over the
paged cache is in ``ops_prefix.py``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import contracts as c
from . import oracle
from .calls import begin, maybe_oom, nan_fill, perturb
from .masks import additive_mask_values, alibi_compress_256, norm_mask

FA = "_npu_flash_attention"
FA2 = "_npu_flash_attention_v2"
PFX = "_npu_flash_attention_prefix_v2"


def _heads_view(op: str, name: str, t: Tensor, heads: int, src: str) -> Tensor:
    """[T, hidden] -> [T, heads, hidden / heads]; [T, heads, D] as is."""
    c.ndim(op, name, t, (2, 3), "[num_tokens, hidden] or [num_tokens, heads, head_size]", src)
    if t.dim() == 3:
        return t
    if heads <= 0 or t.shape[1] % heads:
        c.fail(op, name, f"hidden size {t.shape[1]} is not a multiple of {heads} heads", src)
    return t.view(t.shape[0], heads, t.shape[1] // heads)


def _check_qkv(op: str, family: str, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
               mask: Tensor | None, src: str) -> None:
    c.half_tensors(op, {"query": query, "key": key, "value": value}, family, src)
    c.contiguous(op, "mask", mask)
    c.same_dtype(op, {"query": query, "key": key, "value": value, "mask": mask}, src)
    if mask is not None:
        c.nz_required(op, "mask", family)


def _run_sequences(query: Tensor, key: Tensor, value: Tensor, lens: Sequence[int], scale: float,
                   out: Tensor, mask_of) -> None:
    """Self-attention of each packed sequence; ``mask_of(b, n)`` -> (bias, visible) or Nones."""
    start = 0
    for b, n in enumerate(lens):
        bias, visible = mask_of(b, n)
        res = oracle.attention(query[start : start + n], key[start : start + n],
                               value[start : start + n], scale, bias=bias, visible=visible)
        out[start : start + n] = res.to(out.dtype).reshape(out[start : start + n].shape)
        start += n


def _norm_mask_of(op: str, mask: Tensor, lens: Sequence[int], flag: bool, src: str):
    """[S, S] shared or [batch, S, S] per sequence; the kernel reads mask[..., :n, :n]."""
    longest = max(lens)
    shared = mask.dim() == 2
    if mask.dim() not in (2, 3) or (mask.dim() == 3 and mask.shape[0] != len(lens)) \
            or mask.shape[-1] < longest or mask.shape[-2] < longest:
        c.fail(op, "mask", f"shape {tuple(mask.shape)} must be [max_seq_len, max_seq_len] or "
               f"[batch={len(lens)}, max_seq_len, max_seq_len] with max_seq_len >= {longest}",
               src)
    bias, visible = norm_mask(op, "mask", mask, flag, src)
    pick = (lambda t, b, n: t[:n, :n]) if shared else (lambda t, b, n: t[b, :n, :n])
    return lambda b, n: (None if bias is None else pick(bias, b, n),
                         None if visible is None else pick(visible, b, n))


def flash_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, seq_len: Tensor,
                    scale_value: float, num_heads: int, num_kv_heads: int, out: Tensor) -> None:
    """Prefill without a cache (SelfAttention PA_ENCODER, MASK_TYPE_NORM)."""
    st = begin(FA)
    src = c.ATB_SA_REF + "; " + c.FA_DOC + " (same operation)"
    st.record_mask(f"{FA}.mask", mask)
    family = st.settings.family
    _check_qkv(FA, family, query, key, value, out, mask, src)
    lens = c.lengths_tensor(FA, "seq_len", seq_len, None, c.ATB_SA_REF + ": seqlen int32 on cpu")
    _shared_prefill_checks(FA, family, query, key, value, out, lens, num_heads, num_kv_heads, src)
    mask_of = _norm_mask_of(FA, mask, lens, query.dtype == torch.bfloat16, src)
    maybe_oom(st, FA)
    nan_fill(out)
    _run_sequences(query, key, value, lens, scale_value, out, mask_of)
    perturb(st, FA, out)


def _shared_prefill_checks(op: str, family: str, query: Tensor, key: Tensor, value: Tensor,
                           out: Tensor, lens: Sequence[int], num_heads: int, num_kv_heads: int,
                           src: str) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        c.ndim(op, name, t, (3,), "[num_tokens, heads, head_size]", src)
    c.positive_lengths(op, "seq_len", lens, src)
    c.total_tokens(op, "seq_len", lens, query.shape[0], src + " line 365")
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
        c.fail(op, "key/value", f"have {key.shape[0]}/{value.shape[0]} tokens for the query's "
               f"{query.shape[0]}", src)
    kv = c.heads(op, num_heads, num_kv_heads, query.shape[1], key.shape[1], src + " line 375")
    if value.shape[1] != kv:
        c.fail(op, "value", f"has {value.shape[1]} heads, key has {kv}", src)
    if key.shape[2] != query.shape[2]:
        c.fail(op, "key", f"head_size {key.shape[2]} differs from the query's {query.shape[2]}", src)
    c.head_sizes(op, key.shape[2], value.shape[2], None, src + " line 361")
    if family == "310P" and len(lens) > 2000:
        c.fail(op, "seq_len", f"batch {len(lens)} > 2000 on 310P", src + " line 358")
    c.out_tensor(op, out, (query.shape[0], num_heads, value.shape[2]), query.dtype,
                 src + " line 352")


def flash_attention_v2(query: Tensor, key: Tensor, value: Tensor, seq_len: list[int], *,
                       mask: Tensor | None = None, slopes: Tensor | None = None,
                       kernel_type: int = 0, mask_type: int = 2, scale_value: float = 1.0,
                       num_heads: int = 0, num_kv_heads: int = 0, out: Tensor) -> Tensor:
    st = begin(FA2)
    src = c.FA_DOC
    family = st.settings.family
    st.record_mask(f"{FA2}.mask", mask)
    st.record_mask(f"{FA2}.slopes", slopes)
    if kernel_type not in (0, 1):
        c.fail(FA2, "kernel_type", f"{kernel_type}: 0 (default) or 1 (high precision)", src + " line 347")
    if mask_type not in (0, 1, 2, 4, 5, 6):
        c.fail(FA2, "mask_type", f"{mask_type}: supported 0, 1, 2, 4, 5, 6", src + " lines 321/348")
    if mask_type in (5, 6):
        c.fail(FA2, "mask_type", f"{mask_type} (ALiBi compress sqrt / left align) is not emulated",
               src + " line 321")
    if query.dim() != key.dim() or query.dim() != value.dim():
        c.fail(FA2, "query/key/value", "must have the same number of dimensions", src + " line 374")
    kv_count = num_kv_heads if num_kv_heads > 0 else num_heads
    q = _heads_view(FA2, "query", query, num_heads, src + " line 356")
    k = _heads_view(FA2, "key", key, kv_count, src + " line 356")
    v = _heads_view(FA2, "value", value, kv_count, src + " line 356")
    if out.dim() != query.dim():
        c.fail(FA2, "out", f"shape {tuple(out.shape)} must match the query's layout", src + " line 352")
    o = _heads_view(FA2, "out", out, num_heads, src + " line 352")
    _check_qkv(FA2, family, q, k, v, o, mask, src)
    lens = [int(n) for n in seq_len]
    _shared_prefill_checks(FA2, family, q, k, v, o, lens, num_heads, num_kv_heads, src)
    flag = query.dtype == torch.bfloat16 or kernel_type == 1
    if mask_type == 0:
        if mask is not None:
            c.fail(FA2, "mask", "passed with mask_type=0 (UNDEFINED: no mask)", c.ATB_SA_REF)
        mask_of = lambda b, n: (None, None)  # noqa: E731  (no mask: every key of the sequence)
    elif mask is None:
        c.fail(FA2, "mask", f"required with mask_type={mask_type}", src + " lines 332-345")
    elif mask_type == 1:
        mask_of = _norm_mask_of(FA2, mask, lens, flag, src + " lines 333-334")
    elif mask_type == 2:
        mask_of = _alibi_mask_of(mask, lens, num_heads, src)
    else:  # 4: compressed ALiBi
        if q.shape[2] > 128 or v.shape[2] > 128:
            c.fail(FA2, "head_size", f"{max(q.shape[2], v.shape[2])} > 128 with a compressed "
                   "ALiBi mask", src + " line 343")
        if query.dtype == torch.float16 and kernel_type != 1:
            c.fail(FA2, "kernel_type", "fp16 with a compressed ALiBi mask needs kernel_type=1 "
                   "(high precision) on A2/A3", src + " line 345")
        neg = alibi_compress_256(FA2, mask, slopes, num_heads, src + " lines 337-346")
        mask_of = lambda b, n: _compressed_alibi(neg, n)  # noqa: E731
    maybe_oom(st, FA2)
    nan_fill(o)
    _run_sequences(q, k, v, lens, scale_value, o, mask_of)
    perturb(st, FA2, o)
    return out


def _alibi_mask_of(mask: Tensor, lens: Sequence[int], heads: int, src: str):
    """[batch, num_heads, S, S] (line 335); the kernel adds mask[b, :, :n, :n]."""
    longest = max(lens)
    if mask.dim() != 4 or tuple(mask.shape[:2]) != (len(lens), heads) \
            or mask.shape[2] < longest or mask.shape[3] < longest:
        c.fail(FA2, "mask", f"shape {tuple(mask.shape)}: mask_type=2 (ALiBi) documents only "
               f"[batch={len(lens)}, head_num={heads}, max_seq_len, max_seq_len] with "
               f"max_seq_len >= {longest} (a [head_num, S, S] mask is not documented for this op: "
               "to bound memory call once per sequence, or use mask_type=4)", src + " line 335")
    additive_mask_values(FA2, "mask", mask, src + " line 335")
    return lambda b, n: (mask[b, :, :n, :n], None)


def _compressed_alibi(neg_slopes: Tensor, n: int, first: int = 0):
    """Causal ALiBi for queries at positions first..n-1 over keys 0..n-1: slope*(j - i)."""
    pos_q = torch.arange(first, n)
    dist = (pos_q[:, None] - torch.arange(n)[None, :]).to(torch.float64)  # i - j
    return neg_slopes[:, None, None] * dist[None], oracle.causal(pos_q, n)[None]
