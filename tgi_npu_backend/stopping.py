"""When a request stops, and the text it streams on the way (TGI's stopping and detokenization).

``StoppingCriteria`` follows TGI's ``utils/tokens.py`` (length, then EOS, then stop sequences);
``IncrementalDetokenizer`` follows TGI's ``Model.decode_token`` (``models/model.py``) with the
final text of ``GeneratedText`` (one preceding prompt token as decoding context).
"""

from __future__ import annotations

import enum
import re
import weakref
from typing import Protocol

from .byte_decode import byte_level_decoder

REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence


class FinishReason(enum.IntEnum):
    """Why a request stopped; the numbers are the proto's ``FinishReason`` values."""

    LENGTH = 0
    EOS_TOKEN = 1
    STOP_SEQUENCE = 2


class StoppingCriteria:
    """Decides, once per generated token, whether a request is done and why.

    Checks in TGI's order: the token count reaching ``max_new_tokens`` (LENGTH) wins over an EOS
    token (EOS_TOKEN, unless ``ignore_eos_token``), which wins over a stop sequence at the end of
    the text streamed so far (STOP_SEQUENCE).
    """

    def __init__(
        self,
        eos_token_ids: set[int] | int | None,
        stop_sequences: list[str],
        max_new_tokens: int,
        ignore_eos_token: bool = False,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if eos_token_ids is None:
            eos_token_ids = set()
        elif isinstance(eos_token_ids, int):
            eos_token_ids = {eos_token_ids}
        self.eos_token_ids = set(eos_token_ids)
        self.max_new_tokens = max_new_tokens
        self.ignore_eos_token = ignore_eos_token
        # NOTE: an empty stop sequence would match every text and stop at the first token; TGI
        # would do that, we ignore it. ``$`` as in TGI (it also matches before a final "\n").
        stops = [s for s in stop_sequences if s]
        self.stop_sequences = stops
        self._stop_regexes = [re.compile(f"{re.escape(s)}$") for s in stops]
        # TGI keeps the last 200 characters once the text passes 300; a longer stop sequence
        # would never match in TGI, so we keep at least its length.
        self._keep = max([200, *(len(s) for s in stops)])
        self.current_tokens = 0
        self.current_output = ""

    def __call__(self, token_id: int, text_piece: str) -> tuple[bool, FinishReason | None]:
        """Account for one generated token and the text it streamed; ``(stop, reason)``."""
        self.current_tokens += 1
        if self.current_tokens >= self.max_new_tokens:
            return True, FinishReason.LENGTH
        if not self.ignore_eos_token and token_id in self.eos_token_ids:
            return True, FinishReason.EOS_TOKEN
        if self._stop_regexes:
            self.current_output += text_piece
            if len(self.current_output) > self._keep + 100:
                self.current_output = self.current_output[-self._keep :]
            if any(regex.search(self.current_output) for regex in self._stop_regexes):
                return True, FinishReason.STOP_SEQUENCE
        return False, None


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the detokenizer uses."""

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool, clean_up_tokenization_spaces: bool
    ) -> str: ...


_SINGLE_TOKEN_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _single_token_texts(tokenizer: Tokenizer) -> dict[int, str]:
    """The texts of single tokens decoded so far with ``tokenizer`` (skipping special tokens),
    one dict per tokenizer object, shared by all its requests (at most a vocabulary's worth)."""
    try:
        return _SINGLE_TOKEN_TEXTS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: a dict for this detokenizer alone
        return {}


class IncrementalDetokenizer:
    """Turns one request's generated tokens into text pieces as they arrive (TGI's
    ``decode_token``), never emitting a piece that ends in an incomplete UTF-8 sequence.

    Each step decodes only a short window ``ids[prefix_offset:]`` (a few tokens of context before
    the unread ones, starting with the last 5 prompt tokens) and emits what the newest tokens add
    to the context's text, once that no longer ends with U+FFFD; the window is trimmed as the
    offsets advance, so a step costs the same at token 10 and token 10 000. With a byte-level BPE
    tokenizer the windows decode from a table of token bytes (``byte_decode.py``), and a token
    whose bytes are valid UTF-8 alone, after a prefix whose tokens all are, appends its own text
    without decoding anything.

    Contract (what the caller relies on):

    - ``step(id, is_special=True)`` returns the token's literal text (e.g. ``"</s>"``, as TGI
      shows it) but that text is not part of the generated text; ``is_special`` must agree with
      the tokenizer's special tokens (TGI: ``id in tokenizer.all_special_ids``).
    - the pieces of the non-special tokens, followed by ``finish()``, concatenate to exactly
      ``final_text()``: the generated ids decoded after one preceding prompt token with
      ``skip_special_tokens=True``, minus that token's text (TGI's ``GeneratedText.text``).

    NOTE: unlike TGI, the window is decoded with ``skip_special_tokens=True`` so that a special
    prompt token (a BOS) decodes the same way in the stream as in the final text.
    """

    PREFIX_TOKENS = 5  # TGI: prefix_offset = len(prompt) - 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        prefix_offset = max(len(prompt_ids) - self.PREFIX_TOKENS, 0)
        # ids[prefix_offset:]: the ids before prefix_offset are dropped as it advances, so the
        # window starts at the prefix offset and ``_read`` is read_offset in its frame
        self._window = list(prompt_ids[prefix_offset:])
        self._read = len(self._window)
        self._prefix_text: str | None = None  # decoded window[:read], until the offsets move
        self._anchor = list(prompt_ids[-1:])  # TGI's one preceding token for the final text
        self._generated: list[int] = []  # non-special generated ids
        # the non-special pieces returned so far (joined when read: ``+=`` on an attribute copies
        # the whole string each time, O(n^2) over a long generation)
        self._pieces: list[str] = []
        self._settled: tuple[str, str] | None = None  # (final text, remainder), until next step
        self._finished = False
        # NOTE: for a fast tokenizer, HF's decode(..., clean_up_tokenization_spaces=False) is its
        # Rust tokenizer's decode behind argument handling that costs twice the decode itself
        # (transformers 5 TokenizersBackend._decode); two decodes per request per step add up.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast_decode = getattr(backend, "decode", None)
        # a byte-level BPE tokenizer (BLOOM's) decodes from a table of token bytes, in Python
        self._table = byte_level_decoder(tokenizer)
        self._single = _single_token_texts(tokenizer)
        self._valid_prefix = self._all_valid(self._window)
        # with the table, the window's bytes and how many of them are window[:read]'s: a window
        # decodes from them with one ``bytes.decode``, however long it has grown while its text
        # ends in an incomplete character (each byte of a CJK character can be a token of its own)
        self._window_bytes = bytearray()
        if self._table is not None:
            self._window_bytes.extend(b"".join(map(self._table.bytes_of, self._window)))
        self._read_bytes = len(self._window_bytes)

    def _all_valid(self, ids: list[int]) -> bool:
        """With the table: each of ``ids`` alone is valid UTF-8 (``ByteLevelDecoder.text_of``)."""
        table = self._table
        return table is not None and all(table.text_of(i) is not None for i in ids)

    def _decode(self, ids: list[int]) -> str:
        if self._table is not None:
            return self._table.decode(ids)
        # NOTE: after a piece is emitted the prefix window is usually the one token just read, so
        # one of a step's two decodes is of a single token: a pure function of its id, memoised
        # per tokenizer.
        if len(ids) == 1:
            text = self._single.get(ids[0])
            if text is None:
                text = self._single[ids[0]] = self._decode_uncached(ids)
            return text
        return self._decode_uncached(ids)

    def _decode_uncached(self, ids: list[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    @property
    def streamed_text(self) -> str:
        """The non-special pieces returned so far, concatenated."""
        return "".join(self._pieces)

    def step(self, token_id: int, is_special: bool) -> str:
        """The text piece for one generated token ("" while it is held back)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.step after finish(): make a new one")
        if is_special:
            return self.tokenizer.decode(
                [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        self._settled = None
        self._generated.append(token_id)
        window = self._window
        window.append(token_id)
        table = self._table
        if table is not None:
            self._window_bytes += table.bytes_of(token_id)
            if self._valid_prefix and self._read == len(window) - 1:
                text = table.text_of(token_id)
                if text is not None:
                    # The prefix's bytes and this token's are valid UTF-8 apart, so the window
                    # decodes to the prefix's text + ``text``: the path below, without decoding.
                    if not text or text.endswith(REPLACEMENT_CHAR):
                        return ""
                    self._advance()
                    self._prefix_text = text
                    self._pieces.append(text)
                    return text
        prefix_text, new_text = self._window_texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            # incomplete character (or nothing visible yet): hold back; the offsets stay, and so
            # does the prefix's text
            return ""
        piece = new_text[len(prefix_text) :]
        self._advance()
        self._valid_prefix = self._all_valid(self._window)
        self._pieces.append(piece)
        return piece

    def _advance(self) -> None:
        """Offsets advance to (read_offset, len(ids)): what is before the new prefix goes."""
        del self._window[: self._read]
        self._read = len(self._window)
        del self._window_bytes[: self._read_bytes]
        self._read_bytes = len(self._window_bytes)
        self._prefix_text = None

    def _window_texts(self) -> tuple[str, str]:
        """``window[:read]`` decoded (kept until the offsets move) and ``window`` decoded."""
        if self._table is not None:
            data = self._window_bytes
            if self._prefix_text is None:
                self._prefix_text = data[: self._read_bytes].decode("utf-8", "replace")
            return self._prefix_text, data.decode("utf-8", "replace")
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window[: self._read])
        return self._prefix_text, self._decode(self._window)

    def final_text(self) -> str:
        """The request's generated text (TGI's ``GeneratedText.text``, see the class docstring)."""
        return self._settle()[0]

    def finish(self) -> str:
        """The held-back rest of the text (e.g. a character cut by the last token), so that the
        streamed pieces plus it equal ``final_text()``; append it to the last token's piece.
        Returns "" when called again."""
        if self._finished:
            return ""
        remainder = self._settle()[1]
        self._pieces.append(remainder)
        self._finished = True
        return remainder

    def _settle(self) -> tuple[str, str]:
        if self._settled is not None:
            return self._settled
        if self._finished:
            self._settled = (self.streamed_text, "")
            return self._settled
        anchor_text = self._decode(self._anchor)
        final = self._decode(self._anchor + self._generated)[len(anchor_text) :]
        streamed = self.streamed_text
        if final.startswith(streamed):
            self._settled = (final, final[len(streamed) :])
        else:
            # NOTE: the final decoding does not extend what was already streamed: context beyond
            # one preceding token changed the decoding (e.g. a prompt ending inside a UTF-8
            # character, or a decoder that looks further back). Streamed text cannot be taken
            # back, so the final text becomes the stream plus the window's unread text.
            prefix_text, new_text = self._window_texts()
            tail = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
            self._settled = (streamed + tail, tail)
        return self._settled
