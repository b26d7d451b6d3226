"""TGI's request validation (``router/src/validation.rs``), messages included."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from .entities import ValidParameters, ValidRequest, ValidStopping
from .errors import ValidationError
from .grammars import validate_grammar
from .schemas import GenerateRequest
from .tokenizer import Tokenizer

# Prompts longer than this are tokenized in a worker thread (with the GIL released) so the event
# loop keeps streaming, and only a tail of them when truncation makes the rest irrelevant.
INLINE_TOKENIZE_CHARS = 4096
CUT_MARGIN = 16  # tokens near a cut may differ from the whole text's: never count on them


@dataclass(frozen=True)
class ValidationLimits:
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 1
    grammar_support: bool = True  # False with --disable-grammar-support


class Validator:
    def __init__(self, tokenizer: Tokenizer, limits: ValidationLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens, True)

    async def count(
        self, text: str, add_special_tokens: bool, truncate: int | None
    ) -> tuple[int, list[int] | None]:
        """(input_length after left truncation, the whole prompt's ids or None when unknown).

        A long prompt whose tail alone has more tokens than it may keep (``truncate``, else
        ``--max-input-tokens``) is not tokenized whole: a 2 MB prompt costs seconds of CPU."""
        limit = truncate if truncate is not None else self.limits.max_input_tokens
        chars = 8 * (limit + CUT_MARGIN) + 256
        if len(text) > INLINE_TOKENIZE_CHARS and chars < len(text):
            tail = await asyncio.to_thread(self.tokenizer.encode, text[-chars:], False, True)
            if len(tail) > limit + CUT_MARGIN:  # so the whole prompt has more than `limit`
                if truncate is not None:
                    return truncate, None
                raise ValidationError(
                    f"`inputs` must have less than {limit} tokens. Given: more than {limit}"
                )
        ids = await self.encode(text, add_special_tokens)
        return (len(ids) if truncate is None else min(len(ids), truncate)), ids

    async def validate(self, request: GenerateRequest) -> ValidRequest:
        lim = self.limits
        p = request.parameters
        best_of = 1 if p.best_of is None else p.best_of
        sampling = p.do_sample or any(
            v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p)
        )
        if best_of != 1:
            # NOTE: TGI samples best_of sequences in parallel; this router does not.
            if best_of <= 0 or best_of > lim.max_best_of:
                raise ValidationError(
                    f"`best_of` must be > 0 and <= {lim.max_best_of}. Given: {best_of}"
                )
            if not sampling:
                raise ValidationError("you must use sampling when `best_of` is > 1")
            raise ValidationError(
                "`best_of` != 1 is not supported by tgi-npu-launcher: use best_of=1"
            )
        temperature = 1.0 if p.temperature is None else p.temperature
        if temperature <= 0.0:
            raise ValidationError("`temperature` must be strictly positive")
        repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
        if repetition_penalty <= 0.0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
        if not -2.0 <= frequency_penalty <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        top_p = 1.0
        if p.top_p is not None:
            if p.top_p <= 0.0 or p.top_p >= 1.0:
                raise ValidationError("`top_p` must be > 0.0 and < 1.0")
            top_p = p.top_p
        typical_p = 1.0
        if p.typical_p is not None:
            if p.typical_p <= 0.0 or p.typical_p >= 1.0:
                raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
            typical_p = p.typical_p
        top_k = 0
        if p.top_k is not None:
            if p.top_k <= 0:
                raise ValidationError("`top_k` must be strictly positive")
            top_k = p.top_k
        if p.max_new_tokens == 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if len(p.stop) > lim.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {lim.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
            )
        seed = random.getrandbits(64) if p.seed is None else p.seed
        top_n_tokens = 0
        if p.top_n_tokens is not None:
            if p.top_n_tokens > lim.max_top_n_tokens:
                raise ValidationError(
                    f"`top_n_tokens` must be >= 0 and <= {lim.max_top_n_tokens}. Given: {p.top_n_tokens}"
                )
            top_n_tokens = p.top_n_tokens
        if not request.inputs:
            raise ValidationError("`inputs` cannot be empty")
        truncate = p.truncate
        if truncate is not None and (truncate == 0 or truncate > lim.max_input_tokens):
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {lim.max_input_tokens}. Given: {truncate}"
            )
        grammar = None
        if p.grammar is not None:  # compiling a schema can take a while: off the event loop
            grammar = await asyncio.to_thread(
                validate_grammar, p.grammar, not lim.grammar_support
            )

        input_length, ids = await self.count(request.inputs, request.add_special_tokens, truncate)
        if input_length == 0:
            raise ValidationError("`inputs` cannot be empty (it has no token once tokenized)")
        if p.max_new_tokens is not None:
            max_new_tokens = p.max_new_tokens
        else:
            max_new_tokens = max(lim.max_total_tokens - input_length, 0)
        # NOTE: TGI caps the shard's max_new_tokens at 1024 and re-submits "prompt + text so far"
        # when a request reaches it; this router sends the whole budget in one request instead.
        if input_length + max_new_tokens > lim.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {lim.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        if input_length > lim.max_input_tokens:
            raise ValidationError(
                f"`inputs` must have less than {lim.max_input_tokens} tokens. Given: {input_length}"
            )
        if max_new_tokens == 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")

        return ValidRequest(
            inputs=request.inputs,
            input_length=input_length,
            truncate=truncate if truncate is not None else lim.max_input_tokens,
            add_special_tokens=request.add_special_tokens,
            decoder_input_details=p.decoder_input_details,
            top_n_tokens=top_n_tokens,
            parameters=ValidParameters(
                temperature=temperature,
                repetition_penalty=repetition_penalty,
                frequency_penalty=frequency_penalty,
                top_k=top_k,
                top_p=top_p,
                typical_p=typical_p,
                do_sample=p.do_sample,
                seed=seed,
                watermark=p.watermark,
                grammar=grammar,
            ),
            stopping=ValidStopping(max_new_tokens=max_new_tokens, stop_sequences=tuple(p.stop)),
            adapter_id=p.adapter_id,
            # NOTE: TGI's router sends no ids with decoder_input_details (no prefix reuse, so the
            # shard computes every prompt logprob). Truncated prompts get none either: the shard
            # truncates with its own tokenizer, and a key must be exactly the shard's ids.
            input_ids=None
            if p.decoder_input_details or ids is None or len(ids) != input_length
            else tuple(ids),
        )
