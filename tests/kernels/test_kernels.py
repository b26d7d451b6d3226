"""ReferenceBackend against a naive dense attention written here, independently.

The oracle repeats K/V to full heads, applies a full [S, S] causal mask and HF-style ALiBi
(``slope * key_pos``, equal to ``slope * (key_pos - query_pos)`` up to a per-row constant).
Paged caches use randomly permuted, non-contiguous block ids and never block 0 (reserved).
"""

from __future__ import annotations

import math

import pytest
import torch
from tgi_npu_backend.kernels import (
    AttentionBackend,
    AttentionMetadata,
    Phase,
    ReferenceBackend,
    check_block_size,
    get_backend,
)
from tgi_npu_backend.kernels.cpu import CpuBackend

HEAD_DIM = 32
HEADS = 4
NUM_BLOCKS = 24
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}

BLOCK_SIZES = pytest.mark.parametrize("block_size", [16, 32, 128])
KV_HEADS = pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
ALIBI = pytest.mark.parametrize("alibi", [False, True], ids=["rope", "alibi"])
DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Hundreds of tiny ops: one intra-op thread is faster, and robust on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bloom_slopes(heads: int) -> torch.Tensor:
    """ALiBi slopes for a power-of-two head count (Press et al.)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


def naive_attention(q, k, v, q_pos, scale, slopes):
    """q [Q, H, D] at positions q_pos; k, v [S, KVH, D] at positions 0..S-1 -> [Q, H, D] fp32."""
    s, heads = k.shape[0], q.shape[1]
    k = k.float().repeat_interleave(heads // k.shape[1], dim=1)
    v = v.float().repeat_interleave(heads // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if slopes is not None:
        scores = (
            scores + slopes[:, None, None] * torch.arange(s, dtype=torch.float32)[None, None, :]
        )
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal[q_pos][None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class Paged:
    """A tiny block manager: full K/V/Q per sequence, random block ids, slot helpers."""

    def __init__(self, totals, block_size, kv_heads, dtype, seed=0, poison=False, backend=None,
                 tables=None):
        """``tables``: the block ids of each sequence (default: random, never block 0)."""
        g = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        free = (torch.randperm(NUM_BLOCKS - 1, generator=g) + 1).tolist()  # never block 0
        self.tables = []
        for n in totals:
            need = -(-n // block_size)
            self.tables.append(free[:need])
            free = free[need:]
        if tables is not None:
            self.tables = [list(t) for t in tables]
        self.q = [torch.randn(n, HEADS, HEAD_DIM, generator=g).to(dtype) for n in totals]
        self.k = [torch.randn(n, kv_heads, HEAD_DIM, generator=g).to(dtype) for n in totals]
        self.v = [torch.randn(n, kv_heads, HEAD_DIM, generator=g).to(dtype) for n in totals]
        self.backend = backend or ReferenceBackend()
        self.kc, self.vc = self.backend.allocate_kv_cache(
            NUM_BLOCKS, block_size, kv_heads, HEAD_DIM, dtype, torch.device("cpu")
        )
        if poison:
            self.kc.fill_(float("nan"))
            self.vc.fill_(float("nan"))

    def slot(self, i, p):
        return self.tables[i][p // self.block_size] * self.block_size + p % self.block_size

    def meta(self, seqs, spans, is_prefill, phase=None):
        """Metadata for sequences ``seqs`` computing positions ``[ctx, end)`` given in ``spans``."""
        return AttentionMetadata.build(
            phase=phase or (Phase.PREFILL if is_prefill else Phase.DECODE),
            slot_mapping=[self.slot(i, p) for i, (c, e) in zip(seqs, spans) for p in range(c, e)],
            block_tables=[self.tables[i] for i in seqs],
            context_lens=[c for c, _ in spans],
            query_lens=[e - c for c, e in spans],
            block_size=self.block_size,
            device=torch.device("cpu"),
        )

    def run(self, seqs, spans, slopes, is_prefill=True, phase=None):
        """store_kv then prefill/decode; returns (output, oracle) both [T, H, D] float32."""
        meta = self.backend.prepare(self.meta(seqs, spans, is_prefill, phase))

        def cat(xs):
            return torch.cat([xs[i][c:e] for i, (c, e) in zip(seqs, spans)])

        q, k, v = cat(self.q), cat(self.k), cat(self.v)
        scale = 1.0 / math.sqrt(HEAD_DIM)
        self.backend.store_kv(k, v, self.kc, self.vc, meta)
        if is_prefill:
            out = self.backend.prefill(q, k, v, self.kc, self.vc, meta, scale, slopes)
        else:
            out = self.backend.decode(q, self.kc, self.vc, meta, scale, slopes)
        assert out.dtype == q.dtype and out.shape == q.shape
        expected = torch.cat(
            [
                naive_attention(
                    self.q[i][c:e], self.k[i][:e], self.v[i][:e], torch.arange(c, e), scale, slopes
                )
                for i, (c, e) in zip(seqs, spans)
            ]
        )
        return out.float(), expected


@BLOCK_SIZES
@KV_HEADS
@ALIBI
@DTYPES
def test_prefill_without_prefix(block_size, kv_heads, alibi, dtype):
    lens = [1, block_size - 1, block_size, 2 * block_size + 3]
    paged = Paged(lens, block_size, kv_heads, dtype)
    slopes = bloom_slopes(HEADS) if alibi else None
    out, expected = paged.run(range(len(lens)), [(0, n) for n in lens], slopes)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@BLOCK_SIZES
@KV_HEADS
@ALIBI
@DTYPES
def test_prefill_with_cached_prefix(block_size, kv_heads, alibi, dtype):
    # (prefix, new tokens): no prefix, 1-token prefix, prefix ending mid-block, crossing blocks
    spans = [(0, 7), (1, 1), (block_size - 1, 3), (block_size + 3, block_size + 1)]
    paged = Paged([c + q for c, q in spans], block_size, kv_heads, dtype, seed=1)
    slopes = bloom_slopes(HEADS) if alibi else None
    first = [i for i, (c, _) in enumerate(spans) if c > 0]
    # first pass writes the prefixes; the second attends to them through the block tables
    out, expected = paged.run(first, [(0, spans[i][0]) for i in first], slopes)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    out, expected = paged.run(range(len(spans)), [(c, c + q) for c, q in spans], slopes)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@BLOCK_SIZES
@KV_HEADS
@ALIBI
@DTYPES
def test_decode_after_prefill(block_size, kv_heads, alibi, dtype):
    # the `block_size` prompt decodes into a fresh block; two steps per sequence
    prompts = [1, block_size - 1, block_size, 2 * block_size + 3]
    paged = Paged([n + 2 for n in prompts], block_size, kv_heads, dtype, seed=2)
    slopes = bloom_slopes(HEADS) if alibi else None
    seqs = range(len(prompts))
    paged.run(seqs, [(0, n) for n in prompts], slopes)
    for step in range(2):
        out, expected = paged.run(
            seqs, [(n + step, n + step + 1) for n in prompts], slopes, is_prefill=False
        )
        torch.testing.assert_close(out, expected, **TOL[dtype])


@BLOCK_SIZES
@KV_HEADS
@ALIBI
@pytest.mark.parametrize("backend", [ReferenceBackend, CpuBackend], ids=["reference", "cpu"])
def test_mixed_pass_of_prompt_chunks_and_decode_tokens(block_size, kv_heads, alibi, backend):
    """Chunked prefill: one pass holds a first chunk, a middle chunk over a cached prefix and
    single decode tokens; every query attends to its own sequence's cache and chunk only."""
    # (cached before the pass, tokens in the pass)
    spans = [(0, 9), (block_size + 3, 1), (2 * block_size, block_size + 5), (7, 1)]
    paged = Paged([c + q for c, q in spans], block_size, kv_heads, torch.float32, seed=4,
                  backend=backend())
    slopes = bloom_slopes(HEADS) if alibi else None
    first = [i for i, (c, _) in enumerate(spans) if c > 0]
    paged.run(first, [(0, spans[i][0]) for i in first], slopes)
    out, expected = paged.run(
        range(len(spans)), [(c, c + q) for c, q in spans], slopes, phase=Phase.MIXED
    )
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


@pytest.mark.parametrize("kv_heads", [2])
@ALIBI
def test_garbage_in_unused_cache_does_not_leak(kv_heads, alibi):
    block_size = 16
    spans = [(0, 3), (block_size + 1, 2), (5, 1)]
    paged = Paged(
        [c + q + 1 for c, q in spans], block_size, kv_heads, torch.float32, seed=3, poison=True
    )
    slopes = bloom_slopes(HEADS) if alibi else None
    first = [i for i, (c, _) in enumerate(spans) if c > 0]
    paged.run(first, [(0, spans[i][0]) for i in first], slopes)
    out, expected = paged.run(range(3), [(c, c + q) for c, q in spans], slopes)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    out, expected = paged.run(
        range(3), [(c + q, c + q + 1) for c, q in spans], slopes, is_prefill=False
    )
    assert torch.isfinite(out).all()  # block 0 (table padding) and unwritten slots are NaN
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_store_kv_skips_negative_slots():
    backend = ReferenceBackend()
    kc, vc = backend.allocate_kv_cache(4, 16, 1, 8, torch.float32, torch.device("cpu"))
    meta = AttentionMetadata.build(
        phase=Phase.PREFILL,
        slot_mapping=[17, -1, 18],
        block_tables=[[1]],
        context_lens=[0],
        query_lens=[3],
        block_size=16,
        device=torch.device("cpu"),
    )
    k = torch.arange(3.0)[:, None, None].expand(3, 1, 8)
    backend.store_kv(k, -k, kc, vc, meta)
    flat = kc.view(-1, 8)
    assert flat[17].eq(0).all() and flat[18].eq(2).all() and vc.view(-1, 8)[18].eq(-2).all()
    assert flat.count_nonzero() == 8  # only slot 18 is non-zero (slot 17 holds key 0)


@pytest.mark.parametrize("bad", [8, 20, 256])
def test_check_block_size_rejects(bad):
    with pytest.raises(ValueError, match=f"block size {bad} is not supported"):
        check_block_size(bad)
    with pytest.raises(ValueError, match="multiple of 16"):
        ReferenceBackend().kv_cache_shape(4, bad, 1, 8)


@pytest.mark.parametrize("good", [16, 64, 128])
def test_check_block_size_accepts(good):
    check_block_size(good)


def test_kv_cache_shape_and_allocation():
    backend = ReferenceBackend()
    assert backend.kv_cache_shape(10, 32, 2, 64) == (10, 32, 2, 64)
    kc, vc = backend.allocate_kv_cache(10, 32, 2, 64, torch.bfloat16, torch.device("cpu"))
    for t in (kc, vc):
        assert t.shape == (10, 32, 2, 64) and t.dtype == torch.bfloat16 and not t.any()
    assert kc.data_ptr() != vc.data_ptr()


def test_get_backend():
    backend = get_backend(torch.device("cpu"))
    assert isinstance(backend, ReferenceBackend) and isinstance(backend, AttentionBackend)
    assert backend.name == "cpu"  # device_kernels/cpu.py, a ReferenceBackend with fast attention
    assert get_backend("npu:0").name == "npu"  # constructing it does not import torch_npu
    with pytest.raises(ValueError, match="no attention backend"):
        get_backend(torch.device("meta"))


def test_npu_module_imports_without_torch_npu():
    from tgi_npu_backend.kernels import npu, npu_platform

    assert npu_platform.npu_available() is False
    backend = npu.NpuBackend()
    assert isinstance(backend, AttentionBackend) and backend.name == "npu"
    assert backend.kv_cache_shape(8, 64, 1, 256) == (8, 64, 1, 256)
    assert npu_platform.recommended_block_size(64) == 128
    assert npu_platform.recommended_block_size(128) == 128
    assert npu_platform.recommended_block_size(256) == 64
    check_block_size(npu_platform.recommended_block_size(256))
    assert backend.block_size_for(256) == 64


# NpuBackend against the real operators' contracts: tests/npu (through npu_emulation).
