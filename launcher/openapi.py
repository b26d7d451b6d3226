"""The OpenAPI 3.0.3 document of the HTTP API (TGI serves its own at ``/api-doc/openapi.json``),
generated from the pydantic models that validate the requests (``schemas``, ``openai_schemas``),
so the document and the validation cannot drift apart.

pydantic writes JSON Schema 2020-12; ``to_openapi30`` rewrites the few constructs OpenAPI 3.0
lacks (``{"type": "null"}`` alternatives become ``nullable``, ``const`` becomes a one-value
``enum``, numeric ``exclusiveMinimum`` becomes ``minimum`` + ``true``), as TGI's document is 3.0.3 and Swagger UI 4 reads only 3.0.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import openai_schemas as oa
from . import schemas as na

REF = "#/components/schemas/{model}"
ERRORS = {
    "400": "The body is not JSON (or not valid UTF-8 / Unicode)",
    "401": "Missing or wrong API key (only with --api-key)",
    "413": "The body is over --payload-limit",
    "422": "Input validation error",
    "424": "Generation error",
    "429": "Model is overloaded",
    "500": "Incomplete generation",
}
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    na.GenerateResponse,
    na.StreamResponse,
    na.SimpleToken,
    na.ErrorResponse,
    na.Info,
    oa.ChatCompletion,
    oa.ChatCompletionChunk,
    oa.CompletionFinal,
    oa.Chunk,
    oa.ModelsInfo,
    oa.ChatTokenizeResponse,
    oa.OpenAIErrorEvent,
)
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    na.GenerateRequest,
    na.CompatGenerateRequest,
    oa.ChatRequest,
    oa.CompletionRequest,
    oa.TextChunk,
    oa.ImageUrlChunk,
    oa.TypedChoice,  # referenced by hand-written schemas
)


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def to_openapi30(node: Any) -> Any:
    """JSON Schema 2020-12 (pydantic's) -> OpenAPI 3.0 schema objects, recursively."""
    if isinstance(node, list):
        return [to_openapi30(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: to_openapi30(v) for k, v in node.items()}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(exclusive), (int, float)) and not isinstance(node[exclusive], bool):
            node[bound] = node[exclusive]  # 2020-12's number -> 3.0's bound + boolean
            node[exclusive] = True
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            del node[key]
            node["nullable"] = True
            if len(rest) == 1 and "$ref" not in rest[0]:
                node = {**rest[0], **node}
            elif len(rest) == 1:
                node["allOf"] = rest
            else:
                node[key] = rest
    return node


def _body(model: type[BaseModel]) -> dict:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def _responses(ok: dict, errors: tuple[str, ...]) -> dict:
    out = {"200": ok}
    for code in errors:
        out[code] = {
            "description": ERRORS[code],
            "content": {"application/json": {"schema": _ref(na.ErrorResponse)}},
        }
    return out


def sse_event(*models: type[BaseModel], done: bool = False) -> dict:
    """One server-sent event of a stream. Its ``data`` is the JSON of one of ``models`` (or of an
    error), or ``[DONE]`` where ``done`` (OpenAI streams end with it); ``x-data-schema`` holds
    that JSON's schema (OpenAPI 3.0 has no keyword for a string's JSON content). ``:``
    keep-alive comments carry no event."""
    names = ", ".join(m.__name__ for m in models) + (" or [DONE]" if done else "")
    return {
        "type": "object",
        "properties": {"data": {"type": "string", "description": f"JSON of {names}"}},
        "required": ["data"],
        "x-data-schema": {"anyOf": [_ref(m) for m in models]},
    }


def _ok(description: str, json_schema: dict | None = None, sse: dict | None = None) -> dict:
    content = {}
    if json_schema is not None:
        content["application/json"] = {"schema": json_schema}
    if sse is not None:
        content["text/event-stream"] = {"schema": sse}
    return {"description": description, **({"content": content} if content else {})}


NATIVE_EVENT = (na.StreamResponse, na.ErrorResponse)
GENERATION_ERRORS = ("400", "401", "413", "422", "424", "429", "500")


def _paths() -> dict:
    gen, chat, compl = na.GenerateRequest, oa.ChatRequest, oa.CompletionRequest
    sagemaker = {"anyOf": [_ref(na.CompatGenerateRequest), _ref(chat), _ref(compl)]}
    post = lambda summary, body, ok, errors=GENERATION_ERRORS: {
        "post": {
            "tags": ["Text Generation Inference"],
            "summary": summary,
            "requestBody": body,
            "responses": _responses(ok, errors),
        }
    }
    get = lambda summary, ok, errors=(): {
        "get": {
            "tags": ["Text Generation Inference"],
            "summary": summary,
            "responses": _responses(ok, errors),
        }
    }
    health = _ok("Everything is working fine")
    health_get = get("Health check", health)
    health_get["get"]["responses"]["503"] = {
        "description": "Text generation inference is down",
        "content": {"application/json": {"schema": _ref(na.ErrorResponse)}},
    }
    return {
        "/": {
            **post(
                "Generate tokens if `stream == false` or a stream of tokens if `stream == true`",
                _body(na.CompatGenerateRequest),
                _ok(
                    "Generated Text",
                    {"type": "array", "items": _ref(na.GenerateResponse)},
                    sse_event(*NATIVE_EVENT),
                ),
            ),
            **health_get,
        },
        "/generate": post(
            "Generate tokens", _body(gen), _ok("Generated Text", _ref(na.GenerateResponse))
        ),
        "/generate_stream": post(
            "Generate a stream of token using Server-Sent Events",
            _body(gen),
            _ok("Generated Text", sse=sse_event(*NATIVE_EVENT)),
        ),
        "/v1/chat/completions": post(
            "Generate tokens (OpenAI chat completions)",
            _body(chat),
            _ok(
                "Generated Chat Completion",
                _ref(oa.ChatCompletion),
                sse_event(oa.ChatCompletionChunk, oa.OpenAIErrorEvent, done=True),
            ),
        ),
        "/v1/completions": post(
            "Complete text (OpenAI completions)",
            _body(compl),
            _ok(
                "Generated Completion",
                _ref(oa.CompletionFinal),
                sse_event(oa.Chunk, oa.OpenAIErrorEvent, done=True),
            ),
        ),
        "/invocations": post(
            "SageMaker: a generate, chat or completion request",
            {"required": True, "content": {"application/json": {"schema": sagemaker}}},
            _ok(
                "As the route of the request's shape answers",
                {
                    "anyOf": [
                        {"type": "array", "items": _ref(na.GenerateResponse)},
                        _ref(oa.ChatCompletion),
                        _ref(oa.CompletionFinal),
                    ]
                },
                sse_event(
                    *NATIVE_EVENT, oa.ChatCompletionChunk, oa.Chunk, oa.OpenAIErrorEvent, done=True
                ),
            ),
        ),
        "/tokenize": post(
            "Tokenize inputs",
            _body(gen),
            _ok("Tokenized ids", {"type": "array", "items": _ref(na.SimpleToken)}),
            ("400", "401", "413", "422"),
        ),
        "/chat_tokenize": post(
            "Template and tokenize a chat request",
            _body(chat),
            _ok("Templated and tokenized ChatRequest", _ref(oa.ChatTokenizeResponse)),
            ("400", "413", "422"),
        ),
        "/info": get(
            "Text Generation Inference endpoint info", _ok("Served model info", _ref(na.Info))
        ),
        "/health": health_get,
        "/ping": health_get,
        "/metrics": get(
            "Prometheus metrics scrape endpoint",
            {
                "description": "Prometheus Metrics",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
        ),
        "/v1/models": get("Served model", _ok("Served model info", _ref(oa.ModelsInfo))),
    }


def openapi_document(version: str) -> dict:
    models = [(m, "validation") for m in RESPONSE_MODELS + REQUEST_MODELS]
    _, defs = models_json_schema(models, ref_template=REF)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Text Generation Inference (tgi-npu-launcher)",
            "description": "Text Generation Webserver",
            "license": {"name": "Apache 2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
            "version": version,
        },
        "paths": _paths(),
        "components": {"schemas": to_openapi30(defs.get("$defs", {}))},
        "tags": [
            {
                "name": "Text Generation Inference",
                "description": "Hugging Face Text Generation Inference API",
            }
        ],
    }
