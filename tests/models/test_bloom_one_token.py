"""BLOOM's native blocks for a decode step of one sequence (``models/bloom_one_token.py``,
``device_kernels/cpu_bloom.c``) against the PyTorch blocks and HF transformers.

The tiny checkpoints keep the packed profile on their own (too small to calibrate), so each test
loads them with the profile a large model gets where the native kernels measure fastest.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_models import (  # noqa: F401 (fixtures)
    BLOCK_SIZE,
    PagedRunner,
    Seq,
    assert_logprobs_close,
    bloom_noisy_dir,
    bloom_postln_dir,
    hf_generate,
    hf_model,
)
from tgi_npu_backend.kernels import AttentionMetadata, Phase, get_backend
from tgi_npu_backend.kernels.cpu import CpuBackend
from tgi_npu_backend.kernels.cpu_native import bloom_kernel
from tgi_npu_backend.models.bloom_one_token import time_steps
from tgi_npu_backend.models.layers.cpu_gemm import PLAIN, GemmProfile
from tgi_npu_backend.models.registry import load_model

CPU = torch.device("cpu")
NATIVE = GemmProfile(pack=False, small="native", large="mkl", one="native", head="native",
                     head_one="native", measured="(set by the test)")
needs_kernel = pytest.mark.skipif(bloom_kernel() is None, reason="needs AVX-512 and a C compiler")
PROMPT, NEW = 30, 40  # the decode steps cross two block boundaries (32, 48)


def _load(path, monkeypatch, profile=NATIVE, backend=None, dtype=torch.float32, timed=(1.0, 0.5)):
    """``path`` loaded with ``profile``; the load-time timing reports ``timed`` (blocks, native)
    seconds (None: really timed), so that a busy machine cannot change which path a test runs."""
    monkeypatch.setattr("tgi_npu_backend.models.registry.gemm_profile", lambda model, mode: profile)
    if timed is not None:
        monkeypatch.setattr("tgi_npu_backend.models.bloom_one_token.time_steps", lambda model, native: timed)
    return load_model(path, dtype=dtype, device=CPU, backend=backend or get_backend(CPU))


def _generate(model, prompt: list[int], native: bool) -> Seq:
    """``prompt`` alone: one prefill, then NEW - 1 decode steps of one sequence, greedy, with the
    native blocks on or off; counts the steps they ran."""
    kept, calls = model.one_token, []
    model.one_token = _Counting(kept, calls) if native else None
    try:
        runner = PagedRunner(model, seed=3)
        seq = Seq(prompt, NEW)
        runner.prefill([seq])
        while not seq.done:
            runner.decode([seq])
    finally:
        model.one_token = kept
    assert len(calls) == (NEW - 1 if native else 0)
    return seq


class _Counting:
    """The native blocks, counting their calls."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def takes(self, *args):
        return self.inner.takes(*args)

    def __call__(self, *args):
        self.calls.append(1)
        return type(self.inner).__call__(self.inner, *args)


@needs_kernel
@pytest.mark.parametrize("ckpt", ["bloom_dir", "bloom_noisy_dir", "bloom_postln_dir"])
def test_native_blocks_match_the_pytorch_blocks_and_hf(ckpt, request, monkeypatch):
    path = request.getfixturevalue(ckpt)
    model = _load(path, monkeypatch)
    assert model.one_token is not None
    prompt = torch.randint(3, model.config.vocab_size, (PROMPT,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    fused, blocks = _generate(model, prompt, native=True), _generate(model, prompt, native=False)
    assert fused.generated == blocks.generated
    for step, (a, b) in enumerate(zip(fused.step_logits, blocks.step_logits, strict=True)):
        err = float((a - b).abs().max()) / float(b.abs().max())
        assert err < 1e-5, f"{ckpt} step {step}: logits differ by {err:.2e} (relative)"
    tokens, logits = hf_generate(hf_model(path, torch.float32), prompt, NEW)
    assert fused.generated == tokens
    assert_logprobs_close(torch.stack(fused.step_logits), logits, tokens, f"{ckpt} native steps")


@needs_kernel
def test_the_token_is_stored_in_its_slot_of_every_layer(bloom_dir, monkeypatch):
    model = _load(bloom_dir, monkeypatch)
    prompt = list(range(5, 5 + PROMPT))
    runners = []
    for native in (True, False):
        model_one = model.one_token
        model.one_token = model_one if native else None
        runner = PagedRunner(model, seed=3)
        seq = Seq(prompt, 3)
        runner.prefill([seq])
        runner.decode([seq])
        model.one_token = model_one
        runners.append((runner, seq))
    (fused, seq), (blocks, _) = runners
    slot = seq.blocks[PROMPT // BLOCK_SIZE] * BLOCK_SIZE + PROMPT % BLOCK_SIZE
    for (fk, fv), (bk, bv) in zip(fused.caches, blocks.caches, strict=True):
        blk, off = divmod(slot, BLOCK_SIZE)
        assert fk[blk, :, off].abs().sum() > 0
        torch.testing.assert_close(fk[blk, :, off], bk[blk, :, off], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fv[blk, :, off], bv[blk, :, off], rtol=1e-5, atol=1e-5)


@needs_kernel
def test_only_a_decode_step_of_one_sequence_runs_natively(bloom_dir, monkeypatch):
    model = _load(bloom_dir, monkeypatch)
    one_token = model.one_token
    caches = PagedRunner(model).caches

    def meta(phase, lens):
        return AttentionMetadata.build(
            phase=phase, slot_mapping=[16 + i for i in range(sum(q for _, q in lens))],
            block_tables=[[1, 2]] * len(lens), context_lens=[c for c, _ in lens],
            query_lens=[q for _, q in lens], block_size=BLOCK_SIZE, device=CPU)

    one = torch.tensor([5])
    two = torch.tensor([5, 6])
    assert one_token.takes(one, caches, meta(Phase.DECODE, [(5, 1)]))
    assert not one_token.takes(two, caches, meta(Phase.DECODE, [(5, 1), (7, 1)]))
    assert not one_token.takes(one, caches, meta(Phase.PREFILL, [(0, 1)]))
    assert not one_token.takes(one, caches, meta(Phase.MIXED, [(0, 1)]))


@needs_kernel
def test_a_slot_a_length_or_a_token_outside_the_cache_is_refused_in_words(bloom_dir, monkeypatch):
    model = _load(bloom_dir, monkeypatch)
    caches = PagedRunner(model).caches
    num_blocks = caches[0][0].shape[0]
    token = torch.tensor([7])
    vocab = model.config.vocab_size

    def meta(slot, tokens, table):
        return AttentionMetadata.build(
            phase=Phase.DECODE, slot_mapping=[slot], block_tables=[table],
            context_lens=[tokens - 1], query_lens=[1], block_size=BLOCK_SIZE, device=CPU)

    with pytest.raises(IndexError, match=f"slot {num_blocks * BLOCK_SIZE} is outside the KV cache"):
        model.one_token(token, caches, meta(num_blocks * BLOCK_SIZE, 3, [1]))
    with pytest.raises(IndexError, match=r"40 tokens do not fit the block table row \[1, 2\]"):
        model.one_token(token, caches, meta(17, 40, [1, 2]))
    with pytest.raises(IndexError, match="do not fit the block table row"):
        model.one_token(token, caches, meta(17, 3, [num_blocks + 5]))
    for bad in (vocab, -1):
        with pytest.raises(IndexError, match=rf"token id {bad} is outside the vocabulary \(ids 0 to {vocab - 1}\)"):
            model.one_token(torch.tensor([bad]), caches, meta(17, 3, [1]))
    wrong = [(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()) for k, v in caches]
    with pytest.raises(ValueError, match="the native BLOOM blocks take"):
        model.one_token(token, wrong, meta(17, 3, [1]))
    # the model still serves
    out = model.one_token(token, caches, meta(17, 3, [1]))
    assert out.shape == (1, model.config.hidden_size) and bool(torch.isfinite(out).all())


@needs_kernel
def test_no_kv_pool_is_kept_alive_between_calls(bloom_dir, monkeypatch):
    """Warmup's pool, and the load-time timing's, are freed when their owners drop them."""
    model = _load(bloom_dir, monkeypatch)
    runner = PagedRunner(model, seed=3)
    seq = Seq(list(range(5, 25)), 3)
    runner.prefill([seq])
    runner.decode([seq])
    gone = weakref.ref(runner.caches[0][0])
    del runner
    gc.collect()
    assert gone() is None


@needs_kernel
def test_the_native_blocks_run_only_where_they_measure_faster(bloom_dir, monkeypatch):
    assert _load(bloom_dir, monkeypatch, timed=(0.002, 0.003)).one_token is None
    assert _load(bloom_dir, monkeypatch, timed=(0.003, 0.002)).one_token is not None


@needs_kernel
def test_timing_runs_both_paths_on_a_scratch_cache(bloom_dir, monkeypatch):
    model = _load(bloom_dir, monkeypatch)
    calls = {"blocks": 0, "native": 0}
    for block in model.h:
        monkeypatch.setattr(block, "forward", _counted(block.forward, calls, "blocks"))
    native = _Counting(model.one_token, [])
    blocks_s, native_s = time_steps(model, native, repeats=2)
    assert blocks_s > 0 and native_s > 0
    # one untimed call each, then two timed ones, every block each time
    assert calls["blocks"] == 3 * len(model.h) and len(native.calls) == 3


def _counted(fn, calls, key):
    def run(*args):
        calls[key] += 1
        return fn(*args)
    return run


@pytest.mark.parametrize("case", ["plain profile", "bfloat16", "python decode", "gemma"])
def test_the_native_blocks_are_left_out_where_they_would_compute_differently(case, request, monkeypatch):
    if case == "gemma":
        model = _load(request.getfixturevalue("gemma_mqa_dir"), monkeypatch)
        assert not hasattr(model, "one_token")
        return
    bloom = request.getfixturevalue("bloom_dir")
    kwargs = {"plain profile": {"profile": PLAIN}, "bfloat16": {"dtype": torch.bfloat16},
              "python decode": {"backend": CpuBackend(native=False)}}[case]
    assert _load(bloom, monkeypatch, **kwargs).one_token is None
