"""TokenChooser with grammar rows: forbidden tokens never chosen, sampling and warpers on the
masked distribution, logprobs of the masked scores (TGI's convention), rows without a grammar
bit-identical to a chooser that has no grammar at all."""

from __future__ import annotations

import pytest
import torch

from tgi_npu_backend.grammar import GrammarSpec, GrammarState, compiler_for
from tgi_npu_backend.sampling import SamplingParams, TokenChooser

EOS = 2
SPEC = GrammarSpec("regex", "(cat|dog|bird)s?")
GREEDY = SamplingParams()
SAMPLED = SamplingParams(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=7)
TYPICAL = SamplingParams(do_sample=True, typical_p=0.5, repetition_penalty=1.3, seed=3)


def state(tokenizer, request_id=1, spec=SPEC):
    return GrammarState.start(request_id, spec, compiler_for(tokenizer, {EOS}))


def allowed_of(s) -> torch.Tensor:
    from tgi_npu_backend.grammar import GrammarMasks

    return GrammarMasks([0], [s], "cpu").allowed(VOCAB)[0]


VOCAB = 520  # the tiny tokenizer's 512 ids plus padding logits


@pytest.mark.parametrize("free", [GREEDY, SAMPLED, TYPICAL])
@pytest.mark.parametrize("constrained", [GREEDY, SAMPLED, TYPICAL])
def test_free_rows_equal_a_chooser_without_grammar(tokenizer, free, constrained):
    torch.manual_seed(0)
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    plain = TokenChooser([free, free])
    mixed = TokenChooser([free, constrained, free], grammars=[None, state(tokenizer), None])
    for _ in range(4):
        logits = torch.randn(3, VOCAB)
        want_ids, want_lp = plain(logits[[0, 2]], [ids[0], ids[2]])
        got_ids, got_lp = mixed(logits, ids)
        assert torch.equal(got_ids[[0, 2]], want_ids)
        assert torch.equal(got_lp[[0, 2]], want_lp)
        assert bool(allowed_of(mixed.grammars[1])[got_ids[1]])
        mixed.grammars[1].advance(int(got_ids[1]))
        for row, token in zip(ids, got_ids.tolist()):
            row.append(token)


def test_greedy_takes_the_best_allowed_token_and_masked_logprobs(tokenizer):
    s = state(tokenizer)
    logits = torch.randn(1, VOCAB)
    allowed = allowed_of(s)
    next_ids, logprobs = TokenChooser([GREEDY], grammars=[s])(logits, [[5]])
    best = torch.where(allowed, logits[0], float("-inf")).argmax()
    assert int(next_ids[0]) == int(best)
    assert torch.isinf(logprobs[0][~allowed]).all()
    assert torch.allclose(logprobs[0][allowed], torch.log_softmax(logits[0][allowed], dim=0))


def test_sampling_draws_from_the_masked_distribution(tokenizer):
    s = state(tokenizer)
    allowed = allowed_of(s)
    torch.manual_seed(1)
    logits = torch.randn(1, VOCAB) * 2
    params = lambda seed: SamplingParams(do_sample=True, temperature=1.5, seed=seed)  # noqa: E731
    draws = 1500
    counts = torch.zeros(VOCAB)
    for seed in range(draws):
        token, _ = TokenChooser([params(seed)], grammars=[s])(logits, [[5]])
        counts[token] += 1
    assert counts[~allowed].sum() == 0
    expected = torch.softmax(logits[0][allowed] / 1.5, dim=0)
    assert torch.allclose(counts[allowed] / draws, expected, atol=0.04)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED, TYPICAL])
def test_filter_and_concatenate_keep_each_grammar_state(tokenizer, params):
    a, b = state(tokenizer, 1), state(tokenizer, 2)
    one = TokenChooser([params], grammars=[a])
    two = TokenChooser([params, GREEDY], grammars=[b, None])
    both = TokenChooser.concatenate([one, two])
    assert both.grammars == [a, b, None]
    kept = both.filter([1])
    assert kept.grammars == [b]
    token, _ = kept(torch.randn(1, VOCAB), [[5]])
    assert bool(allowed_of(b)[token])
