"""StoppingCriteria (TGI's order of checks) and IncrementalDetokenizer (streamed text == final
text == the tokenizer's own decoding) on a locally trained byte-level BPE tokenizer."""

from __future__ import annotations

import pytest

from tgi_npu_backend.pb import generate_pb2
from tgi_npu_backend.stopping import FinishReason, IncrementalDetokenizer, StoppingCriteria

EOS = 2
FFFD = "\ufffd"


def test_finish_reason_numbers_match_the_proto():
    assert FinishReason.LENGTH == generate_pb2.FINISH_REASON_LENGTH
    assert FinishReason.EOS_TOKEN == generate_pb2.FINISH_REASON_EOS_TOKEN
    assert FinishReason.STOP_SEQUENCE == generate_pb2.FINISH_REASON_STOP_SEQUENCE


# --- StoppingCriteria -----------------------------------------------------------------------------


def test_length():
    criteria = StoppingCriteria({EOS}, [], max_new_tokens=3)
    assert criteria(5, "a") == (False, None)
    assert criteria(6, "b") == (False, None)
    assert criteria(7, "c") == (True, FinishReason.LENGTH)
    assert criteria.current_tokens == 3


def test_eos_and_ignore_eos():
    assert StoppingCriteria({EOS, 9}, [], 10)(9, "") == (True, FinishReason.EOS_TOKEN)
    criteria = StoppingCriteria({EOS}, [], 2, ignore_eos_token=True)
    assert criteria(EOS, "</s>") == (False, None)
    assert criteria(EOS, "</s>") == (True, FinishReason.LENGTH)


def test_length_wins_over_eos_which_wins_over_stop_sequence():
    assert StoppingCriteria({EOS}, ["x"], 1)(EOS, "x") == (True, FinishReason.LENGTH)
    assert StoppingCriteria({EOS}, ["x"], 5)(EOS, "x") == (True, FinishReason.EOS_TOKEN)
    assert StoppingCriteria({EOS}, ["x"], 5)(7, "x") == (True, FinishReason.STOP_SEQUENCE)


def test_stop_sequence_across_token_boundaries():
    criteria = StoppingCriteria(set(), ["world!", "a.b"], 100)
    pieces = ["Hello", " wo", "r", "", "ld", "!"]
    results = [criteria(i, piece) for i, piece in enumerate(pieces)]
    assert results[:-1] == [(False, None)] * 5
    assert results[-1] == (True, FinishReason.STOP_SEQUENCE)
    # regex characters are literal
    criteria = StoppingCriteria(set(), ["a.b"], 100)
    assert criteria(1, "axb") == (False, None)
    assert criteria(1, " a.b") == (True, FinishReason.STOP_SEQUENCE)


def test_stop_sequence_only_at_the_end_and_after_a_long_text():
    criteria = StoppingCriteria(set(), ["STOP"], 10_000)
    assert criteria(1, "STOP and more") == (False, None)
    for i in range(2000):
        assert criteria(1, "lorem ipsum ") == (False, None)
    assert len(criteria.current_output) <= 300  # a bounded tail, as in TGI
    assert criteria(1, "ST") == (False, None)
    assert criteria(1, "OP") == (True, FinishReason.STOP_SEQUENCE)


def test_a_stop_sequence_longer_than_the_tail_still_matches():
    long_stop = "0123456789" * 40
    criteria = StoppingCriteria(set(), [long_stop], 10_000)
    for _ in range(100):
        criteria(1, "noise ")
    results = [criteria(1, ch) for ch in long_stop]
    assert results[-1] == (True, FinishReason.STOP_SEQUENCE)
    assert all(r == (False, None) for r in results[:-1])


def test_invalid_max_new_tokens():
    with pytest.raises(ValueError, match="max_new_tokens"):
        StoppingCriteria({EOS}, [], max_new_tokens=0)


# --- IncrementalDetokenizer -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    from tgi_npu_backend.demo import BLOOM_SPECIALS, train_tokenizer

    # A small vocabulary: most CJK characters and emoji are split into single-byte tokens.
    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(320, BLOOM_SPECIALS, None),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stream(tokenizer, prompt: list[int], generated: list[int]):
    """Run a detokenizer the way the server does; (all pieces, special flags, remainder, det)."""
    detok = IncrementalDetokenizer(tokenizer, prompt)
    special_ids = set(tokenizer.all_special_ids)
    specials = [token in special_ids for token in generated]
    pieces = [detok.step(token, special) for token, special in zip(generated, specials)]
    return pieces, specials, detok.finish(), detok


TEXTS = [
    "深度学习模型在昇腾处理器上运行。你好，世界！",
    "Emoji: 🙂 🚀 ✨ — naïve café résumé",
    "русский язык, Ελληνικά, 日本語のテキスト。",
    "plain ascii text, nothing special",
    "🙂🚀✨🙂",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt_text", ["", "Hello", "Pour déguster un ortolan, 深度"])
def test_streamed_text_equals_final_text(tokenizer, text, prompt_text):
    prompt = tokenizer.encode(prompt_text)
    generated = tokenizer.encode(text)
    assert decode(tokenizer, generated) == text
    pieces, _, remainder, detok = stream(tokenizer, prompt, generated)
    assert remainder == ""
    assert "".join(pieces) == detok.final_text() == text
    assert not any(FFFD in piece for piece in pieces)
    # multi-byte characters really were split: some tokens were held back, then completed
    if text.isascii():
        assert all(pieces)
    else:
        assert "" in pieces


@pytest.mark.parametrize("text", TEXTS[:3])
def test_special_tokens_in_the_middle_and_at_the_end(tokenizer, text):
    prompt = tokenizer.encode("Hello")
    ids = tokenizer.encode(text)
    generated = ids[:3] + [EOS] + ids[3:7] + [tokenizer.pad_token_id] + ids[7:] + [EOS]
    pieces, specials, remainder, detok = stream(tokenizer, prompt, generated)
    assert [p for p, s in zip(pieces, specials) if s] == ["</s>", "<pad>", "</s>"]
    text_pieces = [p for p, s in zip(pieces, specials) if not s]
    assert "".join(text_pieces) + remainder == detok.final_text() == decode(tokenizer, generated)
    assert detok.final_text() == text


def test_text_cut_inside_a_multibyte_character(tokenizer):
    prompt = tokenizer.encode("Hello")
    ids = tokenizer.encode("你好🚀")
    cuts = [n for n in range(1, len(ids)) if decode(tokenizer, ids[:n]).endswith(FFFD)]
    assert cuts, "the tokenizer should split these characters into byte tokens"
    for n in cuts:
        generated = ids[:n]
        pieces, _, remainder, detok = stream(tokenizer, prompt, generated)
        assert not any(FFFD in piece for piece in pieces)
        assert remainder.endswith(FFFD)  # what TGI's final text shows for a cut character
        assert "".join(pieces) + remainder == detok.final_text() == decode(tokenizer, generated)
        assert detok.finish() == ""  # idempotent
        # the last token is special (EOS after a cut character): same text
        pieces, _, remainder, detok = stream(tokenizer, prompt, generated + [EOS])
        assert "".join(pieces[:-1]) + remainder == decode(tokenizer, generated)


def test_decoding_window_stays_short(tokenizer):
    """Each step decodes a bounded window, not the whole sequence."""

    class Spy:
        def __init__(self, inner):
            self.inner, self.lengths = inner, []

        def decode(self, ids, **kwargs):
            self.lengths.append(len(ids))
            return self.inner.decode(ids, **kwargs)

    spy = Spy(tokenizer)
    prompt = tokenizer.encode("The quick brown fox " * 20)
    generated = tokenizer.encode("深度学习模型在昇腾处理器上运行。" * 10)
    detok = IncrementalDetokenizer(spy, prompt)
    pieces = [detok.step(token, False) for token in generated]
    assert max(spy.lengths) <= 5 + 4  # 5 prompt tokens at first, then <= one char's bytes + 1
    assert "".join(pieces) + detok.finish() == decode(tokenizer, generated)


def test_final_text_that_does_not_extend_the_stream_falls_back_to_the_stream():
    """A decoder whose output depends on context further back than one token (here: a sequence
    starting with token 7 decodes in upper case) makes the final text disagree with the stream;
    the stream cannot be taken back, so the final text is the stream plus the unread rest."""

    class ContextTokenizer:
        chars = "abcdefghij"

        def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
            text = "".join(self.chars[i] for i in ids)
            return text.upper() if ids and ids[0] == 7 else text

    detok = IncrementalDetokenizer(ContextTokenizer(), [1, 2, 3, 4, 5, 6, 7])
    pieces = [detok.step(token, False) for token in [0, 1, 2]]
    assert "".join(pieces) == "abc"  # the window starts at prompt token 3
    assert detok.finish() == ""
    assert detok.final_text() == "abc"  # not TGI's "ABC", which would contradict the stream
    with pytest.raises(RuntimeError, match="after finish"):
        detok.step(0, False)


def test_fast_decode_equals_the_tokenizers_decode(tokenizer):
    """The detokenizer calls the Rust tokenizer directly; it must decode as HF's decode does
    (random ids: specials, byte pieces that split UTF-8 characters)."""
    import random

    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok._fast_decode is not None
    rng = random.Random(0)
    for n in range(1, 60):
        ids = [rng.randrange(len(tokenizer)) for _ in range(n)]
        assert detok._decode(ids) == decode(tokenizer, ids)


def tgi_pieces(tokenizer, prompt: list[int], generated: list[int]) -> list[str]:
    """TGI's ``decode_token`` with nothing cached: two decodes of the growing ids per step."""
    ids, prefix, read = list(prompt), max(len(prompt) - 5, 0), len(prompt)
    pieces = []
    for token in generated:
        ids.append(token)
        prefix_text, new_text = decode(tokenizer, ids[prefix:read]), decode(tokenizer, ids[prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(FFFD):
            pieces.append(new_text[len(prefix_text) :])
            prefix, read = read, len(ids)
        else:
            pieces.append("")
    return pieces


def test_pieces_equal_tgis_uncached_decoding(tokenizer):
    """The detokenizer keeps the prefix's text while it holds back and memoises single-token
    texts; random byte-level tokens (UTF-8 characters cut and held back) give TGI's pieces."""
    import random

    rng = random.Random(1)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    for _ in range(30):
        prompt = [rng.choice(ids) for _ in range(rng.randrange(0, 8))]
        generated = [rng.choice(ids) for _ in range(40)]
        pieces, _, _, _ = stream(tokenizer, prompt, generated)
        assert pieces == tgi_pieces(tokenizer, prompt, generated)


def test_one_multi_token_decode_per_step_once_text_flows(tokenizer):
    """After a piece is emitted the prefix window is the token just read: its text comes from the
    per-tokenizer memo, so a step decodes one window (not two); held-back steps reuse the prefix."""
    decodes = []

    class Spy:
        def decode(self, ids, **kwargs):
            decodes.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    spy = Spy()
    prompt = tokenizer.encode("The quick brown fox")
    generated = tokenizer.encode("jumps over the lazy dog, " * 4)  # every token emits a piece
    detok = IncrementalDetokenizer(spy, prompt)
    pieces = [detok.step(token, False) for token in generated]
    assert all(pieces)
    assert "".join(pieces) + detok.finish() == decode(tokenizer, generated)
    multi = [n for n in decodes if n > 1]
    # one per step, plus the first step's 5-token prefix and the final text's
    assert len(multi) <= len(generated) + 2
    again = IncrementalDetokenizer(spy, prompt)  # same tokenizer: the memo is shared
    before = len(decodes)
    assert [again.step(token, False) for token in generated] == pieces
    assert all(n > 1 for n in decodes[before:])
    # characters cut into byte tokens: held-back steps reuse the prefix's text
    decodes.clear()
    generated = tokenizer.encode("深度学习模型" * 4)
    detok = IncrementalDetokenizer(spy, prompt)
    pieces = [detok.step(token, False) for token in generated]
    assert "" in pieces
    decodes.clear()
    detok = IncrementalDetokenizer(spy, prompt)
    assert [detok.step(token, False) for token in generated] == pieces
    assert len(decodes) < 2 * len(generated)
