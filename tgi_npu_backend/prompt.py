"""A request's prompt as token ids as the router counts them
(``add_special_tokens`` as sent, left truncation to ``Request.truncate``).

Long prompts are cut before tokenizing when truncation makes most of the text irrelevant: a 2 MB
prompt with ``truncate=10`` would otherwise hold the generator thread, and with it every other
request's next token, for seconds.
"""

from __future__ import annotations

from .errors import InvalidRequestError
from .request import RequestSpec

TAIL_MIN_CHARS = 4096  # shorter prompts are always tokenized whole
CUT_MARGIN = 16  # tokens near a cut may differ from the whole text's: never rely on them


def tokenize_prompt(
    tokenizer, request: RequestSpec, text: str, max_input_tokens: int | None, warmup: bool
) -> list[int]:
    kwargs = {"add_special_tokens": request.add_special_tokens}
    if request.truncate > 0:
        kwargs.update(truncation=True, max_length=request.truncate)
        if len(text) > TAIL_MIN_CHARS:
            ids = _tail_ids(tokenizer, text, request.truncate, kwargs)
            if ids is not None:
                return ids
    elif max_input_tokens is not None and not warmup and len(text) > TAIL_MIN_CHARS:
        _refuse_long(tokenizer, request, text, max_input_tokens)
    return list(tokenizer(text, **kwargs)["input_ids"])


def _tail_ids(tokenizer, text: str, keep: int, kwargs: dict) -> list[int] | None:
    """Left truncation to ``keep`` tokens from a tail of the text: accepted when the tail yields
    ``keep`` tokens and a tail twice as long yields the same ids (the cut is far enough from the
    kept tokens not to change them). None when no tail up to half the text passes."""
    chars = 8 * keep + 256
    while 2 * chars <= len(text):
        short = list(tokenizer(text[-chars:], **kwargs)["input_ids"])
        if (
            len(short) >= keep
            and list(tokenizer(text[-2 * chars :], **kwargs)["input_ids"]) == short
        ):
            return short
        chars *= 4
    return None


def _refuse_long(tokenizer, request: RequestSpec, text: str, max_input_tokens: int) -> None:
    """No truncation asked, and the prompt's tail alone has more than --max-input-tokens: refuse
    it without tokenizing the rest."""
    limit = max_input_tokens + CUT_MARGIN
    chars = 8 * limit + 256
    if (
        chars < len(text)
        and len(tokenizer(text[-chars:], add_special_tokens=False)["input_ids"]) > limit
    ):
        raise InvalidRequestError(
            f"request {request.id}: prompt has more than {max_input_tokens} tokens, more than "
            f"--max-input-tokens={max_input_tokens}; shorten it or set truncate"
        )
