"""OpenAI-compatible chat routes as TGI serves them: ``/v1/chat/completions`` (with
``response_format`` and ``tools``), ``/chat_tokenize``, ``/v1/models`` (``router/src/server.rs``,
``chat.rs``, ``lib.rs``). ``/v1/completions`` is in ``completions``."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from .entities import EndEvent, Token, TokenEvent, chat_finish_reason
from .errors import InferError, TemplateError, ToolError, ValidationError
from .http_api import (
    AppState,
    Restart,
    generate_json,
    json_response,
    read_json,
    state_of,
    stream_generate,
    tokenize_text,
)
from .openai_schemas import ChatRequest, Message, TextChunk
from .schemas import GenerateParameters, GenerateRequest, JsonGrammar
from .tools import (
    DEFAULT_TOOL_PROMPT,
    ToolStream,
    parse_output,
    tool_json,
    tool_schema,
    tools_prompt_text,
    tools_to_use,
)
from .version import VERSION
from .wire import parse, to_f32

DONE = b"[DONE]"


def fingerprint() -> str:
    return f"{VERSION}-native"


def openai_error_event(err: InferError) -> dict:
    return {"error": {"message": str(err), "http_status_code": err.status}}


def sampling_params(temperature: float | None) -> tuple[bool, float | None]:
    """OpenAI temperature 0 means greedy; anything else samples (TGI ``try_into_generate``)."""
    if temperature == 0.0:
        return False, None
    return True, temperature


def adapter_id_for(model: str | None) -> str | None:
    return None if model in (None, "tgi") else model


def _text_message(message: Message, i: int) -> dict:
    """TGI's ``TextMessage::from(Message)``: parts joined; tool calls as their JSON."""
    content = message.content
    if message.tool_calls is not None and content is None:
        content = json.dumps(
            [
                {
                    "id": c.id,
                    "type": c.type,
                    "function": {
                        "description": c.function.description,
                        "name": c.function.name,
                        "arguments": json.dumps(c.function.arguments, separators=(",", ":")),
                    },
                }
                for c in message.tool_calls
            ],
            separators=(",", ":"),
        )
    elif isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, TextChunk):
                raise ValidationError("image modality is not supported")
            texts.append(part.text)
        content = "".join(texts)
    out = {"role": message.role, "content": content or ""}
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def next_tool_call_id(chat: ChatRequest) -> str:
    """TGI: one more than the largest integer id of the conversation's tool calls, else a UUID."""
    try:
        ids = [int(c.id) for m in chat.messages for c in (m.tool_calls or [])]
    except ValueError:
        return str(uuid.uuid4())
    return str(max(ids) + 1) if ids else "0"


def chat_to_generate(
    state: AppState, chat: ChatRequest, use_tools: bool = True
) -> tuple[GenerateRequest, bool]:
    """TGI's ``ChatRequest::try_into_generate``: (the request, whether it uses tools)."""
    if chat.response_format is not None and chat.tools is not None and use_tools:
        raise ToolError("Grammar and tools are mutually exclusive")
    do_sample, temperature = sampling_params(chat.temperature)
    repetition_penalty = None
    if chat.presence_penalty is not None:
        # TGI sends presence_penalty + 2 as repetition_penalty, which must be > 0; say which
        # field the client has to change.
        repetition_penalty = to_f32(chat.presence_penalty + 2.0)
        if not repetition_penalty > 0.0:
            raise ValidationError(
                "`presence_penalty` must be > -2.0 (it is sent as `repetition_penalty` = "
                f"presence_penalty + 2, which must be strictly positive). Given: {chat.presence_penalty}"
            )
    messages = [_text_message(m, i) for i, m in enumerate(chat.messages)]
    grammar, tools = chat.response_format if use_tools else None, None
    if use_tools and chat.tools is not None:
        tools = tools_to_use(chat.tools, chat.tool_choice) or None
    if tools:
        grammar = JsonGrammar(type="json", value=tool_schema(tools))
        prompt = chat.tool_prompt or DEFAULT_TOOL_PROMPT
        last = chat.messages[-1] if chat.messages else None
        if last is not None and (last.content is not None or last.tool_calls is None):
            messages[-1]["content"] += tools_prompt_text(
                tools, prompt, state.tokenizer.template_uses_tools
            )
    try:
        inputs = state.tokenizer.apply_chat_template(
            messages, [tool_json(t) for t in tools] if tools else None
        )
    except TemplateError:
        state.metrics.inc("tgi_request_failure", err="template")
        raise
    params = GenerateParameters(
        temperature=temperature,
        repetition_penalty=repetition_penalty,
        frequency_penalty=chat.frequency_penalty,
        top_p=chat.top_p,
        do_sample=do_sample,
        max_new_tokens=chat.max_tokens,
        stop=chat.stop or [],
        details=True,
        seed=chat.seed,
        top_n_tokens=chat.top_logprobs,
        grammar=grammar,
        adapter_id=adapter_id_for(chat.model),
    )
    return GenerateRequest(inputs=inputs, parameters=params, add_special_tokens=False), bool(tools)


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


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ChatRenderer:
    """Turns a chat request's events into ``chat.completion.chunk`` objects; with tools, the
    text becomes tool-call deltas (``ToolStream``), and ``no_tool`` restarts the request
    without tools."""

    def __init__(self, state: AppState, chat: ChatRequest, using_tools: bool, model: str) -> None:
        self.state = state
        self.chat = chat
        self.model = model
        self.tools = ToolStream() if using_tools else None
        self.call_id = next_tool_call_id(chat)
        self.include_usage = bool(chat.stream_options and chat.stream_options.include_usage)

    def chunk(self, choices: list, usage: dict | None = None) -> dict:
        return {
            "object": "chat.completion.chunk",
            "id": "",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": fingerprint(),
            "choices": choices,
            "usage": usage,
        }

    def _choice(self, delta: dict, event, details: dict | None) -> dict:
        return {
            "index": 0,
            "delta": delta,
            "logprobs": _logprobs([event.token], [event.top_tokens])
            if self.chat.logprobs
            else None,
            "finish_reason": chat_finish_reason(details["finish_reason"]) if details else None,
        }

    def _tool_delta(self, name: str | None, arguments: str) -> dict:
        call = {"index": 0, "id": self.call_id, "type": "function"}
        call["function"] = {"name": name, "arguments": arguments}
        return {"role": "assistant", "tool_calls": [call]}

    def __call__(self, index: int, event: TokenEvent | EndEvent, details: dict | None):
        token = event.token
        out = []
        if self.tools is None:
            text = "" if token.special else token.text
            out.append(
                self.chunk([self._choice({"role": "assistant", "content": text}, event, details)])
            )
        else:
            pieces = self.tools.push("" if token.special else token.text)
            if isinstance(pieces, tuple):  # the model chose no_tool: answer in text instead
                req, _ = chat_to_generate(self.state, self.chat, use_tools=False)
                return Restart(req, ChatRenderer(self.state, self.chat, False, self.model))
            for k, (name, arguments) in enumerate(pieces):
                last = details if k == len(pieces) - 1 else None
                out.append(
                    self.chunk([self._choice(self._tool_delta(name, arguments), event, last)])
                )
            if details and not pieces:  # the finish reason always reaches the client
                out.append(self.chunk([self._choice(self._tool_delta(None, ""), event, details)]))
        if details and self.include_usage:
            prompt, completion = details["input_length"], details["generated_tokens"]
            out.append(self.chunk([], usage_json(prompt, completion)))
        return out


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


async def chat_body(request: web.Request, body: Any) -> web.StreamResponse:
    state = state_of(request)
    start_time = time.monotonic()
    state.metrics.inc("tgi_request_count")
    chat = parse(ChatRequest, body)
    req, using_tools = chat_to_generate(state, chat)
    model = state.model_id if adapter_id_for(chat.model) is None else chat.model

    if chat.stream:
        render = ChatRenderer(state, chat, using_tools, model)
        return await stream_generate(
            request, state, req, start_time, render, openai_error_event, DONE
        )

    answer, headers, input_length = await generate_json(state, req, start_time)
    message: dict[str, Any] = {"role": "assistant", "content": answer["generated_text"]}
    if using_tools:
        call = parse_output(answer["generated_text"])
        if call is None:  # no_tool: the same conversation again, without tools
            req, _ = chat_to_generate(state, chat, use_tools=False)
            answer, headers, input_length = await generate_json(state, req, start_time)
            message = {"role": "assistant", "content": answer["generated_text"]}
        else:
            message = {"role": "assistant", "tool_calls": [call]}
    d = answer["details"]
    return json_response(
        {
            "object": "chat.completion",
            "id": "",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": fingerprint(),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": _details_logprobs(d) if chat.logprobs else None,
                    "finish_reason": chat_finish_reason(d["finish_reason"]),
                }
            ],
            "usage": usage_json(input_length, d["generated_tokens"]),
        },
        headers,
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await chat_body(request, await read_json(request))


async def chat_tokenize(request: web.Request) -> web.Response:
    """``/chat_tokenize``: the templated prompt (tools and grammar applied as for a chat
    request) and its tokens."""
    state = state_of(request)
    state.metrics.inc("tgi_request_count")
    chat = parse(ChatRequest, await read_json(request))
    req, _ = chat_to_generate(state, chat)
    tokens = await tokenize_text(state, req.inputs, req.add_special_tokens)
    return json_response({"tokenize_response": tokens, "templated_text": req.inputs})


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
    app.router.add_post("/chat_tokenize", chat_tokenize)
    app.router.add_get("/v1/models", models)
