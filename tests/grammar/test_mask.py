"""GrammarMasks and GrammarState against an independent oracle: a regex with a finite language,
where a token may be allowed only when the text so far plus the token's text is a prefix of one
of the language's words, EOS exactly when the text so far is one of them, and every word's own
tokenization must stay allowed step by step.

NOTE: llguidance also prunes tokens that can only lead to a non-canonical tokenization (after
"c", "a" is refused because "cat" always tokenizes as "c" + "at"), so its allowed set is a
subset of the oracle's, not equal to it."""

from __future__ import annotations

import pytest
import torch

from tgi_npu_backend.grammar import GrammarMasks, GrammarSpec, GrammarState, compiler_for

WORDS = ["cat", "cats", "dog", "dogs", "bird", "birds"]
SPEC = GrammarSpec("regex", "(cat|dog|bird)s?")
EOS = 2


def state(tokenizer, request_id: int = 1) -> GrammarState:
    return GrammarState.start(request_id, SPEC, compiler_for(tokenizer, {EOS}))


def oracle(tokenizer, text: str, vocab: int) -> torch.Tensor:
    allowed = torch.zeros(vocab, dtype=torch.bool)
    for t in range(len(tokenizer)):
        if t in tokenizer.all_special_ids:
            continue
        piece = tokenizer.decode([t])
        if piece and any(w.startswith(text + piece) for w in WORDS):
            allowed[t] = True
    allowed[EOS] = text in WORDS
    return allowed


def advance(tokenizer, s: GrammarState, text: str) -> None:
    for t in tokenizer(text)["input_ids"]:
        s.advance(t)


@pytest.mark.parametrize("prefix", ["", "c", "ca", "cat", "cats", "bir", "dogs"])
def test_masks_follow_the_language(tokenizer, prefix):
    vocab = len(tokenizer) + 8  # the model has padding logits past the tokenizer (as BLOOM)
    torch.manual_seed(0)
    scores = torch.randn(4, vocab)
    grammar_rows = [0, 2]
    states = [state(tokenizer), state(tokenizer, 2)]
    advance(tokenizer, states[0], prefix)  # row 0 at the prefix, row 2 at the start
    masked = GrammarMasks(grammar_rows, states, torch.device("cpu"))(scores)

    for row, text in ((0, prefix), (2, "")):
        expect = oracle(tokenizer, text, vocab)
        allowed = torch.isfinite(masked[row])
        assert allowed.any() and not (allowed & ~expect).any(), text
        assert bool(allowed[EOS]) == bool(expect[EOS]), text
        assert not allowed[len(tokenizer):].any()  # padding logits never
        assert torch.equal(masked[row][allowed], scores[row][allowed])  # allowed logits untouched
    for row in (1, 3):  # rows without a grammar: bit for bit
        assert torch.equal(masked[row], scores[row])
    assert torch.isfinite(scores).all()  # out of place


@pytest.mark.parametrize("word", WORDS)
def test_each_word_tokenized_stays_allowed(tokenizer, word):
    s = state(tokenizer)
    for t in tokenizer(word)["input_ids"] + [EOS]:
        assert GrammarMasks([0], [s], "cpu").allowed(len(tokenizer))[0, t], (word, t)
        s.advance(t)
    assert not s.broken


def test_complete_text_allows_only_eos(tokenizer):
    s = state(tokenizer)
    advance(tokenizer, s, "birds")
    assert s.accepting
    allowed = GrammarMasks([0], [s], "cpu").allowed(len(tokenizer))
    assert allowed[0].nonzero().flatten().tolist() == [EOS]


def test_a_forbidden_token_leaves_the_request_unconstrained(tokenizer):
    s = state(tokenizer)
    s.advance(tokenizer("x")["input_ids"][0])
    assert s.broken and not s.accepting
    allowed = GrammarMasks([0], [s], "cpu").allowed(len(tokenizer) + 3)
    assert allowed[0, : len(tokenizer)].all() and not allowed[0, len(tokenizer):].any()


def test_states_are_independent_copies(tokenizer):
    a, b = state(tokenizer), state(tokenizer, 2)
    advance(tokenizer, a, "dog")
    assert a.accepting and not b.accepting
    assert a.matcher is not b.matcher


@pytest.mark.parametrize("eos", [{EOS}, {31, 63}])  # bit 31: the int32 sign bit
def test_a_dead_end_allows_only_eos(tokenizer, eos):
    s = GrammarState.start(1, GrammarSpec("regex", "[a&&b]"), compiler_for(tokenizer, eos))  # empty language
    allowed = GrammarMasks([0], [s], "cpu").allowed(len(tokenizer))
    assert allowed[0].nonzero().flatten().tolist() == sorted(eos)


def test_one_parallel_fill_for_many_rows(tokenizer):
    """Dead end, broken and live states in one batch (the parallel fill path)."""
    compiler = compiler_for(tokenizer, {EOS})
    dead = GrammarState.start(1, GrammarSpec("regex", "[a&&b]"), compiler)
    broken = state(tokenizer, 2)
    broken.advance(tokenizer("x")["input_ids"][0])
    live = state(tokenizer, 3)
    advance(tokenizer, live, "cat")
    allowed = GrammarMasks([0, 1, 2], [dead, broken, live], "cpu").allowed(len(tokenizer))
    assert allowed[0].nonzero().flatten().tolist() == [EOS]
    assert allowed[1].all()
    single = GrammarMasks([0], [live], "cpu").allowed(len(tokenizer))[0]
    assert torch.equal(allowed[2], single) and single[EOS]


def test_device_unpacking_equals_the_host_one():
    """The bit expansion a device runs (uint8 views and ands) gives the host's numpy result."""
    from tgi_npu_backend.grammar.mask import unpack_on_device, unpack_on_host

    torch.manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32)
    words[0, 0] = -(2**31)  # only bit 31 (token 31)
    words[1] = 0
    bits = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)
    host = unpack_on_host(words)
    assert torch.equal(unpack_on_device(words, bits), host)
    assert host.shape == (3, 160) and not host[1].any()
    assert host[0, :32].nonzero().flatten().tolist() == [31]
    expect = torch.tensor([[(int(w) >> b) & 1 for w in row for b in range(32)] for row in words.tolist()])
    assert torch.equal(host, expect.bool())
