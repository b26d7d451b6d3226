"""TGI's native JSON shapes (``router/src/lib.rs``) as pydantic models: the request models
validate ``/generate``, ``/generate_stream``, ``POST /`` and ``/tokenize`` bodies (serde-like
types, ``wire``), and every model here is a schema of the OpenAPI document (``openapi``). The
``*_json`` helpers build the response bodies these models describe."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import entities
from .wire import F32, I32, U32, U64, Bool, JsonValue, Str, StrList, Usize


class Schema(BaseModel):
    """Unknown fields are ignored, as serde does by default."""

    model_config = ConfigDict(extra="ignore")


# ---- grammars (``GrammarType``: adjacently tagged, ``{"type": ..., "value": ...}``) -----------
class JsonSchemaConfig(Schema):
    name: Str | None = Field(None, description="Optional name identifier for the schema")
    schema_: JsonValue = Field(alias="schema", description="The actual JSON schema definition")
    strict: Bool | None = None


class JsonGrammar(Schema):
    """A JSON schema (an object, or a string holding one). ``json_object`` is an alias; without
    ``value`` it means any JSON object (OpenAI's ``{"type": "json_object"}``)."""

    type: Literal["json", "json_object"]
    value: JsonValue = Field(
        None, json_schema_extra={"example": {"properties": {"location": {"type": "string"}}}}
    )


class RegexGrammar(Schema):
    type: Literal["regex"]
    value: Str


class JsonSchemaGrammar(Schema):
    """TGI's ``{"type": "json_schema", "value": {...}}``; OpenAI's ``json_schema`` key is
    accepted in place of ``value``."""

    type: Literal["json_schema"]
    value: JsonSchemaConfig | None = None
    json_schema: JsonSchemaConfig | None = None


GrammarType = Annotated[JsonGrammar | RegexGrammar | JsonSchemaGrammar, Field(discriminator="type")]


# What validation also checks, for the document only (validation words its own errors as TGI).
OPEN_UNIT = {"exclusiveMinimum": 0, "exclusiveMaximum": 1}


# ---- requests --------------------------------------------------------------------------------
class GenerateParameters(Schema):
    best_of: Usize | None = Field(None, description="Generate best_of sequences (only 1 here)")
    temperature: F32 | None = Field(
        None,
        description="The value used to module the logits distribution.",
        json_schema_extra={"exclusiveMinimum": 0},
    )
    repetition_penalty: F32 | None = Field(
        None, description="1.0 means no penalty.", json_schema_extra={"exclusiveMinimum": 0}
    )
    frequency_penalty: F32 | None = Field(
        None,
        description="Between -2.0 and 2.0; 0.0 means no penalty.",
        json_schema_extra={"minimum": -2, "maximum": 2},
    )
    top_k: I32 | None = Field(
        None, description="Keep the k most likely tokens.", json_schema_extra={"minimum": 1}
    )
    top_p: F32 | None = Field(
        None, description="Nucleus sampling: 0 < top_p < 1.", json_schema_extra=OPEN_UNIT
    )
    typical_p: F32 | None = Field(
        None, description="Typical decoding mass: 0 < typical_p < 1.", json_schema_extra=OPEN_UNIT
    )
    do_sample: Bool | None = Field(False, description="Activate logits sampling.")
    max_new_tokens: U32 | None = Field(
        None, description="Maximum number of tokens to generate.", json_schema_extra={"minimum": 1}
    )
    return_full_text: Bool | None = Field(None, description="Prepend the prompt to the text.")
    stop: StrList | None = Field(None, description="Stop generating on these sequences.")
    truncate: Usize | None = Field(
        None,
        description="Keep only the last `truncate` prompt tokens.",
        json_schema_extra={"minimum": 1},
    )
    watermark: Bool | None = False
    details: Bool | None = Field(False, description="Return generation details.")
    decoder_input_details: Bool | None = Field(False, description="Return prompt token logprobs.")
    seed: U64 | None = Field(None, description="Random sampling seed.")
    top_n_tokens: U32 | None = Field(
        None, description="The number of most likely tokens to return at each step."
    )
    grammar: GrammarType | None = Field(
        None, description="Constrain the output to a JSON schema or a regex."
    )
    adapter_id: Str | None = Field(None, description="Lora adapter id")

    def model_post_init(self, _: Any) -> None:
        # serde's defaults for fields given as null
        for name in ("do_sample", "watermark", "details", "decoder_input_details"):
            if getattr(self, name) is None:
                setattr(self, name, False)
        if self.stop is None:
            self.stop = []


class GenerateRequest(Schema):
    inputs: Str = Field(json_schema_extra={"example": "My name is Olivier and I", "minLength": 1})
    parameters: GenerateParameters | None = Field(default_factory=GenerateParameters)
    add_special_tokens: Bool | None = True

    def model_post_init(self, _: Any) -> None:
        if self.parameters is None:
            self.parameters = GenerateParameters()
        if self.add_special_tokens is None:
            self.add_special_tokens = True


class CompatGenerateRequest(GenerateRequest):
    """``POST /``: a ``GenerateRequest`` that may ask for a stream."""

    stream: Bool | None = False


# ---- responses -------------------------------------------------------------------------------
FinishReason = Literal["length", "eos_token", "stop_sequence"]


class Token(Schema):
    id: int = Field(ge=0)
    text: str
    logprob: float | None
    special: bool


class PrefillToken(Schema):
    id: int = Field(ge=0)
    text: str
    logprob: float | None


class Details(Schema):
    finish_reason: FinishReason
    generated_tokens: int = Field(ge=0)
    seed: int | None = Field(ge=0)
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class GenerateResponse(Schema):
    generated_text: str
    details: Details | None = None


class StreamDetails(Schema):
    finish_reason: FinishReason
    generated_tokens: int = Field(ge=0)
    seed: int | None = Field(ge=0)
    input_length: int = Field(ge=0)


class StreamResponse(Schema):
    """One ``data:`` event of ``/generate_stream``."""

    index: int = Field(ge=0)
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None
    details: StreamDetails | None


class SimpleToken(Schema):
    id: int = Field(ge=0)
    text: str
    start: int = Field(ge=0)
    stop: int = Field(ge=0)


class ErrorResponse(Schema):
    error: str
    error_type: str


class Info(Schema):
    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    max_concurrent_requests: int = Field(ge=0)
    max_best_of: int = Field(ge=0)
    max_stop_sequences: int = Field(ge=0)
    max_input_tokens: int = Field(ge=0)
    max_total_tokens: int = Field(ge=0)
    validation_workers: int = Field(ge=0)
    max_client_batch_size: int = Field(ge=0)
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    # ours: prompts enter in chunks under max_batch_prefill_tokens (the shard's support_chunking)
    prefill_chunking: bool = False
    # ours: the --quantize the shards serve (eetq, compressed-tensors, msmodelslim), None for float
    quantize: str | None = None


def details_json(
    generated: entities.GeneratedText,
    prefill: list[entities.PrefillToken],
    tokens: list[entities.Token],
    top_tokens: list[list[entities.Token]],
) -> dict:
    details: dict[str, Any] = {
        "finish_reason": generated.finish_reason,
        "generated_tokens": generated.generated_tokens,
        "seed": generated.seed,
        "prefill": [t.to_json() for t in prefill],
        "tokens": [t.to_json() for t in tokens],
    }
    if any(top_tokens):
        details["top_tokens"] = [[t.to_json() for t in step] for step in top_tokens]
    return details


def stream_event_json(
    index: int,
    token: entities.Token,
    top_tokens: list[entities.Token],
    generated_text: str | None = None,
    details: dict | None = None,
) -> dict:
    event: dict[str, Any] = {"index": index, "token": token.to_json()}
    if top_tokens:
        event["top_tokens"] = [t.to_json() for t in top_tokens]
    event["generated_text"] = generated_text
    event["details"] = details
    return event
