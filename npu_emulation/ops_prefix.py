"""``torch_npu.atb._npu_flash_attention_prefix_v2``: a prompt's new tokens attending to its cached
prefix plus themselves, all read from the paged cache (SelfAttention PREFIX_ENCODER).

seq_len = new (query) tokens per sequence, context_lens = all tokens in the cache per sequence
(prefix + new: this pass's K/V must already be stored); the prefix ``context_lens - seq_len`` must
be a multiple of 128 (_atb_api_docs.py lines 415/440). Query token i of a sequence sits at position
``prefix + i`` and sees keys ``0 .. prefix + i`` (the golden of op-plugin
test_atb_flash_attention_prefix_v2.py reads ``mask[..., kv - q : kv, :kv]``).

NOTE: _atb_api_docs.py documents 'Tensor seq_len, Tensor context_lens'; the .so registers
'SymInt[] seq_len, SymInt[] context_lens' (schemas.DOC_DIFFERENCES): the binary wins.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import contracts as c
from . import oracle
from .calls import begin, maybe_oom, nan_fill, perturb
from .masks import alibi_compress_256
from .ops_flash import _compressed_alibi, _heads_view

PFX = "_npu_flash_attention_prefix_v2"
SRC = c.PREFIX_DOC


def _cache_view(name: str, cache: Tensor, kv_heads: int) -> Tensor:
    """[num_blocks, block_size, kv_hidden] or [num_blocks, block_size, kv_heads, head_size]."""
    c.ndim(PFX, name, cache, (3, 4), "[numBlocks, blockSize, kvHiddenSize] or [numBlocks, "
           "blockSize, headNum, headSize]", SRC + " line 417")
    c.contiguous(PFX, name, cache)
    if cache.dim() == 4:
        return cache
    if cache.shape[2] % kv_heads:
        c.fail(PFX, name, f"kvHiddenSize {cache.shape[2]} is not a multiple of {kv_heads} heads", SRC)
    return cache.view(*cache.shape[:2], kv_heads, cache.shape[2] // kv_heads)


def flash_attention_prefix_v2(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                              block_table: Tensor, mask: Tensor, seq_len: list[int],
                              context_lens: list[int], *, slopes: Tensor | None = None,
                              kernel_type: int = 1, mask_type: int = 3, num_kv_heads: int = 0,
                              num_heads: int = 0, scale_value: float = 1.0, out: Tensor) -> Tensor:
    st = begin(PFX)
    st.record_mask(f"{PFX}.mask", mask)
    st.record_mask(f"{PFX}.slopes", slopes)
    family = st.settings.family
    if kernel_type != 1:
        c.fail(PFX, "kernel_type", f"{kernel_type}: only 1 (KERNELTYPE_HIGH_PRECISION)",
               SRC + " lines 426/436")
    if mask_type not in (3, 4, 5):
        c.fail(PFX, "mask_type", f"{mask_type}: only 3 (NORM_COMPRESS), 4 (ALIBI_COMPRESS), "
               "5 (ALIBI_COMPRESS_SQRT)", SRC + " lines 411/445")
    if mask_type == 5:
        c.fail(PFX, "mask_type", "5 (ALiBi compress sqrt) is not emulated", SRC)
    c.half_tensors(PFX, {"query": query, "key_cache": key_cache, "value_cache": value_cache,
                         "mask": mask}, family, SRC + " lines 416-420")
    c.same_dtype(PFX, {"query": query, "key_cache": key_cache, "value_cache": value_cache,
                       "mask": mask}, SRC)
    c.nz_required(PFX, "key_cache", family)
    if tuple(key_cache.shape) != tuple(value_cache.shape):
        c.fail(PFX, "value_cache", f"shape {tuple(value_cache.shape)} must equal key_cache's "
               f"{tuple(key_cache.shape)}", SRC + " line 418")
    kv_count = num_kv_heads if num_kv_heads > 0 else num_heads
    q = _heads_view(PFX, "query", query, num_heads, SRC + " line 416")
    kc = _cache_view("key_cache", key_cache, max(kv_count, 1))
    vc = _cache_view("value_cache", value_cache, max(kv_count, 1))
    nb, bs, kvh, hs = kc.shape
    c.heads(PFX, num_heads, num_kv_heads, q.shape[1], kvh, SRC + " lines 441-444")
    if q.shape[2] != hs:
        c.fail(PFX, "query", f"head_size {q.shape[2]} differs from the cache's {hs}", SRC)
    if hs > 128 or hs % 16:
        c.fail(PFX, "head_size", f"{hs}: must be a multiple of 16 and <= 128",
               SRC + " lines 415/417")
    if bs != 128:
        c.fail(PFX, "key_cache.shape[1] (block_size)", f"{bs}: blockSize must be 128",
               SRC + " line 417")
    lens_src = SRC + " lines 421-422"
    c.positive_lengths(PFX, "seq_len", seq_len, lens_src)
    c.positive_lengths(PFX, "context_lens", context_lens, lens_src)
    if len(seq_len) != len(context_lens):
        c.fail(PFX, "context_lens", f"{len(context_lens)} entries for {len(seq_len)} sequences",
               lens_src)
    c.total_tokens(PFX, "seq_len", seq_len, q.shape[0], lens_src)
    for i, (n_q, n_kv) in enumerate(zip(seq_len, context_lens)):
        if n_q > n_kv or (n_kv - n_q) % 128:
            c.fail(PFX, "context_lens", f"sequence {i}: prefix = context_lens - seq_len = "
                   f"{n_kv} - {n_q} must be >= 0 and a multiple of 128", SRC + " lines 415/440")
    c.block_table(PFX, block_table, nb, context_lens, bs, SRC + " line 419", rows=len(seq_len))
    if out.dim() != query.dim():
        c.fail(PFX, "out", f"shape {tuple(out.shape)} must match the query's layout", SRC + " line 431")
    o = _heads_view(PFX, "out", out, num_heads, SRC + " line 431")
    c.out_tensor(PFX, o, tuple(q.shape), query.dtype, SRC + " line 431")
    if mask_type == 3:
        _check_norm_compress(mask)
        neg = None
    else:
        neg = alibi_compress_256(PFX, mask, slopes, num_heads, SRC + " lines 420/425")
    maybe_oom(st, PFX)
    nan_fill(o)
    start = 0
    for b, (n_q, n_kv) in enumerate(zip(seq_len, context_lens)):
        k = oracle.gather_paged(kc, block_table[b], n_kv)
        v = oracle.gather_paged(vc, block_table[b], n_kv)
        first = n_kv - n_q
        if neg is None:
            bias, visible = None, oracle.causal(torch.arange(first, n_kv), n_kv)[None]
        else:
            bias, visible = _compressed_alibi(neg, n_kv, first)
        res = oracle.attention(q[start : start + n_q], k, v, scale_value, bias=bias, visible=visible)
        o[start : start + n_q] = res.to(o.dtype)
        start += n_q
    perturb(st, PFX, o)
    return out


def _check_norm_compress(mask: Tensor) -> None:
    """[128, 128] causal triangle; the kernel is high precision, so 1 = masked, 0 = keep (ATB
    SelfAttention reference: high precision + MASK_TYPE_NORM_COMPRESS -> mask value 1)."""
    if tuple(mask.shape) != (128, 128):
        c.fail(PFX, "mask", f"shape {tuple(mask.shape)} must be [128, 128] for mask_type=3",
               SRC + " line 420")
    upper = torch.ones(128, 128, dtype=torch.bool).triu(1)
    expected = upper.to(torch.float64)
    if not bool((mask.to(torch.float64) == expected).all()):
        c.fail(PFX, "mask", "mask_type=3 (NORM_COMPRESS) with the high-precision kernel takes the "
               "causal triangle with 1 above the diagonal and 0 elsewhere (other shapes of the "
               "compressed mask are not documented: confirm on a device)",
               c.ATB_SA_REF + "; " + SRC + " line 420")
