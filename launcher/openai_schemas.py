"""The OpenAI-compatible shapes TGI serves (``router/src/lib.rs``: ``ChatRequest``,
``CompletionRequest``, tools, and their responses) as pydantic models: the request models
validate bodies, and every model is a schema of the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, PlainValidator, WithJsonSchema

from .schemas import OPEN_UNIT, GrammarType, Schema, SimpleToken
from .wire import F32, U32, U64, Bool, JsonValue, Str, StrList, nested, serde_error, unexpected

REF = "#/components/schemas/"


# ---- messages --------------------------------------------------------------------------------
class TextChunk(Schema):
    type: Literal["text"]
    text: Str


class Url(Schema):
    url: Str


class ImageUrlChunk(Schema):
    type: Literal["image_url"]
    image_url: Url


def _content(value: Any) -> Any:
    """``MessageContent``: a string, or a list of text / image_url parts (null: no content)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise serde_error(
            f"invalid type: {unexpected(value)}, expected a string or a list of content parts"
        )
    parts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(nested(TextChunk, part, f"[{j}]"))
        elif kind == "image_url":
            parts.append(nested(ImageUrlChunk, part, f"[{j}]"))
        else:
            raise serde_error(f"must be `text` or `image_url`, not `{kind}`", f"[{j}].type")
    return parts


MessageContent = Annotated[
    str | list[TextChunk | ImageUrlChunk] | None,
    PlainValidator(_content),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "anyOf": [{"$ref": REF + "TextChunk"}, {"$ref": REF + "ImageUrlChunk"}]
                    },
                },
                {"type": "null"},
            ]
        }
    ),
]


class FunctionDefinition(Schema):
    name: Str
    description: Str | None = None
    # OpenAI calls it ``parameters``; TGI ``arguments`` (accepting both).
    arguments: JsonValue = Field(
        None, validation_alias=AliasChoices("arguments", "parameters"), description="a JSON schema"
    )


class ToolCall(Schema):
    id: Str
    type: Str
    function: FunctionDefinition


class Message(Schema):
    role: Str = Field(json_schema_extra={"example": "user"})
    content: MessageContent = None
    tool_calls: list[ToolCall] | None = None
    name: Str | None = None
    tool_call_id: Str | None = None


# ---- tools -----------------------------------------------------------------------------------
class Tool(Schema):
    type: Str = Field(json_schema_extra={"example": "function"})
    function: FunctionDefinition


class FunctionName(Schema):
    name: Str


class TypedChoice(Schema):
    type: Literal["function"]
    function: FunctionName


def _tool_choice(value: Any) -> str | FunctionName:
    """TGI's ``ToolTypeDeserializer``: null -> auto; "none" / "auto" / "required"; any other
    string names a function; ``{"type": "function", "function": {"name": ...}}`` too."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        return value if value in ("none", "auto", "required") else FunctionName(name=value)
    if isinstance(value, dict):
        return nested(TypedChoice, value, "").function
    raise serde_error(
        f"invalid type: {unexpected(value)}, expected `auto`, `none`, `required`, a function "
        'name or {"type": "function", "function": {"name": ...}}'
    )


ToolChoice = Annotated[
    Any,
    PlainValidator(_tool_choice),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "enum": ["auto", "none", "required"]},
                {"type": "string", "description": "the name of a function to call"},
                {"$ref": REF + "TypedChoice"},
                {"type": "null"},
            ]
        }
    ),
]


class StreamOptions(Schema):
    include_usage: Bool | None = False


# ---- requests --------------------------------------------------------------------------------
PENALTY = {"minimum": -2, "maximum": 2}


class ChatRequest(Schema):
    model: Str | None = Field(
        None, description="`tgi` or absent: the served model; else a LoRA adapter id"
    )
    messages: list[Message] = Field(json_schema_extra={"minItems": 1})
    frequency_penalty: F32 | None = Field(None, json_schema_extra=PENALTY)
    logit_bias: JsonValue = Field(None, description="UNUSED")
    logprobs: Bool | None = None
    top_logprobs: U32 | None = None
    max_tokens: U32 | None = Field(
        None,
        validation_alias=AliasChoices("max_tokens", "max_completion_tokens"),
        json_schema_extra={"minimum": 1},
    )
    n: U32 | None = Field(None, description="UNUSED")
    presence_penalty: F32 | None = Field(None, json_schema_extra={"exclusiveMinimum": -2})
    stop: StrList | None = None
    stream: Bool | None = False
    seed: U64 | None = None
    temperature: F32 | None = Field(
        None, description="0 means greedy; absent samples at 1.0", json_schema_extra={"minimum": 0}
    )
    top_p: F32 | None = Field(None, json_schema_extra=OPEN_UNIT)
    tools: list[Tool] | None = None
    tool_prompt: Str | None = None
    tool_choice: ToolChoice = "auto"
    response_format: GrammarType | None = Field(
        None, description="A request can use `response_format` OR `tools` but not both."
    )
    stream_options: StreamOptions | None = None


class CompletionRequest(Schema):
    model: Str | None = None
    prompt: StrList
    frequency_penalty: F32 | None = Field(None, json_schema_extra=PENALTY)
    max_tokens: U32 | None = Field(None, json_schema_extra={"minimum": 1})
    repetition_penalty: F32 | None = Field(None, json_schema_extra={"exclusiveMinimum": 0})
    seed: U64 | None = None
    stop: StrList | None = None
    stream: Bool | None = False
    suffix: Str | None = Field(None, description="refused: preprocess the prompt instead")
    temperature: F32 | None = Field(None, json_schema_extra={"minimum": 0})
    top_p: F32 | None = Field(None, json_schema_extra=OPEN_UNIT)


# ---- responses -------------------------------------------------------------------------------
class Usage(Schema):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class ChatCompletionTopLogprob(Schema):
    token: str
    logprob: float | None


class ChatCompletionLogprob(Schema):
    token: str
    logprob: float | None
    top_logprobs: list[ChatCompletionTopLogprob]


class ChatCompletionLogprobs(Schema):
    content: list[ChatCompletionLogprob]


class TextMessage(Schema):
    role: str
    content: str
    tool_call_id: str | None = None


class OutputFunction(Schema):
    """A called function: ``arguments`` is a JSON string, as OpenAI sends it."""

    name: str
    description: str | None = None
    arguments: str


class OutputToolCall(Schema):
    id: str
    type: Literal["function"]
    function: OutputFunction


class ToolCallMessage(Schema):
    role: str
    tool_calls: list[OutputToolCall]


class ChatCompletionComplete(Schema):
    index: int = Field(ge=0)
    message: TextMessage | ToolCallMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: str


class ChatCompletion(Schema):
    object: Literal["chat.completion"]
    id: str
    created: int = Field(ge=0)
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionComplete]
    usage: Usage


class DeltaFunction(Schema):
    name: str | None = None
    arguments: str


class DeltaToolCall(Schema):
    index: int = Field(ge=0)
    id: str
    type: Literal["function"]
    function: DeltaFunction


class ToolCallDelta(Schema):
    role: str
    tool_calls: list[DeltaToolCall]


class ChatCompletionChoice(Schema):
    index: int = Field(ge=0)
    delta: TextMessage | ToolCallDelta
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Schema):
    object: Literal["chat.completion.chunk"]
    id: str
    created: int = Field(ge=0)
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionChoice]
    usage: Usage | None = None


class CompletionComplete(Schema):
    index: int = Field(ge=0)
    text: str
    logprobs: list[float] | None = None
    finish_reason: str


class CompletionFinal(Schema):
    object: Literal["text_completion"]
    id: str
    created: int = Field(ge=0)
    model: str
    system_fingerprint: str
    choices: list[CompletionComplete]
    usage: Usage


class Chunk(Schema):
    """One ``data:`` event of a ``/v1/completions`` stream."""

    object: Literal["text_completion"]
    id: str
    created: int = Field(ge=0)
    model: str
    system_fingerprint: str
    choices: list[CompletionComplete]
    usage: Usage | None = None


class ModelInfo(Schema):
    id: str
    object: str
    created: int = Field(ge=0)
    owned_by: str


class ModelsInfo(Schema):
    object: Literal["list"]
    data: list[ModelInfo]


class ChatTokenizeResponse(Schema):
    tokenize_response: list[SimpleToken]
    templated_text: str


class OpenAIError(Schema):
    message: str
    http_status_code: int


class OpenAIErrorEvent(Schema):
    """An error after an OpenAI stream started (its last event before ``[DONE]``)."""

    error: OpenAIError
