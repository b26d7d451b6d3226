"""The all-greedy sampling step's native kernel (``device_kernels/cpu_sample.c``) against numpy's
argmax and a float64 log_softmax, and the chooser's use of it (``logprobs.greedy``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tgi_npu_backend.kernels.cpu_native import greedy_kernel

from tgi_npu_backend import logprobs as lp
from tgi_npu_backend.sampling import SamplingParams, TokenChooser

KERNEL = greedy_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the native greedy step needs AVX-512 and a C compiler")
NEG_INF, POS_INF, NAN = float("-inf"), float("inf"), float("nan")


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    """1, 2 and 3 threads share a row's chunks differently (3 is more than this machine's cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def float64_log_softmax(scores: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(scores.double(), dim=-1)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 32])
@pytest.mark.parametrize("cols", [1, 7, 16, 17, 33, 1000, 4099, 250880])
def test_argmax_and_log_softmax_match_numpy_and_float64(threads, rows, cols):
    if rows * cols > 2_000_000:
        rows = 3
    scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols)) * 6
    ids, logprobs = KERNEL(scores)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32 and logprobs.shape == scores.shape
    assert ids.tolist() == scores.numpy().argmax(-1).tolist()
    # float32 rounding of a value near -log(cols) - 6 sigma: what torch's own log_softmax also shows
    torch.testing.assert_close(logprobs.double(), float64_log_softmax(scores), rtol=0, atol=2e-5)
    ours = (logprobs.double() - float64_log_softmax(scores)).abs().max()
    theirs = (torch.log_softmax(scores, -1).double() - float64_log_softmax(scores)).abs().max()
    assert ours <= max(4 * theirs, 1e-6)


@needs_kernel
def test_a_rows_results_do_not_depend_on_its_batch_or_the_threads():
    """The same bits for a row alone, in a batch of 5, and with 1, 2 or 3 threads: the chooser's
    greedy and general paths, and batches of any size, give a request the same logprobs."""
    scores = torch.randn(5, 250880, generator=torch.Generator().manual_seed(5)) * 5
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(KERNEL(scores))
            runs.append(KERNEL(scores[2:3].clone()))
    finally:
        torch.set_num_threads(before)
    for ids, logprobs in runs[0::2]:
        assert torch.equal(ids, runs[0][0]) and torch.equal(logprobs, runs[0][1])
    for ids, logprobs in runs[1::2]:
        assert torch.equal(ids, runs[0][0][2:3]) and torch.equal(logprobs, runs[0][1][2:3])


@needs_kernel
def test_ties_take_the_first_index_across_chunks(threads):
    """numpy's rule: the first maximum, also when the tied maxima fall in different chunks (of
    16,384 elements) or the first one sits in a partial last vector."""
    for cols in (10, 40, 1001, 16385, 250880):
        for places in ([cols - 1, 0], [cols // 2, cols - 1], [cols - 1], [3, cols // 2 + 1], [16383, 16384]):
            places = [min(p, cols - 1) for p in places]
            scores = torch.zeros(2, cols)
            scores[0, places] = 5.0
            scores[1, [p for p in places if p != places[0]] or places] = 5.0
            ids, _ = KERNEL(scores)
            assert ids.tolist() == scores.numpy().argmax(-1).tolist(), (cols, places)


@needs_kernel
def test_masked_scores(threads):
    """A grammar's -inf mask: masked tokens get -inf, the rest the log_softmax of the allowed ones;
    a chunk entirely masked adds nothing."""
    cols = 50_000
    scores = torch.randn(2, cols, generator=torch.Generator().manual_seed(1))
    scores[0, : cols - 40] = NEG_INF  # every chunk but the last one masked
    scores[1, 1::2] = NEG_INF
    ids, logprobs = KERNEL(scores)
    assert ids.tolist() == scores.numpy().argmax(-1).tolist()
    assert torch.isneginf(logprobs[scores.isneginf()]).all()
    torch.testing.assert_close(logprobs.double(), float64_log_softmax(scores), rtol=0, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf", "no columns"])
def test_rows_it_leaves_to_torch(threads, bad):
    """A NaN, +inf, or a row of only -inf: the kernel returns None and the chooser's torch ops
    decide, as before it (NaN rows all NaN, argmax the first NaN)."""
    scores = torch.randn(3, 0 if bad == "no columns" else 300)
    if bad == "nan":
        scores[1, 7] = NAN
    elif bad == "inf":
        scores[2, 250] = POS_INF
    elif bad == "all -inf":
        scores[0] = NEG_INF
    assert KERNEL(scores) is None
    if bad == "no columns":
        return
    ids, logprobs = TokenChooser([SamplingParams()] * 3)(scores)
    assert ids.tolist() == scores.numpy().argmax(-1).tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(scores, -1), equal_nan=True)


@needs_kernel
def test_refuses_what_it_cannot_read():
    for scores in (torch.randn(2, 8, dtype=torch.float64), torch.randn(8), torch.randn(8, 2).t()):
        with pytest.raises(TypeError, match="contiguous float32"):
            KERNEL(scores)
    ids, logprobs = KERNEL(torch.zeros(0, 8))
    assert ids.shape == (0,) and logprobs.shape == (0, 8)


def test_chooser_runs_it_on_float32_cpu_scores_only(monkeypatch):
    """The fast path calls the kernel for contiguous float32 CPU scores (the chooser casts logits
    to float32 first) and torch's ops otherwise; both give the same ids."""
    calls = []

    def spy(scores):
        calls.append(scores.shape)
        return None if KERNEL is None else KERNEL(scores)

    monkeypatch.setattr(lp, "greedy_kernel", lambda: spy)
    chooser = TokenChooser([SamplingParams()] * 2)
    logits = torch.randn(2, 500, generator=torch.Generator().manual_seed(3))
    ids, logprobs = chooser(logits.half())
    assert calls == [(2, 500)]
    assert ids.tolist() == logits.half().float().numpy().argmax(-1).tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits.half().float(), -1))
    assert lp.greedy(logits.t().contiguous().t())[0].tolist() == logits.numpy().argmax(-1).tolist()
    assert calls == [(2, 500)]  # a non-contiguous view: torch's ops


def test_without_the_kernel_the_chooser_uses_torch(monkeypatch):
    monkeypatch.setattr(lp, "greedy_kernel", lambda: None)
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(4))
    ids, logprobs = TokenChooser([SamplingParams()] * 4)(logits)
    assert torch.equal(ids, torch.from_numpy(np.asarray(logits.numpy().argmax(-1))))
    assert torch.equal(logprobs, torch.log_softmax(logits, -1))
