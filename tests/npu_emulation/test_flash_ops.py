"""Prefill operators (no cache, and over a cached prefix) against plain dense attention."""

from __future__ import annotations

import pytest
import torch
from npu_dense import TOL, Paged, alibi_bias, bloom_slopes, causal_bias, dense

DTYPES = [torch.float16, torch.bfloat16]
HEADS = [(4, 4), (4, 2), (4, 1)]
LENS = [7, 33, 1]  # ragged, one single-token prompt


def _packed(lens, heads, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q = torch.randn(t, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    return q, k, v


def _check_per_sequence(out, q, k, v, lens, scale, bias_of, dtype):
    assert not torch.isnan(out).any()
    start = 0
    for b, n in enumerate(lens):
        sl = slice(start, start + n)
        ref = dense(q[sl], k[sl], v[sl], scale, bias_of(b, n))
        torch.testing.assert_close(out[sl].float(), ref, **TOL[dtype])
        start += n


def _norm_mask(s, dtype, fill):
    return torch.zeros(s, s).masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), fill).to(dtype)


@pytest.mark.parametrize("dtype,fill", [(torch.float16, -10000.0), (torch.float16, float("-inf")),
                                        (torch.float16, torch.finfo(torch.float32).min),
                                        (torch.bfloat16, 1.0)])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_flash_attention_causal_per_dtype_convention(emu, dtype, fill, heads, kv_heads, head_dim):
    import torch_npu

    q, k, v = _packed(LENS, heads, kv_heads, head_dim, dtype)
    out = torch.empty_like(q)
    torch_npu._npu_flash_attention(q, k, v, _norm_mask(max(LENS), dtype, fill),
                                   torch.tensor(LENS, dtype=torch.int32), head_dim**-0.5, heads,
                                   kv_heads, out)
    _check_per_sequence(out, q, k, v, LENS, head_dim**-0.5, lambda b, n: causal_bias(n, n), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_flash_attention_v2_alibi_4d_mask(emu, dtype, heads, kv_heads):
    import torch_npu

    q, k, v = _packed(LENS, heads, kv_heads, 64, dtype)
    slopes, s = bloom_slopes(heads), max(LENS)
    masked = -10000.0 if dtype == torch.float16 else float("-inf")  # op-plugin's golden values
    one = alibi_bias(slopes, s, s).clamp(min=masked)
    mask = one[None].expand(len(LENS), -1, -1, -1).contiguous().to(dtype)
    out = torch.empty_like(q)
    torch_npu.atb._npu_flash_attention_v2(q, k, v, LENS, mask=mask, kernel_type=0, mask_type=2,
                                          scale_value=0.125, num_heads=heads, num_kv_heads=kv_heads,
                                          out=out)
    _check_per_sequence(out, q, k, v, LENS, 0.125, lambda b, n: mask[b, :, :n, :n], dtype)
    assert emu.peak_mask_bytes == mask.numel() * mask.element_size()


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_v2_compressed_alibi_equals_full_alibi(emu, dtype):
    """mask_type=4 with op-plugin's [256, 256] construction and negated slopes: causal ALiBi over
    sequences longer than the mask."""
    import torch_npu

    lens, heads = [300, 20], 6
    q, k, v = _packed(lens, heads, 2, 64, dtype)
    i = torch.arange(256)
    mask = ((i[:, None] - i[None, :]).float() + 60000.0 * torch.ones(256, 256).triu(1)).to(dtype)
    slopes = bloom_slopes(heads)
    out = torch.empty_like(q)
    torch_npu.atb._npu_flash_attention_v2(q, k, v, lens, mask=mask, slopes=-slopes, kernel_type=1,
                                          mask_type=4, scale_value=0.125, num_heads=heads,
                                          num_kv_heads=2, out=out)
    _check_per_sequence(out, q, k, v, lens, 0.125, lambda b, n: alibi_bias(slopes, n, n), dtype)
    assert emu.peak_mask_bytes == 256 * 256 * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_v2_norm_and_no_mask(emu, dtype):
    import torch_npu

    q, k, v = _packed(LENS, 4, 2, 64, dtype)
    out = torch.empty_like(q)
    flag = _norm_mask(max(LENS), dtype, 1.0)  # high precision kernel: 1 = masked
    torch_npu.atb._npu_flash_attention_v2(q, k, v, LENS, mask=flag, kernel_type=1, mask_type=1,
                                          scale_value=0.125, num_heads=4, num_kv_heads=2, out=out)
    _check_per_sequence(out, q, k, v, LENS, 0.125, lambda b, n: causal_bias(n, n), dtype)
    torch_npu.atb._npu_flash_attention_v2(q, k, v, LENS, mask_type=0, scale_value=0.125,
                                          num_heads=4, num_kv_heads=2, out=out)
    _check_per_sequence(out, q, k, v, LENS, 0.125, lambda b, n: None, dtype)  # bidirectional


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
@pytest.mark.parametrize("alibi", [False, True])
def test_prefix_v2_new_tokens_over_a_cached_prefix(emu, dtype, heads, kv_heads, alibi):
    import torch_npu

    kv_lens, q_lens = [128 + 37, 256 + 5, 40], [37, 5, 40]  # prefixes of 128, 256 and 0 tokens
    paged = Paged(kv_lens, 128, kv_heads, 64, dtype)
    query = torch.randn(sum(q_lens), heads, 64).to(dtype)
    out = torch.empty_like(query)
    slopes = bloom_slopes(heads)
    if alibi:
        i = torch.arange(256)
        mask = torch.where(torch.ones(256, 256, dtype=torch.bool).triu(1),
                           torch.tensor(float("inf")), (i[:, None] - i[None, :]).float()).to(dtype)
        kw = dict(slopes=-slopes, mask_type=4)
    else:
        mask = torch.ones(128, 128).triu(1).to(dtype)
        kw = dict(mask_type=3)
    torch_npu.atb._npu_flash_attention_prefix_v2(
        query, paged.key_cache, paged.value_cache, paged.block_table, mask, q_lens, kv_lens,
        kernel_type=1, num_kv_heads=kv_heads, num_heads=heads, scale_value=0.125, out=out, **kw)
    start = 0
    for b, (n, q) in enumerate(zip(kv_lens, q_lens)):
        bias = alibi_bias(slopes, q, n) if alibi else causal_bias(q, n)
        ref = dense(query[start : start + q], paged.keys[b], paged.values[b], 0.125, bias)
        torch.testing.assert_close(out[start : start + q].float(), ref, **TOL[dtype])
        start += q


def test_prefix_v2_takes_3d_caches(emu):
    import torch_npu

    paged = Paged([128 + 3], 128, 2, 64, torch.float16)
    query = torch.randn(3, 4, 64).to(torch.float16)
    out = torch.empty_like(query)
    torch_npu.atb._npu_flash_attention_prefix_v2(
        query, paged.key_cache.flatten(2), paged.value_cache.flatten(2), paged.block_table,
        torch.ones(128, 128).triu(1).half(), [3], [131], num_kv_heads=2, num_heads=4,
        scale_value=0.125, out=out)
    ref = dense(query, paged.keys[0], paged.values[0], 0.125, causal_bias(3, 131))
    torch.testing.assert_close(out.float(), ref, **TOL[torch.float16])
