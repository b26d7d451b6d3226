"""The byte-level table decoder (``tgi_npu_backend/byte_decode.py``) against the ``tokenizers``
library's own decode: random ids over a vocabulary holding every single byte (so every UTF-8
error a byte sequence can have comes up), added tokens special and not, ids past the vocabulary.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, decoders
from transformers import PreTrainedTokenizerFast

from tgi_npu_backend.byte_decode import ByteLevelDecoder, byte_level_alphabet, byte_level_decoder
from tgi_npu_backend.demo import BLOOM_SPECIALS, train_tokenizer
from tgi_npu_backend.stopping import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(400, BLOOM_SPECIALS, None)
    # a non-special added token with characters outside the byte-level alphabet (decoded as its
    # own UTF-8), one within it, and a special one that is not among the model's specials
    tok.add_tokens([AddedToken("héllo ✓", special=False), AddedToken("<tool>", special=False)])
    tok.add_special_tokens([AddedToken("<sep>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def rust_decode(tokenizer, ids):
    return tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=True)


def byte_tokens(tokenizer) -> list[int]:
    """The ids of the 256 one-byte tokens (a byte-level vocabulary starts from all of them)."""
    alphabet = byte_level_alphabet()
    token = tokenizer.backend_tokenizer.id_to_token
    return [i for i in range(len(tokenizer)) if token(i) in alphabet]


def test_alphabet_is_the_byte_level_pre_tokenizers():
    from tokenizers import pre_tokenizers

    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert alphabet["Ġ"] == ord(" ") and alphabet["!"] == ord("!")


def test_random_ids_decode_as_the_library_does(tokenizer):
    table = byte_level_decoder(tokenizer)
    assert table is not None and byte_level_decoder(tokenizer) is table  # one per tokenizer
    rng = random.Random(0)
    vocab = len(tokenizer)
    singles = byte_tokens(tokenizer)
    assert len(singles) == 256  # any byte sequence can be drawn
    for n in range(3000):
        pool = singles if n % 2 else range(vocab + 3)  # + ids with no token
        ids = [rng.choice(pool) for _ in range(rng.randrange(0, 9))]
        assert table.decode(ids) == rust_decode(tokenizer, ids), ids


def test_added_and_special_tokens(tokenizer):
    table = byte_level_decoder(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(["héllo ✓", "<tool>", "<sep>", "</s>", "<pad>"])
    assert table.decode(ids[:1]) == "héllo ✓" == rust_decode(tokenizer, ids[:1])
    assert table.decode(ids) == rust_decode(tokenizer, ids) == "héllo ✓<tool>"
    assert table.decode([-1, 10**9]) == ""  # no token: dropped


def test_other_decoders_keep_the_library(tokenizer):
    from tokenizers import Tokenizer, models

    metaspace = Tokenizer(models.BPE())
    metaspace.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    assert byte_level_decoder(PreTrainedTokenizerFast(tokenizer_object=metaspace)) is None
    assert byte_level_decoder(object()) is None  # no Rust backend at all


def test_detokenizer_streams_with_the_table(tokenizer):
    """The detokenizer takes the table for this tokenizer, and streams what the library's
    decode gives (random single-byte tokens: UTF-8 characters cut across tokens)."""
    rng = random.Random(1)
    singles = byte_tokens(tokenizer)
    text = "Grüße 日本語 🙂 ok"
    prompt = tokenizer.encode(text)
    for _ in range(20):
        generated = [rng.choice(singles) for _ in range(30)] + tokenizer.encode(text)
        detok = IncrementalDetokenizer(tokenizer, prompt)
        assert detok._table is byte_level_decoder(tokenizer)
        pieces = [detok.step(t, False) for t in generated]
        pieces.append(detok.finish())
        expected = rust_decode(tokenizer, prompt[-1:] + generated)[len(rust_decode(tokenizer, prompt[-1:])):]
        assert "".join(pieces) == detok.final_text() == expected


def test_text_that_flows_is_not_decoded(tokenizer, monkeypatch):
    """Tokens valid UTF-8 on their own append their own text (valid UTF-8 concatenates): plain
    text streams without decoding a window; characters cut across tokens still decode one."""
    table = byte_level_decoder(tokenizer)
    calls = []
    monkeypatch.setattr(table, "decode", lambda ids: calls.append(ids) or ByteLevelDecoder.decode(table, ids))
    window_texts = IncrementalDetokenizer._window_texts
    monkeypatch.setattr(
        IncrementalDetokenizer, "_window_texts", lambda self: calls.append(self._window) or window_texts(self)
    )
    prompt = tokenizer.encode("The quick brown fox")
    generated = tokenizer.encode(" jumps over the lazy dog," * 4)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(detok.step(t, False) for t in generated) == rust_decode(tokenizer, generated)
    assert calls == []
    cut = tokenizer.encode(" 深度学习模型")
    assert any(byte_level_decoder(tokenizer).text_of(t) is None for t in cut)
    pieces = [detok.step(t, False) for t in cut]
    assert "" in pieces and calls  # held back, then decoded as a window
    pieces.append(detok.finish())
    assert "".join(pieces) == " 深度学习模型"


def _pieces(tokenizer, prompt, generated, table: bool) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    if not table:  # the Rust decode of each window, as for any other tokenizer
        detok._table, detok._valid_prefix = None, False
    return [detok.step(t, False) for t in generated] + [detok.finish()]


def test_table_streams_the_pieces_the_library_streams(tokenizer):
    """Piece by piece (what is held back and when it comes out), the table's windows give what
    the Rust decode of the same windows gives, over random tokens and bytes."""
    rng = random.Random(2)
    singles = byte_tokens(tokenizer)
    vocab = len(tokenizer)
    for n in range(300):
        prompt = [rng.choice(singles) for _ in range(rng.randrange(1, 8))]
        pool = singles if n % 2 else range(vocab)
        generated = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        assert _pieces(tokenizer, prompt, generated, True) == _pieces(tokenizer, prompt, generated, False)


def test_a_long_held_back_window_decodes_without_a_pass_over_its_ids(tokenizer, monkeypatch):
    """Continuation bytes alone end the text in U+FFFD: the window is held back and grows, and
    each step decodes its bytes, kept as they arrive, not its ids one by one."""
    table = byte_level_decoder(tokenizer)
    alphabet = {b: c for c, b in byte_level_alphabet().items()}
    cont = tokenizer.convert_tokens_to_ids(alphabet[0x80])
    monkeypatch.setattr(table, "decode", lambda ids: pytest.fail(f"decoded {len(ids)} ids"))
    prompt = tokenizer.encode("ok")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    assert [detok.step(cont, False) for _ in range(500)] == [""] * 500
    ok = tokenizer.encode("!")[-1]
    assert detok.step(ok, False) == "\ufffd" * 500 + "!"
    assert len(detok._window) == 501 == detok._read  # the new prefix: TGI's offsets
    assert detok.step(ok, False) == "!" and len(detok._window) == 1
