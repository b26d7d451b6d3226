"""OpenAI-compatible routes as TGI serves them: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models`` (``router/src/server.rs``, ``chat.rs``, ``lib.rs``)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .entities import EndEvent, Token, TokenEvent, chat_finish_reason
from .errors import InferError, ValidationError
from .http_api import (
    AppState,
    dumps,
    generate_json,
    read_json,
    state_of,
    stream_generate,
)
from .schemas import Fields, GenerateParameters, GenerateRequest, to_f32
from .version import VERSION

DONE = b"[DONE]"


def fingerprint() -> str:
    return f"{VERSION}-native"


def openai_error_event(err: InferError) -> dict:
    return {"error": {"message": str(err), "http_status_code": err.status}}


def sampling_params(f: Fields) -> tuple[bool, float | None]:
    """OpenAI temperature 0 means greedy; anything else samples (TGI ``try_into_generate``)."""
    temperature = f.get("temperature", "f32")
    if temperature == 0.0:
        return False, None
    return True, temperature


def adapter_id_for(model: str | None) -> str | None:
    return None if model in (None, "tgi") else model


def _message_text(message: Any, i: int) -> dict:
    f = Fields(message, f"messages[{i}]")
    role = f.require("role", "str")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text joined, images as markdown (TGI)
        parts = []
        for j, part in enumerate(content):
            kind = Fields(part, f"messages[{i}].content[{j}]").require("type", "str")
            if kind == "text":
                parts.append(Fields(part, f"messages[{i}].content[{j}]").require("text", "str"))
            elif kind == "image_url":
                raise ValidationError("image modality is not supported")
            else:
                raise ValidationError(
                    f"messages[{i}].content[{j}].type must be `text` or `image_url`, not `{kind}`"
                )
        content = "".join(parts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise ValidationError(f"messages[{i}].content must be a string or a list of content parts")
    return {"role": role, "content": content}


def chat_to_generate(state: AppState, body: Any) -> tuple[GenerateRequest, dict[str, Any]]:
    f = Fields(body, "")
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        raise ValidationError(
            "Failed to deserialize the JSON body into the target type: missing field `messages`"
        )
    if body.get("tools") or body.get("response_format"):
        raise ValidationError(
            "`tools` and `response_format` (grammars) are not supported by tgi-npu-launcher"
        )
    do_sample, temperature = sampling_params(f)
    presence = f.get("presence_penalty", "f32")
    repetition_penalty = None
    if presence is not None:
        # TGI sends presence_penalty + 2 as repetition_penalty, which must be > 0; say which
        # field the client has to change.
        repetition_penalty = to_f32(presence + 2.0)
        if not repetition_penalty > 0.0:
            raise ValidationError(
                "`presence_penalty` must be > -2.0 (it is sent as `repetition_penalty` = "
                f"presence_penalty + 2, which must be strictly positive). Given: {presence}"
            )
    max_tokens = f.get("max_tokens", "u32")
    if max_tokens is None:
        max_tokens = f.get("max_completion_tokens", "u32")
    logprobs = bool(f.get("logprobs", "bool", False))
    model = f.get("model", "str")
    params = GenerateParameters(
        temperature=temperature,
        repetition_penalty=repetition_penalty,
        frequency_penalty=f.get("frequency_penalty", "f32"),
        top_p=f.get("top_p", "f32"),
        do_sample=do_sample,
        max_new_tokens=max_tokens,
        stop=f.get("stop", "str_list", []),
        details=True,
        seed=f.get("seed", "u64"),
        top_n_tokens=f.get("top_logprobs", "u32"),
        adapter_id=adapter_id_for(model),
    )
    prompt = state.tokenizer.apply_chat_template(
        [_message_text(m, i) for i, m in enumerate(messages)]
    )
    options = body.get("stream_options") or {}
    extra = {
        "stream": bool(f.get("stream", "bool", False)),
        "logprobs": logprobs,
        "include_usage": bool(isinstance(options, dict) and options.get("include_usage")),
        "model": state.model_id if adapter_id_for(model) is None else model,
    }
    return GenerateRequest(inputs=prompt, parameters=params, add_special_tokens=False), extra


def _logprobs(tokens: list[Token], top_tokens: list[list[Token]]) -> dict:
    content = []
    for i, t in enumerate(tokens):
        top = top_tokens[i] if i < len(top_tokens) else []
        content.append(
            {
                "token": t.text,
                "logprob": t.logprob,
                "top_logprobs": [{"token": x.text, "logprob": x.logprob} for x in top],
            }
        )
    return {"content": content}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    start_time = time.monotonic()
    state.metrics.inc("tgi_request_count")
    req, extra = chat_to_generate(state, await read_json(request))
    model = extra["model"]

    def chunk(choices: list, usage: dict | None = None) -> dict:
        return {
            "object": "chat.completion.chunk",
            "id": "",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": fingerprint(),
            "choices": choices,
            "usage": usage,
        }

    def render(index: int, event: TokenEvent | EndEvent, details: dict | None):
        token = event.token
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": "" if token.special else token.text},
            "logprobs": _logprobs([token], [event.top_tokens]) if extra["logprobs"] else None,
            "finish_reason": chat_finish_reason(details["finish_reason"]) if details else None,
        }
        out = [chunk([choice])]
        if details and extra["include_usage"]:
            prompt, completion = details["input_length"], details["generated_tokens"]
            out.append(
                chunk(
                    [],
                    {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                )
            )
        return out

    if extra["stream"]:
        return await stream_generate(
            request, state, req, start_time, render, openai_error_event, DONE
        )

    body, headers, input_length = await generate_json(state, req, start_time)
    d = body["details"]
    return web.json_response(
        {
            "object": "chat.completion",
            "id": "",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": fingerprint(),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": body["generated_text"]},
                    "logprobs": _details_logprobs(d) if extra["logprobs"] else None,
                    "finish_reason": chat_finish_reason(d["finish_reason"]),
                }
            ],
            "usage": usage_json(input_length, d["generated_tokens"]),
        },
        headers=headers,
        dumps=lambda o: dumps(o).decode(),
    )


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _details_logprobs(details: dict) -> dict:
    tops = details.get("top_tokens") or []
    return {
        "content": [
            {
                "token": t["text"],
                "logprob": t["logprob"],
                "top_logprobs": [
                    {"token": x["text"], "logprob": x["logprob"]}
                    for x in (tops[i] if i < len(tops) else [])
                ],
            }
            for i, t in enumerate(details["tokens"])
        ]
    }


async def models(request: web.Request) -> web.Response:
    model_id = state_of(request).model_id
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}],
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
