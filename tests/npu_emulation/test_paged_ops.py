"""Cache writes and attention over the paged cache, against plain dense attention."""

from __future__ import annotations

import pytest
import torch
from npu_dense import TOL, Paged, bloom_slopes, causal_bias, dense

DTYPES = [torch.float16, torch.bfloat16]
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
GEOMETRY = [(16, 64), (64, 128), (128, 128), (64, 256)]  # (block_size, head_dim)


def _close(out, ref, dtype):
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_writes_each_token_to_its_slot_and_skips_negative_slots(emu, dtype):
    import torch_npu

    kc = torch.zeros(6, 16, 2, 64, dtype=dtype)
    vc = torch.zeros_like(kc)
    key, value = torch.randn(5, 2, 64).to(dtype), torch.randn(5, 2, 64).to(dtype)
    slots = torch.tensor([17, 3, -1, 95, 40], dtype=torch.int32)
    torch_npu._npu_reshape_and_cache(key, value, kc, vc, slots)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kc[s // 16, s % 16], key[t]) and torch.equal(vc[s // 16, s % 16], value[t])
    written = {17, 3, 95, 40}
    untouched = [s for s in range(96) if s not in written]
    assert kc.view(96, 2, 64)[untouched].abs().sum() == 0
    assert emu.calls["_npu_reshape_and_cache"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("block_size,head_dim", GEOMETRY)
def test_paged_attention_decode(emu, dtype, heads, kv_heads, block_size, head_dim):
    import torch_npu

    paged = Paged([1, 37, 130], block_size, kv_heads, head_dim, dtype)
    query = torch.randn(3, heads, head_dim).to(dtype)
    out = torch.empty_like(query)
    scale = head_dim**-0.5
    torch_npu._npu_paged_attention(
        query, paged.key_cache, paged.value_cache, kv_heads, heads, scale, paged.block_table,
        torch.tensor(paged.lens, dtype=torch.int32), out,
    )
    for b, n in enumerate(paged.lens):
        ref = dense(query[b : b + 1], paged.keys[b], paged.values[b], scale)
        _close(out[b : b + 1], ref, dtype)


def test_paged_attention_block_size_256_with_head_256_only_on_a2(emu):
    import torch_npu

    paged = Paged([300], 256, 1, 256, torch.float16)
    query = torch.randn(1, 2, 256).to(torch.float16)
    out = torch.empty_like(query)
    args = (query, paged.key_cache, paged.value_cache, 1, 2, 0.0625, paged.block_table,
            torch.tensor([300], dtype=torch.int32), out)
    torch_npu._npu_paged_attention(*args)
    _close(out, dense(query, paged.keys[0], paged.values[0], 0.0625), torch.float16)
    emu.configure(soc="A3")
    with pytest.raises(RuntimeError, match="block_size 256 must be <= 128"):
        torch_npu._npu_paged_attention(*args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("mask_form", [None, "per_sequence", "shared_row"])
def test_paged_attention_v2_decode_and_alibi(emu, dtype, heads, kv_heads, mask_form):
    import torch_npu

    paged = Paged([5, 70, 129], 64, kv_heads, 128, dtype)
    query = torch.randn(3, heads, 128).to(dtype)
    out = torch.empty_like(query)
    slopes = bloom_slopes(heads)
    longest = max(paged.lens)
    if mask_form == "per_sequence":  # [B, H, 1, L]: row slope * (j - (len_b - 1))
        pos = torch.arange(longest).float()
        rel = pos[None, :] - (torch.tensor(paged.lens).float() - 1)[:, None]
        mask = (slopes[None, :, None] * rel[:, None, :])[:, :, None, :].to(dtype)
    elif mask_form == "shared_row":  # [H, 1, L]: MindIE's one row, equal up to a per-row constant
        mask = (slopes[:, None] * (torch.arange(longest).float() - (longest - 1)))[:, None].to(dtype)
    else:
        mask = None
    torch_npu.atb._npu_paged_attention_v2(
        query, paged.key_cache, paged.block_table, paged.lens, value_cache=paged.value_cache,
        mask=mask, num_kv_heads=kv_heads, num_heads=heads, scale_value=0.125,
        mask_type=0 if mask is None else 2, out=out,
    )
    for b, n in enumerate(paged.lens):
        # the kernel adds the first n columns of the sequence's (or the shared) row, as stored
        bias = None if mask is None else (mask[b] if mask.dim() == 4 else mask)[:, :, :n]
        _close(out[b : b + 1], dense(query[b : b + 1], paged.keys[b], paged.values[b], 0.125, bias),
               dtype)
    if mask is not None:
        assert emu.peak_mask_bytes == mask.numel() * mask.element_size()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_splitfuse_mixes_prefill_chunks_and_decode_tokens(emu, dtype, heads, kv_heads):
    import torch_npu

    kv_lens, q_lens = [40, 130, 9], [40, 3, 1]  # a new prompt, a chunk over a prefix, a decode
    paged = Paged(kv_lens, 64, kv_heads, 64, dtype)
    longest = max(kv_lens)
    rows = []
    for n, q in zip(kv_lens, q_lens):
        bias = causal_bias(q, n)[0]
        rows.append(torch.cat([bias, torch.full((q, longest - n), -10000.0)], 1))
    mask = torch.cat(rows).clamp(min=-10000.0).to(dtype)  # the op-plugin/vllm-ascend -10000 form
    query = torch.randn(sum(q_lens), heads, 64).to(dtype)
    out = torch.empty_like(query)
    torch_npu._npu_paged_attention_splitfuse(
        query, paged.key_cache, paged.value_cache, paged.block_table,
        torch.tensor(kv_lens, dtype=torch.int32), mask, torch.tensor(q_lens, dtype=torch.int32),
        kv_heads, heads, 0.125, out,
    )
    start = 0
    for b, (n, q) in enumerate(zip(kv_lens, q_lens)):
        ref = dense(query[start : start + q], paged.keys[b], paged.values[b], 0.125, causal_bias(q, n))
        _close(out[start : start + q], ref, dtype)
        start += q


def test_outputs_start_as_nan_so_unwritten_rows_show(emu, monkeypatch):
    """The op NaN-fills ``out`` before computing: a kernel that skipped a sequence leaves NaN."""
    import torch_npu

    from tgi_npu_backend.npu_emulation import ops_paged

    real = ops_paged._decode
    monkeypatch.setattr(ops_paged, "_decode", lambda q, kc, vc, bt, lens, *a, **k: real(
        q, kc, vc, bt, lens[:1], *a, **k))  # "forgets" every sequence but the first
    paged = Paged([3, 20], 16, 2, 64, torch.float16)
    query = torch.randn(2, 2, 64).to(torch.float16)
    out = torch.zeros_like(query)
    torch_npu._npu_paged_attention(query, paged.key_cache, paged.value_cache, 2, 2, 0.125,
                                   paged.block_table, torch.tensor([3, 20], dtype=torch.int32), out)
    assert not torch.isnan(out[0]).any() and torch.isnan(out[1]).all()
