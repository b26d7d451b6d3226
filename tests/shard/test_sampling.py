"""TokenChooser and top_n_tokens against oracles: HF transformers' logits processors applied row by
row, straightforward per-row penalties and watermark, and TGI's own top-n test case."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tgi_npu_backend.logprobs import top_n_tokens
from tgi_npu_backend.sampling import WATERMARK_HASH_KEY, SamplingParams, TokenChooser

VOCAB = 64


def oracle_logprobs(
    logits: torch.Tensor, ids: list[int], p: SamplingParams, gamma: float = 0.5, delta: float = 2.0
) -> torch.Tensor:
    """One row, the slow obvious way: ``[V]`` log-probabilities of the warped scores."""
    scores = logits.clone().unsqueeze(0)  # [1, V]
    vocab = scores.shape[-1]
    ids_t = torch.tensor([ids])
    if p.watermark:
        rng = torch.Generator().manual_seed(WATERMARK_HASH_KEY * ids[-1])
        green = torch.randperm(vocab, generator=rng)[: int(vocab * gamma)]
        scores[0, green] += delta
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids_t, scores)
    if p.frequency_penalty != 0.0:
        for token in set(ids):
            scores[0, token] -= p.frequency_penalty * ids.count(token) / len(ids)
    if p.temperature != 1.0:
        scores = TemperatureLogitsWarper(p.temperature)(ids_t, scores)
    if p.top_k != 0:
        scores = TopKLogitsWarper(p.top_k)(ids_t, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids_t, scores)
    if p.typical_p < 1.0:
        scores = TypicalLogitsWarper(p.typical_p)(ids_t, scores)
    return torch.log_softmax(scores, dim=-1)[0]


def random_params(rng: random.Random, seed: int) -> SamplingParams:
    """Heterogeneous parameters: each feature on for about half of the rows."""
    on = lambda: rng.random() < 0.5
    return SamplingParams(
        temperature=rng.uniform(0.3, 2.0) if on() else 1.0,
        top_k=rng.randint(1, VOCAB + 10) if on() else 0,
        top_p=rng.uniform(0.05, 0.99) if on() else 1.0,
        typical_p=rng.uniform(0.05, 0.99) if on() else 1.0,
        do_sample=on(),
        seed=seed,
        repetition_penalty=rng.uniform(0.5, 2.0) if on() else 1.0,
        frequency_penalty=rng.uniform(-2.0, 2.0) if on() else 0.0,
        watermark=on(),
    )


def random_ids(rng: random.Random) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]


# --- SamplingParams -------------------------------------------------------------------------------


def test_defaults_are_greedy():
    p = SamplingParams()
    p.validate()
    assert not p.is_sampling


@pytest.mark.parametrize(
    "kwargs",
    [{"do_sample": True}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.9}, {"typical_p": 0.5}],
)
def test_is_sampling_follows_tgi(kwargs):
    assert SamplingParams(**kwargs).is_sampling


def test_penalties_and_watermark_stay_greedy():
    p = SamplingParams(repetition_penalty=1.3, frequency_penalty=1.0, watermark=True)
    assert not p.is_sampling


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"typical_p": 0.0}, "typical_p"),
        ({"typical_p": 1.01}, "typical_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_validate_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs).validate()
    with pytest.raises(ValueError, match=f"request 1 of the batch: {name}"):
        TokenChooser([SamplingParams(), SamplingParams(**kwargs)])


# --- warping vs HF, row by row --------------------------------------------------------------------


@pytest.mark.parametrize("trial", range(4))
def test_warped_logprobs_match_hf_row_by_row(trial):
    rng = random.Random(trial)
    batch = 12
    params = [random_params(rng, seed=i) for i in range(batch)]
    ids = [random_ids(rng) for _ in range(batch)]
    logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(trial)) * 3
    next_ids, logprobs = TokenChooser(params)(logits, ids)
    assert next_ids.shape == (batch,) and next_ids.dtype == torch.int64
    assert logprobs.shape == (batch, VOCAB) and logprobs.dtype == torch.float32
    for i, p in enumerate(params):
        expected = oracle_logprobs(logits[i], ids[i], p)
        torch.testing.assert_close(logprobs[i], expected, rtol=1e-5, atol=1e-5)
        # the chosen token is always one the warpers kept
        assert logprobs[i, next_ids[i]] > -math.inf
        if not p.is_sampling:
            assert next_ids[i] == expected.argmax()


def test_rows_without_a_warper_are_untouched():
    """A greedy row next to rows with every warper on gets plain log_softmax and argmax, even with
    extreme logits whose probabilities underflow to 0 (top-p's cumsum must not drop them)."""
    logits = torch.randn(3, VOCAB) * 40
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.5, top_k=3, top_p=0.5, typical_p=0.5, seed=1),
        SamplingParams(do_sample=True, seed=2),
    ]
    ids = [[1, 2], [3], [4, 5, 6]]
    next_ids, logprobs = TokenChooser(params)(logits, ids)
    torch.testing.assert_close(logprobs[0], torch.log_softmax(logits[0], -1))
    torch.testing.assert_close(logprobs[2], torch.log_softmax(logits[2], -1))
    assert next_ids[0] == logits[0].argmax()
    alone_ids, alone_logprobs = TokenChooser(params[:1])(logits[:1], ids[:1])
    assert torch.equal(alone_ids[0], next_ids[0]) and torch.equal(alone_logprobs[0], logprobs[0])


def test_repetition_penalty_ignores_padding_and_out_of_vocab_ids():
    """Rows of different lengths: token 0 is penalised only where it really occurs."""
    logits = torch.full((2, 8), 2.0)
    logits[:, 1] = -2.0
    params = [SamplingParams(repetition_penalty=2.0)] * 2
    _, logprobs = TokenChooser(params)(logits, [[5], [0, 1, 5, 5, 5, 5, 100]])
    scores = logprobs - logprobs[:, 7:8]  # undo the log_softmax shift (token 7 is never present)
    torch.testing.assert_close(scores[0], torch.tensor([0, -4, 0, 0, 0, -1, 0, 0.0]))
    torch.testing.assert_close(scores[1], torch.tensor([-1, -6, 0, 0, 0, -1, 0, 0.0]))


def test_frequency_penalty_is_count_over_own_length():
    """TGI's heterogeneous formula, with each row's own length (not the batch's padded width)."""
    logits = torch.zeros(2, 6)
    params = [SamplingParams(frequency_penalty=1.5), SamplingParams(frequency_penalty=-1.0)]
    ids = [[1, 1, 2, 3], [4, 4, 4, 4, 4, 4, 4, 1]]
    _, logprobs = TokenChooser(params)(logits, ids)
    scores = logprobs - logprobs[:, 0:1]  # token 0 never occurs: its score stays 0
    torch.testing.assert_close(scores[0], torch.tensor([0, -0.75, -0.375, -0.375, 0, 0]))
    torch.testing.assert_close(scores[1], torch.tensor([0, 0.125, 0, 0, 0.875, 0]))


# --- watermark ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, delta, vocab", [(0.5, 2.0, 101), (0.25, 5.0, 64)])
def test_watermark_adds_delta_exactly_on_the_green_list(gamma, delta, vocab):
    logits = torch.randn(2, vocab)
    ids = [[3, 17], [3, 17]]
    params = [SamplingParams(watermark=True), SamplingParams()]
    _, logprobs = TokenChooser(params, watermark_gamma=gamma, watermark_delta=delta)(logits, ids)
    shift = logprobs - torch.log_softmax(logits, -1)  # [2, V]: delta on green + a row constant
    green = (shift[0] - shift[0].min()) > delta / 2
    assert int(green.sum()) == int(vocab * gamma)
    torch.testing.assert_close(
        shift[0][green] - shift[0].min(), torch.full_like(shift[0][green], delta)
    )
    rng = torch.Generator().manual_seed(WATERMARK_HASH_KEY * 17)
    expected = torch.randperm(vocab, generator=rng)[: int(vocab * gamma)]
    assert set(torch.nonzero(green).flatten().tolist()) == set(expected.tolist())
    torch.testing.assert_close(shift[1], torch.zeros(vocab))  # the other row is untouched


# --- sampling: seeds, batching, filter/concatenate ------------------------------------------------


def step_logits(request: int, step: int) -> torch.Tensor:
    """Logits that depend only on the request and the step: ``[V]``."""
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(1000 * request + step))


def run(chooser: TokenChooser, requests: list[int], histories: dict[int, list[int]], steps: int):
    for step in range(steps):
        logits = torch.stack([step_logits(r, len(histories[r])) for r in requests])
        next_ids, _ = chooser(logits, [histories[r] for r in requests])
        for r, token in zip(requests, next_ids.tolist()):
            histories[r].append(token)


PARAMS = {
    0: SamplingParams(do_sample=True, seed=42, repetition_penalty=1.2),
    1: SamplingParams(temperature=1.5, top_k=20, seed=7, watermark=True),
    2: SamplingParams(),  # greedy
    3: SamplingParams(top_p=0.9, typical_p=0.95, seed=42, frequency_penalty=0.5),
}


def alone(request: int, steps: int) -> list[int]:
    histories = {request: [1]}
    run(TokenChooser([PARAMS[request]]), [request], histories, steps)
    return histories[request]


def test_same_seed_same_tokens_alone_and_in_a_batch():
    steps = 12
    expected = {r: alone(r, steps) for r in PARAMS}
    for order in ([3, 0, 2, 1], [2, 1, 0, 3]):
        histories = {r: [1] for r in PARAMS}
        run(TokenChooser([PARAMS[r] for r in order]), order, histories, steps)
        assert histories == expected
    assert expected[0] != expected[3]  # same seed, different parameters and logits


def test_filter_and_concatenate_keep_generator_state():
    steps = 10
    expected = {r: alone(r, steps) for r in PARAMS}
    histories = {r: [1] for r in PARAMS}
    chooser = TokenChooser([PARAMS[0], PARAMS[1]])
    run(chooser, [0, 1], histories, 4)  # 0: 4 tokens, 1: 4 tokens
    chooser = chooser.filter([1, 0])
    run(chooser, [1, 0], histories, 2)  # 6, 6
    chooser = chooser.filter([1])  # request 1 finished early
    run(chooser, [0], histories, 1)  # 0: 7
    newcomer = TokenChooser([PARAMS[3], PARAMS[2]])
    run(newcomer, [3, 2], histories, 3)  # 3: 3, 2: 3
    chooser = TokenChooser.concatenate([newcomer, chooser])
    run(chooser, [3, 2, 0], histories, 3)  # 0: 10, 3: 6, 2: 6
    chooser = chooser.filter([0, 1])
    run(chooser, [3, 2], histories, 4)  # 3: 10, 2: 10
    for r in (0, 2, 3):
        assert histories[r] == expected[r], r
    assert histories[1] == expected[1][:7]


def test_filter_does_not_disturb_the_original_chooser():
    steps = 6
    expected = alone(0, steps)
    histories = {0: [1]}
    chooser = TokenChooser([PARAMS[0]])
    run(chooser, [0], histories, 3)
    run(chooser.filter([0]), [0], {0: list(histories[0])}, 3)  # a throw-away continuation
    run(chooser, [0], histories, 3)
    assert histories[0] == expected


def test_different_seeds_give_different_streams():
    logits = torch.zeros(1, VOCAB)  # uniform: the stream is the seed's noise

    def stream(seed: int, steps: int = 20) -> list[int]:
        chooser = TokenChooser([SamplingParams(do_sample=True, seed=seed)])
        return [int(chooser(logits, [[0]])[0][0]) for _ in range(steps)]

    assert stream(1) != stream(2)
    assert stream(1) == stream(1)
    assert len(set(stream(1))) > 1  # the generator advances every step


def test_sampling_follows_the_warped_distribution():
    """2000 rows with distinct seeds, one step: token frequencies match softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(2000, 1)
    params = [SamplingParams(temperature=0.8, seed=s) for s in range(2000)]
    next_ids, logprobs = TokenChooser(params)(logits, [[0]] * 2000)
    freq = torch.bincount(next_ids, minlength=5).float() / 2000
    torch.testing.assert_close(freq, logprobs[0].exp(), atol=0.03, rtol=0)


def test_wrong_batch_size_is_an_error():
    with pytest.raises(ValueError, match="filter/concatenate"):
        TokenChooser([SamplingParams()])(torch.zeros(2, VOCAB), [[1], [2]])


# --- top-n ----------------------------------------------------------------------------------------


def test_top_n_tokens_tgi_case_with_ties():
    logprobs = torch.tensor([[-1.0, -3.0, -4.0, -2.0, -3.0]] * 3)
    result = top_n_tokens(logprobs, [2, 3, 0])
    assert result[0] == ([0, 3], [-1.0, -2.0])
    assert result[1] == ([0, 3, 1, 4], [-1.0, -2.0, -3.0, -3.0])
    assert result[2] == ([], [])


def test_top_n_tokens_none_requested_and_bounds():
    logprobs = torch.log_softmax(torch.randn(2, 6), -1)
    assert top_n_tokens(logprobs, [0, 0]) == [([], []), ([], [])]
    ids, values = top_n_tokens(logprobs, [10, 1])[0]  # n > V: the whole vocabulary
    assert sorted(ids) == list(range(6)) and values == sorted(values, reverse=True)
    masked = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf]])
    assert top_n_tokens(masked, [3]) == [([0], [0.0])]  # -inf tokens are never alternatives


def test_top_n_tokens_matches_per_row_oracle():
    gen = torch.Generator().manual_seed(0)
    logprobs = torch.randint(-6, 0, (16, 40), generator=gen).float()  # many ties
    top_n = [random.Random(i).randint(0, 6) for i in range(16)]
    for row, n, (ids, values) in zip(logprobs.tolist(), top_n, top_n_tokens(logprobs, top_n)):
        if n == 0:
            assert ids == [] and values == []
            continue
        nth = sorted(row, reverse=True)[n - 1]
        expected = sorted((i for i, v in enumerate(row) if v >= nth), key=lambda i: (-row[i], i))
        assert ids == expected and values == [row[i] for i in expected]


def test_all_greedy_fast_path_equals_the_general_path():
    """An all-greedy batch with no processor skips them all: same ids and logprobs as the
    general path; any processor or sampling row in the batch turns the fast path off."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    chooser = TokenChooser([SamplingParams()] * 5)
    assert chooser._plain_greedy
    fast = chooser(logits, [[1, 2]] * 5)
    chooser._plain_greedy = False
    general = chooser(logits, [[1, 2]] * 5)
    assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])
    for other in (
        SamplingParams(repetition_penalty=1.2),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(watermark=True),
        SamplingParams(do_sample=True),
        SamplingParams(top_k=5),
    ):
        assert not TokenChooser([SamplingParams(), other])._plain_greedy


def test_history_is_read_only_by_the_processors_that_need_it():
    """Without a penalty or a watermark the chooser needs no token history (the runner passes
    None); with one, leaving it out is refused with what to pass."""
    logits = torch.randn(2, VOCAB)
    plain = TokenChooser([SamplingParams(), SamplingParams(seed=3, do_sample=True)])
    assert not plain.uses_history
    ids, logprobs = plain(logits)
    assert ids.shape == (2,) and logprobs.shape == (2, VOCAB)
    assert torch.equal(ids[:1], logits[:1].argmax(-1))
    penalised = TokenChooser([SamplingParams(repetition_penalty=1.3)])
    assert penalised.uses_history
    with pytest.raises(ValueError, match="pass input_ids"):
        penalised(logits[:1])
    with pytest.raises(ValueError, match="logits for 3 and input_ids for no"):
        plain(torch.randn(3, VOCAB))  # the wrong batch size is named even without a history
