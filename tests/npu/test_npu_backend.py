"""NpuBackend through the torch_npu emulation (schemas and documented preconditions of the real
operators) against the reference backend: every kernel, zero reference fallbacks, bounded masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tgi_npu_backend.kernels import AttentionMetadata, Phase, ReferenceBackend
from tgi_npu_backend.kernels.npu import NpuBackend, alibi_groups
from tgi_npu_backend.models.layers.alibi import alibi_slopes

CPU = torch.device("cpu")


def _scenario(ctx: list[int], qlen: list[int], block_size: int, heads: int, kv_heads: int,
              head_dim: int, dtype, prefill: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    blocks, next_block = [], 1
    for c, q in zip(ctx, qlen):
        n = -(-(c + q) // block_size)
        blocks.append(list(range(next_block, next_block + n))[::-1])  # non-contiguous, reversed
        next_block += n
    num_blocks = next_block + 2
    slots = [blocks[i][p // block_size] * block_size + p % block_size
             for i in range(len(ctx)) for p in range(ctx[i], ctx[i] + qlen[i])]
    meta = AttentionMetadata.build(phase=Phase.PREFILL if prefill else Phase.DECODE, slot_mapping=slots, block_tables=blocks,
                                   context_lens=ctx, query_lens=qlen, block_size=block_size, device=CPU)
    t = sum(qlen)
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)
    q, k, v = rand(t, heads, head_dim), rand(t, kv_heads, head_dim), rand(t, kv_heads, head_dim)
    kc = rand(num_blocks, block_size, kv_heads, head_dim)
    vc = rand(num_blocks, block_size, kv_heads, head_dim)
    return meta, q, k, v, kc, vc


def _run(backend, meta, q, k, v, kc, vc, slopes, prefill):
    meta = backend.prepare(meta)
    backend.store_kv(k, v, kc, vc, meta)
    if prefill:
        return backend.prefill(q, k, v, kc, vc, meta, q.shape[-1] ** -0.5, slopes)
    return backend.decode(q, kc, vc, meta, q.shape[-1] ** -0.5, slopes)


CASES = {  # (context lens, query lens, prefill?)
    "prefill": ([0, 0, 0], [1, 17, 40], True),
    "prefill over a prefix": ([0, 32, 16], [5, 9, 1], True),
    "decode": ([3, 40, 15], [1, 1, 1], False),
    # chunked prefill: a first chunk, a chunk over a prefix, and decode tokens in one pass
    "mixed": ([0, 32, 40, 15], [20, 9, 1, 1], True),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,alibi", [
    (4, 4, 64, True),    # BLOOM: MHA + ALiBi
    (8, 1, 256, False),  # Gemma-2B: MQA, head_dim 256
    (4, 2, 32, False),   # GQA
])
@pytest.mark.parametrize("case", CASES)
def test_npu_kernels_match_reference(npu_emulated, case, heads, kv_heads, head_dim, alibi, dtype):
    ctx, qlen, prefill = CASES[case]
    block_size = NpuBackend().block_size_for(head_dim)
    meta, q, k, v, kc, vc = _scenario(ctx, qlen, block_size, heads, kv_heads, head_dim, dtype, prefill)
    if case == "mixed":
        meta = dataclasses.replace(meta, phase=Phase.MIXED)
    slopes = alibi_slopes(heads) if alibi else None
    npu = NpuBackend(observer=npu_emulated)
    kc2, vc2 = kc.clone(), vc.clone()
    got = _run(npu, meta, q, k, v, kc, vc, slopes, prefill)
    want = _run(ReferenceBackend(), meta, q, k, v, kc2, vc2, slopes, prefill)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2), "the caches hold the same K/V"
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert not npu_emulated.fallbacks
    expected = {
        ("prefill", False): "_npu_flash_attention", ("prefill", True): "_npu_flash_attention_v2",
        ("mixed", False): "_npu_paged_attention_splitfuse",
    }.get((case, alibi), "_npu_paged_attention_v2" if alibi else "_npu_paged_attention")
    assert any(expected in op for op in npu_emulated.calls), dict(npu_emulated.calls)
    assert any("reshape_and_cache" in op for op in npu_emulated.calls)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_norm_and_rotary_match_reference(npu_emulated, dtype):
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(9, 256, generator=g).to(dtype), torch.randn(9, 256, generator=g).to(dtype)
    gamma = 1.0 + 0.1 * torch.randn(256, generator=g)
    npu, ref = NpuBackend(observer=npu_emulated), ReferenceBackend()
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.float16 else dict(atol=8e-2, rtol=5e-2)
    torch.testing.assert_close(npu.rms_norm(x, gamma, 1e-6), ref.rms_norm(x, gamma, 1e-6), **tol)
    (y1, s1), (y2, s2) = npu.add_rms_norm(x, res, gamma, 1e-6), ref.add_rms_norm(x, res, gamma, 1e-6)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(s1, s2, **tol)
    q, k = torch.randn(9, 8, 256, generator=g).to(dtype), torch.randn(9, 1, 256, generator=g).to(dtype)
    ang = torch.arange(9.0)[:, None, None] * torch.rand(1, 1, 128, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    for a, b in zip(npu.rotary(q, k, cos, sin), ref.rotary(q, k, cos, sin)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    assert not npu_emulated.fallbacks
    assert {"npu_rms_norm", "npu_add_rms_norm", "npu_rotary_mul"} <= {op.split(".")[-1] for op in npu_emulated.calls} | set(npu_emulated.calls)


def test_rotary_of_a_long_pass_with_one_kv_head(npu_emulated):
    """1200 tokens, MQA: a key alone ([1, T, 1, D]) would also read as BNSD with N = T >= 1000,
    which npu_rotary_mul's half mode refuses; query and key heads go in one call."""
    g = torch.Generator().manual_seed(1)
    t, dtype = 1200, torch.bfloat16
    q, k = torch.randn(t, 4, 64, generator=g).to(dtype), torch.randn(t, 1, 64, generator=g).to(dtype)
    ang = torch.arange(float(t))[:, None, None] * torch.rand(1, 1, 32, generator=g) / 100
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    for a, b in zip(NpuBackend(observer=npu_emulated).rotary(q, k, cos, sin), ReferenceBackend().rotary(q, k, cos, sin)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=8e-2, rtol=5e-2)


def test_alibi_groups_bound_the_mask():
    assert alibi_groups([]) == []
    assert alibi_groups([5]) == [(0, 1)]
    assert alibi_groups([3] * 10) == [(0, 10)]  # short prompts share one mask
    long_first = alibi_groups([1024] + [1] * 20)
    assert long_first == [(0, 1), (1, 21)]
    for lens in ([1024] + [1] * 20, [1] * 20 + [1024], [1, 1024, 1, 1024, 7], [64, 65, 66, 67]):
        s = max(lens)
        groups = alibi_groups(lens)
        assert groups[0][0] == 0 and groups[-1][1] == len(lens)
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))  # contiguous cover
        for start, stop in groups:
            longest = max(lens[start:stop])
            assert (stop - start) * longest**2 <= max(s * s, 4096)


def test_one_long_prompt_with_many_short_ones_keeps_the_alibi_mask_small(npu_emulated):
    """The case from the issue: a 1024-token prompt batched with 20 one-token prompts, 16 heads.
    One [B, heads, S, S] bf16 mask was 21 * 16 * 1024^2 * 2 bytes = 672 MiB; now the largest mask
    is one sequence's, 16 * 1024^2 * 2 bytes = 32 MiB."""
    heads, head_dim, dtype = 16, 64, torch.bfloat16
    lens = [1024] + [1] * 20
    meta, q, k, v, kc, vc = _scenario([0] * 21, lens, 128, heads, heads, head_dim, dtype, True)
    slopes = alibi_slopes(heads)
    npu = NpuBackend(observer=npu_emulated)
    got = _run(npu, meta, q, k, v, kc, vc, slopes, True)
    one_sequence = heads * 1024 * 1024 * 2
    assert npu_emulated.peak_mask_bytes <= one_sequence, npu_emulated.peak_mask_bytes
    assert npu_emulated.peak_mask_bytes < 21 * one_sequence / 16
    want = _run(ReferenceBackend(), meta, q, k, v, kc.clone(), vc.clone(), slopes, True)
    torch.testing.assert_close(got.float(), want.float(), atol=6e-2, rtol=6e-2)


def test_float32_falls_back_counted_and_logged_once(npu_emulated):
    meta, q, k, v, kc, vc = _scenario([0], [5], 16, 2, 2, 16, torch.float32, True)
    npu = NpuBackend(observer=npu_emulated)
    for _ in range(2):
        _run(npu, meta, q, k, v, kc, vc, None, True)
    assert npu_emulated.fallbacks and sum(npu_emulated.fallbacks.values()) == 4  # store + prefill, twice
    assert npu._fallbacks_logged == {"store_kv", "prefill"}


def test_two_tokens_for_one_slot_are_stored_once(npu_emulated):
    """Two identical prompts sharing prefix-cache blocks both recompute the last position into the
    same slot; _npu_reshape_and_cache requires unique slots (the emulation refuses duplicates)."""
    heads, d, bs, dtype = 2, 16, 16, torch.float16
    g = torch.Generator().manual_seed(0)
    slot = 1 * bs + 15
    meta = AttentionMetadata.build(phase=Phase.PREFILL, slot_mapping=[slot, slot], block_tables=[[1], [1]],
                                   context_lens=[15, 15], query_lens=[1, 1], block_size=bs, device=CPU)
    assert meta.store_rows == [0]
    q = torch.randn(2, heads, d, generator=g).to(dtype)
    kv = torch.randn(1, heads, d, generator=g).to(dtype).expand(2, -1, -1).contiguous()
    kc, vc = torch.randn(4, bs, heads, d, generator=g).to(dtype), torch.randn(4, bs, heads, d, generator=g).to(dtype)
    got = _run(NpuBackend(observer=npu_emulated), meta, q, kv, kv, kc, vc, None, True)
    want = _run(ReferenceBackend(), meta, q, kv, kv, kc.clone(), vc.clone(), None, True)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(kc[1, 15], kv[0])


def test_long_chunks_over_prefixes_keep_the_alibi_mask_bounded(npu_emulated):
    """Prefill over a cached prefix runs the paged op per token with a [rows, heads, 1, L] mask;
    rows per call are capped at max(L, 1024), so a pass's mask never exceeds one longest-sequence
    mask: two 600-token chunks over 10-token prefixes (T = 1200 > 1024 rows) take two calls."""
    heads, dtype = 4, torch.float16
    meta, q, k, v, kc, vc = _scenario([10, 10], [600, 600], 128, heads, heads, 16, dtype, True)
    npu = NpuBackend(observer=npu_emulated)
    got = _run(npu, meta, q, k, v, kc, vc, alibi_slopes(heads), True)
    assert npu_emulated.calls["_npu_paged_attention_v2"] == 2
    assert npu_emulated.peak_mask_bytes <= 1024 * heads * 610 * 2
    want = _run(ReferenceBackend(), meta, q, k, v, kc.clone(), vc.clone(), alibi_slopes(heads), True)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
