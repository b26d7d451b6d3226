"""CpuBackend (the fast CPU path) against the dense oracle and the reference backend.

Same scenarios and parameters as ``tests/kernels/test_kernels.py`` (whose ``Paged`` driver and dense
oracle are reused): ragged prefill, cached prefixes, decode across block boundaries, ALiBi,
MHA/GQA/MQA, three dtypes, NaN-poisoned caches; plus what is specific to this backend: prefill
groups of padded sequences, and its own KV layout. Every scenario runs both decodes: PyTorch ops
and, for float32, the native kernel (its own cases: ``test_cpu_native.py``).
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import ALIBI, BLOCK_SIZES, DTYPES, HEADS, KV_HEADS, TOL, Paged, bloom_slopes
from tgi_npu_backend.kernels import (
    AttentionBackend,
    AttentionMetadata,
    Phase,
    ReferenceBackend,
    get_backend,
)
from tgi_npu_backend.kernels.cpu import CpuBackend
from tgi_npu_backend.kernels.cpu_native import decode_kernel
from tgi_npu_backend.kernels.cpu_plan import prefill_plan

NATIVE = decode_kernel() is not None  # tests/kernels/test_cpu_native.py: it builds where cc does


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check(passes, totals, block_size, kv_heads, dtype, alibi, seed=0, poison=False, tables=None,
          slopes=None, tol=None):
    """Run ``passes`` ``(seqs, spans, is_prefill)`` on both backends (same data, same block ids);
    each output must match the dense oracle and the reference backend. ``slopes``: ALiBi slopes
    other than BLOOM's for ``HEADS``; ``tol``: other than the dtype's."""
    tol = tol or TOL[dtype]
    if slopes is None and alibi:
        slopes = bloom_slopes(HEADS)
    # the decode's two implementations: PyTorch ops, and the native kernel (float32) where it builds
    fast = [Paged(totals, block_size, kv_heads, dtype, seed, poison, backend=backend, tables=tables)
            for backend in (CpuBackend(native=False), *([CpuBackend()] if NATIVE else []))]
    ref = Paged(totals, block_size, kv_heads, dtype, seed, poison, backend=ReferenceBackend(),
                tables=tables)
    for seqs, spans, is_prefill in passes:
        ref_out, _ = ref.run(seqs, spans, slopes, is_prefill)
        for paged in fast:
            out, expected = paged.run(seqs, spans, slopes, is_prefill)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, expected, **tol)
            torch.testing.assert_close(out, ref_out, **tol)


@BLOCK_SIZES
@KV_HEADS
@ALIBI
@DTYPES
def test_prefill_without_prefix(block_size, kv_heads, alibi, dtype):
    lens = [1, block_size - 1, block_size, 2 * block_size + 3]
    seqs = range(len(lens))
    check([(seqs, [(0, n) for n in lens], True)], lens, block_size, kv_heads, dtype, alibi)


@BLOCK_SIZES
@KV_HEADS
@ALIBI
@DTYPES
def test_prefill_with_cached_prefix(block_size, kv_heads, alibi, dtype):
    spans = [(0, 7), (1, 1), (block_size - 1, 3), (block_size + 3, block_size + 1)]
    first = [i for i, (c, _) in enumerate(spans) if c > 0]
    passes = [
        (first, [(0, spans[i][0]) for i in first], True),
        (range(len(spans)), [(c, c + q) for c, q in spans], True),
    ]
    check(passes, [c + q for c, q in spans], block_size, kv_heads, dtype, alibi, seed=1)


@BLOCK_SIZES
@KV_HEADS
@ALIBI
@DTYPES
def test_decode_after_prefill(block_size, kv_heads, alibi, dtype):
    prompts = [1, block_size - 1, block_size, 2 * block_size + 3]
    seqs = range(len(prompts))
    passes = [(seqs, [(0, n) for n in prompts], True)]
    passes += [(seqs, [(n + s, n + s + 1) for n in prompts], False) for s in range(2)]
    check(passes, [n + 2 for n in prompts], block_size, kv_heads, dtype, alibi, seed=2)


@BLOCK_SIZES
@KV_HEADS
@ALIBI
@DTYPES
@pytest.mark.parametrize("poison", [False, True], ids=["clean", "nan-cache"])
def test_decode_of_one_sequence(block_size, kv_heads, alibi, dtype, poison):
    """Batch-1 decode has its own path (one softmax over the gathered blocks): each sequence
    decodes alone, at lengths ending inside, at the end of and just past a block, with NaN in the
    unwritten slots of its last block in the poisoned case."""
    prompts = [1, block_size - 1, block_size, 2 * block_size + 3]
    seqs = range(len(prompts))
    passes = [(seqs, [(0, n) for n in prompts], True)]
    passes += [([i], [(n + s, n + s + 1)], False) for s in range(2) for i, n in enumerate(prompts)]
    check(passes, [n + 2 for n in prompts], block_size, kv_heads, dtype, alibi, seed=7,
          poison=poison)


@KV_HEADS
@ALIBI
def test_garbage_in_unused_cache_does_not_leak(kv_heads, alibi):
    spans = [(0, 3), (17, 2), (5, 1)]
    first = [i for i, (c, _) in enumerate(spans) if c > 0]
    passes = [
        (first, [(0, spans[i][0]) for i in first], True),
        (range(3), [(c, c + q) for c, q in spans], True),
        (range(3), [(c + q, c + q + 1) for c, q in spans], False),
    ]
    totals = [c + q + 1 for c, q in spans]
    check(passes, totals, 16, kv_heads, torch.float32, alibi, seed=3, poison=True)


@KV_HEADS
@ALIBI
def test_prefill_groups_of_skewed_lengths(kv_heads, alibi):
    """Lengths far apart fall into several padded groups; a decode then spans 1 to 7 blocks."""
    lens = [100, 1, 3, 60, 2, 50, 7, 5]
    groups = prefill_plan(Paged(lens, 16, kv_heads, torch.float32).meta(
        range(len(lens)), [(0, n) for n in lens], True))
    assert len(groups) > 1 and sorted(t for g in groups for t in g.tokens.tolist()) == list(range(sum(lens)))
    seqs = range(len(lens))
    passes = [(seqs, [(0, n) for n in lens], True), (seqs, [(n, n + 1) for n in lens], False)]
    check(passes, [n + 1 for n in lens], 16, kv_heads, torch.float32, alibi, seed=4)


@pytest.mark.parametrize("ratio", [1.0, 1.1, 1.5, 4.0])
@ALIBI
def test_prefill_at_any_padding_ratio(monkeypatch, ratio, alibi):
    """Whatever ``PAD_RATIO`` allows, from one group per length to one padded group for all: the
    same outputs (padding rows repeat a sequence's first token; their keys must stay masked)."""
    from tgi_npu_backend.kernels import cpu_plan

    monkeypatch.setattr(cpu_plan, "PAD_RATIO", ratio)
    lens = [16, 1, 13, 14, 20, 1]
    groups = prefill_plan(Paged(lens, 16, 2, torch.float32).meta(
        range(len(lens)), [(0, n) for n in lens], True))
    # 1.0: 20 | 16 | 14 | 13 | 1,1;  1.1: 20 | 16,14 | 13 | 1,1;  1.5: 20,16,14,13 | 1,1;  4.0: one
    expected = {1.0: 5, 1.1: 4, 1.5: 2, 4.0: 1}[ratio]
    assert len(groups) == expected
    assert sorted(t for g in groups for t in g.tokens.tolist()) == list(range(sum(lens)))
    seqs = range(len(lens))
    passes = [(seqs, [(0, n) for n in lens], True), (seqs, [(n, n + 1) for n in lens], False)]
    check(passes, [n + 1 for n in lens], 16, 2, torch.float32, alibi, seed=6)


# Block tables for sequences of 70, 5, 40 and 33 tokens (block size 16, + 2 decode steps): the
# first two runs of consecutive blocks, one broken in the middle, one sequence with a single block.
RUN_TABLES = [[1, 2, 3, 4, 5], [23], [8, 9, 20], [12, 13, 14]]


def _decode_runs(tables, lens, block_size=16):
    meta = Paged(lens, block_size, 1, torch.float32, tables=tables).meta(
        range(len(lens)), [(n - 1, n) for n in lens], False)
    return CpuBackend(native=False).prepare(meta).plan.attention.runs


def test_decode_plan_reads_runs_of_consecutive_blocks_in_place():
    lens = [70, 5, 40, 33]
    # every block but each sequence's last, as (first block, blocks, index among all blocks)
    assert _decode_runs(RUN_TABLES, lens) == [(1, 4, 0), (8, 2, 6), (12, 2, 9)]
    scattered = [[1, 10, 3, 15, 5], [23], [8, 2, 20], [13, 7, 14]]
    assert _decode_runs(scattered, lens) is None  # runs of 1: a gather is cheaper
    assert _decode_runs([[4], [3], [9], [7]], [5, 5, 5, 5]) is None  # nothing before a last block


@KV_HEADS
@ALIBI
@pytest.mark.parametrize("poison", [False, True], ids=["clean", "nan-cache"])
def test_decode_in_place_over_runs(kv_heads, alibi, poison):
    """The run path (float32, blocks in runs) against the oracle and the reference, with NaN in
    every unwritten slot (the tails of the last blocks must not leak into the sums)."""
    prompts = [68, 3, 38, 31]
    seqs = range(len(prompts))
    passes = [(seqs, [(0, n) for n in prompts], True)]
    passes += [(seqs, [(n + s, n + s + 1) for n in prompts], False) for s in range(2)]
    check(passes, [n + 2 for n in prompts], 16, kv_heads, torch.float32, alibi, seed=6,
          poison=poison, tables=RUN_TABLES)


@ALIBI
def test_decode_reuses_its_block_layout_only_while_it_holds(alibi):
    """The model runner keeps one block-table tensor while a batch decodes; the backend reuses
    the blocks it derived from it until a sequence enters a new block (here the first sequence, at
    the third step) or another table comes, and every step still matches the oracle (NaN in every
    unwritten slot)."""
    prompts = [14, 20, 40]
    slopes = bloom_slopes(HEADS) if alibi else None
    backend = CpuBackend(native=False)  # the PyTorch decode's plan
    paged = Paged([n + 4 for n in prompts], 16, 2, torch.float32, seed=9, poison=True, backend=backend)
    seqs = range(len(prompts))
    paged.run(seqs, [(0, n) for n in prompts], slopes, True)
    shared = []
    build = paged.meta

    def meta(*args, **kwargs):  # one table object for the batch's decode steps, as the runner
        m = build(*args, **kwargs)
        if m.phase is Phase.DECODE:
            shared.append(shared[0] if shared else m.block_tables)
            m.block_tables = shared[0]
        return m

    paged.meta = meta
    layouts = []
    for s in range(4):
        out, expected = paged.run(seqs, [(n + s, n + s + 1) for n in prompts], slopes, False)
        torch.testing.assert_close(out, expected, **TOL[torch.float32])
        layouts.append(backend._layout)
    # step 0: built; 1: kept; 2: the first sequence's position 16 opens its second block; 3: kept
    assert layouts[1] is layouts[0] and layouts[2] is not layouts[1] and layouts[3] is layouts[2]
    assert layouts[0].counts.tolist() == [1, 2, 3] and layouts[2].counts.tolist() == [2, 2, 3]
    shared.clear()  # a new table object (a batch that changed): built again
    out, expected = paged.run(seqs, [(n + 3, n + 4) for n in prompts], slopes, False)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    assert backend._layout is not layouts[3]


@pytest.mark.parametrize("tables", [None, "runs"], ids=["gathered", "in-place"])
@pytest.mark.parametrize("batch", [1, 3], ids=["one", "batched"])
def test_decode_with_far_keys_scored_below_exp_underflow(tables, batch):
    """Steep ALiBi slopes put the far keys' scores more than 87 below the maximum, where the
    decode softmax clamps before ``exp`` (device_kernels/cpu.py, EXP_FLOOR): still the oracle's output,
    with NaN in every unwritten slot."""
    prompts = [150, 40, 101][:batch]
    table_of = {"runs": [list(range(1, 11)), list(range(11, 14)), list(range(14, 21))][:batch]}
    seqs = range(batch)
    passes = [(seqs, [(0, n) for n in prompts], True)]
    passes += [(seqs, [(n + s, n + s + 1) for n in prompts], False) for s in range(2)]
    steep = torch.tensor([2.0, 1.0, 0.5, 0.25])  # 2.0 x 44 positions is already -88
    # scores reach -300, where a float32 ulp is 3e-5: the backends add bias and score in
    # different orders
    check(passes, [n + 2 for n in prompts], 16, 2, torch.float32, True, seed=8, poison=True,
          tables=table_of.get(tables), slopes=steep, tol={"atol": 1e-4, "rtol": 1e-4})


@ALIBI
def test_prefill_mixes_groups_with_and_without_prefix(alibi):
    spans = [(0, 40), (0, 2), (33, 3), (0, 1), (20, 30)]
    first = [i for i, (c, _) in enumerate(spans) if c > 0]
    passes = [
        (first, [(0, spans[i][0]) for i in first], True),
        (range(len(spans)), [(c, c + q) for c, q in spans], True),
    ]
    check(passes, [c + q for c, q in spans], 16, 2, torch.float32, alibi, seed=5)


def test_store_kv_skips_negative_slots():
    backend = CpuBackend()
    kc, vc = backend.allocate_kv_cache(4, 16, 1, 8, torch.float32, torch.device("cpu"))
    assert kc.shape == (4, 1, 16, 8) == backend.kv_cache_shape(4, 16, 1, 8)
    meta = AttentionMetadata.build(
        phase=Phase.PREFILL, slot_mapping=[17, -1, 18], block_tables=[[1]], context_lens=[0],
        query_lens=[3], block_size=16, device=torch.device("cpu"),
    )
    k = torch.arange(3.0)[:, None, None].expand(3, 1, 8)
    backend.store_kv(k, -k, kc, vc, backend.prepare(meta))
    assert kc[1, 0, 1].eq(0).all() and kc[1, 0, 2].eq(2).all() and vc[1, 0, 2].eq(-2).all()
    assert kc.count_nonzero() == 8  # only slot 18 (block 1, offset 2) is non-zero


def test_get_backend_cpu():
    backend = get_backend(torch.device("cpu"))
    assert isinstance(backend, CpuBackend) and isinstance(backend, AttentionBackend)
    assert backend.name == "cpu" and backend.block_size_for(64) == 16
