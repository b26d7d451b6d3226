"""``decode(ids, skip_special_tokens=True)`` without the Rust tokenizer, for byte-level BPE
tokenizers (BLOOM's, GPT-2's): the text of some ids is the UTF-8 decoding of their tokens' bytes,
concatenated, so a table from id to bytes and ``bytes.decode`` give it in plain Python.

Why: the detokenizer decodes a short window for every request on every decode step. A call into
the Rust tokenizer costs 1.5 us in a loop on this project's CPU, but 5-6 us inside a serving step,
where the model's forward pass has just evicted the tokenizer's code and tables from the CPU
caches (``benchmarks/bench_host.py``).

What it reproduces is the ``tokenizers`` library's ``Tokenizer.decode`` with a
``decoders.ByteLevel`` decoder (tokenizers 0.2x, ``tokenizer/mod.rs`` and
``pre_tokenizers/byte_level.rs``):

* each id becomes its token's string (added tokens included); an id with no token is dropped,
  and so is a token whose string is a special token's (the check is by string, as there);
* each token's characters map back to bytes through the byte-level alphabet; a token holding a
  character outside that alphabet contributes its own UTF-8 bytes instead;
* the bytes of all tokens, concatenated, are decoded as UTF-8 with U+FFFD for each invalid
  sequence (Rust's ``String::from_utf8_lossy``; Python's ``errors="replace"`` substitutes the
  same maximal subparts). ``tests/shard/test_byte_decode.py`` checks all of it against the
  library on random ids.

Any other decoder (a ``Sequence``, SentencePiece's ``Metaspace``/``ByteFallback``, as in Gemma's
tokenizer) gets ``None`` from ``byte_level_decoder`` and keeps the Rust decode.
"""

from __future__ import annotations

import weakref


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: the printable character standing for each byte (GPT-2's
    ``bytes_to_unicode``), as character -> byte. Printable Latin-1 bytes stand for themselves;
    the others, in byte order, take the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_ALPHABET = byte_level_alphabet()


class ByteLevelDecoder:
    """The decoding of one byte-level tokenizer; ids' bytes are looked up once and kept (at most
    one entry per id of the vocabulary)."""

    def __init__(self, backend) -> None:
        """``backend``: a ``tokenizers.Tokenizer`` whose decoder is ``decoders.ByteLevel``."""
        self._id_to_token = backend.id_to_token
        self._special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        self._bytes: dict[int, bytes] = {}
        self._texts: dict[int, str | None] = {}

    def text_of(self, token_id: int) -> str | None:
        """The id's text when its bytes are valid UTF-8 on their own, else None. Valid UTF-8
        strings concatenate to valid UTF-8, so ids that all have a text decode to their texts
        joined, and appending such an id to such ids appends its text."""
        try:
            return self._texts[token_id]
        except KeyError:
            try:
                text = self.bytes_of(token_id).decode("utf-8")
            except UnicodeDecodeError:
                text = None
            self._texts[token_id] = text
            return text

    def decode(self, ids: list[int]) -> str:
        table = self._bytes
        try:
            pieces = [table[i] for i in ids]
        except KeyError:
            pieces = [self.bytes_of(i) for i in ids]
        return b"".join(pieces).decode("utf-8", "replace")

    def bytes_of(self, token_id: int) -> bytes:
        """The UTF-8 bytes ``token_id`` contributes to a decoding (b"" for a special token or an
        id with no token)."""
        data = self._bytes.get(token_id)
        if data is None:
            token = self._id_to_token(token_id) if token_id >= 0 else None
            if token is None or token in self._special:
                data = b""
            else:
                try:
                    data = bytes(_ALPHABET[c] for c in token)
                except KeyError:  # a character outside the alphabet: the token's own UTF-8
                    data = token.encode("utf-8")
            self._bytes[token_id] = data
        return data


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def byte_level_decoder(tokenizer) -> ByteLevelDecoder | None:
    """The table decoder of a Hugging Face tokenizer (one per tokenizer object, shared by its
    requests), or None unless its Rust backend decodes with exactly ``decoders.ByteLevel``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers import decoders
    except ImportError:  # pragma: no cover - transformers' fast tokenizers need tokenizers
        return None
    if type(backend.decoder) is not decoders.ByteLevel:
        return None
    try:
        found = _DECODERS.get(tokenizer)
        if found is None:
            found = _DECODERS[tokenizer] = ByteLevelDecoder(backend)
        return found
    except TypeError:  # not weak-referenceable: a decoder of its own
        return ByteLevelDecoder(backend)
