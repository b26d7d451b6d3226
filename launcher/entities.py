"""Router-side request and event types (no protobuf here; see ``protocol``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# TGI's HTTP names for the v3 FinishReason enum values (LENGTH, EOS_TOKEN, STOP_SEQUENCE).
FINISH_REASONS = ("length", "eos_token", "stop_sequence")


def chat_finish_reason(reason: str) -> str:
    """``FinishReason::format(use_stop=true)``: the OpenAI routes say ``stop`` for EOS."""
    return "stop" if reason == "eos_token" else reason


@dataclass(frozen=True)
class ValidGrammar:
    """A checked grammar, as the shard receives it: ``kind`` ``"json"`` (``value``: a JSON schema
    as text) or ``"regex"``."""

    kind: str
    value: str


@dataclass(frozen=True)
class ValidParameters:
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    watermark: bool = False
    grammar: ValidGrammar | None = None


@dataclass(frozen=True)
class ValidStopping:
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos_token: bool = False


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed validation, with the router's own token count."""

    inputs: str
    input_length: int  # tokens after left truncation (drives block allocation)
    truncate: int  # sent to the shard: user's truncate or max_input_tokens
    add_special_tokens: bool
    decoder_input_details: bool
    top_n_tokens: int
    parameters: ValidParameters
    stopping: ValidStopping
    adapter_id: str | None = None
    # The router's token ids, for prefix caching; None when it must not reuse or cache the prompt
    # (decoder_input_details, or a prompt the router had to truncate).
    input_ids: tuple[int, ...] | None = None


def _finite(value: float) -> float | None:
    # NOTE: the first prefill logprob is NaN on the wire; TGI serialises it as JSON null.
    return None if value is None or math.isnan(value) else value


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None
    special: bool

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "text": self.text,
            "logprob": _finite(self.logprob),
            "special": self.special,
        }


@dataclass(frozen=True)
class PrefillToken:
    id: int
    text: str
    logprob: float | None

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "logprob": _finite(self.logprob)}


@dataclass(frozen=True)
class GeneratedText:
    text: str
    generated_tokens: int
    finish_reason: str  # one of FINISH_REASONS
    seed: int | None


# Events sent from the batching task to a request's stream (TGI's InferStreamResponse).
@dataclass(frozen=True)
class PrefillEvent:
    tokens: list[PrefillToken]


@dataclass(frozen=True)
class TokenEvent:
    token: Token
    top_tokens: list[Token] = field(default_factory=list)


@dataclass(frozen=True)
class EndEvent:
    token: Token
    top_tokens: list[Token]
    generated_text: GeneratedText
    queued: float  # time.monotonic() when the request entered the queue
    start: float  # time.monotonic() when it entered a batch


Event = PrefillEvent | TokenEvent | EndEvent
