"""One request on the shard: what the router sent (``RequestSpec``, plain values) and its life
(``Request``): one token list (prompt + generated) with a prefill cursor, and one method that
takes a step's result.

The cursor says how many prompt tokens have their KV in the cache. It starts at ``cache_len``
(the prefix the router found in its radix cache) and moves by ``chunk`` tokens per forward pass
until it reaches the prompt's end. Without chunked prefill the first chunk is the whole rest of
the prompt; with it, the router's ``chunk_len`` cuts the first chunk and the batch cuts the
following ones (``Batch.plan_chunks``). The pass that moves the cursor to the end of the prompt
yields the first generated token; every later pass yields one more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import InvalidRequestError
from .grammar import GRAMMAR_TYPES, GrammarError, GrammarSpec, GrammarState, compiler_for
from .outputs import GeneratedText
from .sampling import SamplingParams
from .stopping import IncrementalDetokenizer, StoppingCriteria

FLOAT_PARAMETERS = ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty")


@dataclass(frozen=True)
class RequestSpec:
    """A ``generate.v3.Request`` as plain values (``wire.py`` builds it from the protobuf)."""

    id: int
    text: str  # the text input chunks, concatenated (a text-only model ignores images)
    truncate: int = 0
    add_special_tokens: bool = True
    # NextTokenChooserParameters, unvalidated
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    watermark: bool = False
    grammar: str = ""
    grammar_type: str | None = None  # "json" | "regex" | None
    # StoppingCriteriaParameters
    max_new_tokens: int = 20
    stop_sequences: tuple[str, ...] = ()
    ignore_eos_token: bool = False
    prefill_logprobs: bool = False
    top_n_tokens: int = 0
    blocks: tuple[int, ...] = ()
    slots: tuple[int, ...] = ()
    cache_len: int = 0
    chunk_len: int | None = None  # set by a router that chunks: prompt tokens of the first pass


def sampling_params(spec: RequestSpec) -> SamplingParams:
    """The request's sampling parameters, or InvalidRequestError naming it when the shard cannot
    serve them (non-finite or impossible values, max_new_tokens 0). The launcher's
    validation refuses all of these first: the protocol has no per-request error, so one refused
    request fails its whole Prefill."""
    for name in FLOAT_PARAMETERS:
        value = getattr(spec, name)
        if not math.isfinite(value):
            raise InvalidRequestError(f"request {spec.id}: {name}={value} is not a finite number")
    params = SamplingParams(
        temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
        typical_p=spec.typical_p, do_sample=spec.do_sample, seed=spec.seed,
        repetition_penalty=spec.repetition_penalty, frequency_penalty=spec.frequency_penalty,
        watermark=spec.watermark,
    )
    try:
        params.validate()
    except ValueError as err:
        raise InvalidRequestError(f"request {spec.id}: {err}") from None
    if spec.max_new_tokens < 1:
        raise InvalidRequestError(
            f"request {spec.id}: max_new_tokens must be at least 1, got {spec.max_new_tokens}"
        )
    return params


def grammar_state(spec: RequestSpec, tokenizer, eos_token_ids) -> GrammarState | None:
    """The request's grammar, compiling on a worker thread (``grammar/compiler.py``), or None
    (an empty grammar is none, as in TGI). InvalidRequestError names the request when the
    grammar cannot compile: its Prefill fails before anything changes."""
    if not spec.grammar:
        return None
    if spec.grammar_type not in GRAMMAR_TYPES:
        raise InvalidRequestError(
            f"request {spec.id}: a grammar needs grammar_type GRAMMAR_TYPE_JSON (a JSON schema) "
            f"or GRAMMAR_TYPE_REGEX, got {spec.grammar_type or 'GRAMMAR_TYPE_NONE'}"
        )
    try:
        return GrammarState.start(
            spec.id, GrammarSpec(spec.grammar_type, spec.grammar), compiler_for(tokenizer, eos_token_ids)
        )
    except GrammarError as err:  # the message names the request
        raise InvalidRequestError(str(err)) from None


@dataclass(eq=False)
class Request:
    id: int
    tokens: list[int]  # prompt + generated so far
    prompt_len: int
    cache_len: int  # leading prompt tokens whose KV the router says is already cached
    cursor: int  # prompt tokens whose KV is in the cache (cache_len .. prompt_len)
    chunk: int  # prompt tokens the next pass computes (0 once the prompt is in the cache)
    blocks: list[int]
    slots: list[int]  # slots[p] holds the KV of position p
    params: SamplingParams
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    special_ids: frozenset[int]
    top_n: int
    prefill_logprobs: bool
    owned: bool  # this rank returns the request's Generations (id % world_size == rank)
    # slots[:kv_len] as a tensor: every KV slot this request reads or writes (overlap checks)
    slot_tensor: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    grammar: GrammarState | None = None  # the request's place in its grammar, advanced by take
    finished: bool = False
    # logprob of prompt token p + 1 at position p, for p = cache_len .. cursor - 1 (when asked)
    prompt_logprobs: list[float] = field(default_factory=list)

    # ---------------------------------------------------------------- derived views
    @property
    def prompt_ids(self) -> list[int]:
        return self.tokens[: self.prompt_len]

    @property
    def generated_count(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prefilled(self) -> bool:
        """The whole prompt is in the KV cache: every pass from now on decodes one token."""
        return self.cursor >= self.prompt_len

    @property
    def kv_len(self) -> int:
        """Positions this request can ever hold: prompt + max_new_tokens - 1."""
        return self.prompt_len + self.stopping.max_new_tokens - 1

    @property
    def query_len(self) -> int:
        """Tokens of the next forward pass."""
        return 1 if self.prefilled else self.chunk

    @property
    def yields_token(self) -> bool:
        """The next pass ends with a token for this request (its last prompt chunk, or decode)."""
        return self.prefilled or self.cursor + self.chunk >= self.prompt_len

    def written_slots(self, block_size: int) -> Tensor:
        """The slots this request's forward passes write, from the first block it does not share
        (positions before ``cache_len`` are a reused prefix; with a whole-prompt match the router
        sends ``cache_len = prompt - 1``, which rewrites one position of a shared block with the
        same KV, so that block is left out)."""
        first = -(-self.cache_len // block_size) * block_size
        return self.slot_tensor[first:]

    def next_query(self) -> tuple[list[int], int]:
        """Tokens of the next forward pass and the position of the first of them."""
        if not self.prefilled:
            return self.tokens[self.cursor : self.cursor + self.chunk], self.cursor
        return self.tokens[-1:], len(self.tokens) - 1

    # ---------------------------------------------------------------- a step's result
    def prefill_pass_done(self, logprobs: list[float] | None) -> None:
        """This pass computed the KV of the current chunk (and, when asked, the logprobs of the
        prompt tokens it predicts)."""
        if logprobs is not None:
            self.prompt_logprobs.extend(logprobs)
        self.cursor += self.chunk
        self.chunk = 0

    def take(self, token: int) -> tuple[str, GeneratedText | None]:
        """Append a generated token: its text piece, and the request's final text when it stops."""
        self.tokens.append(token)
        if self.grammar is not None:
            self.grammar.advance(token)
        special = token in self.special_ids
        piece = self.detokenizer.step(token, special)
        stop, reason = self.stopping(token, "" if special else piece)
        if not stop:
            return piece, None
        self.finished = True
        remainder = self.detokenizer.finish()
        if not special:
            piece += remainder
        return piece, GeneratedText(
            text=self.detokenizer.final_text(),
            generated_tokens=self.generated_count,
            finish_reason=reason,
            seed=self.params.seed if self.params.is_sampling else None,
        )
