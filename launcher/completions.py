"""``/v1/completions`` as TGI serves it: one or several prompts (<= --max-client-batch-size),
OpenAI ``text_completion`` objects, streaming ending with ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from .entities import EndEvent, TokenEvent, chat_finish_reason
from .errors import InferError, ValidationError
from .http_api import AppState, generate_json, json_response, read_json, state_of, stream_generate
from .openai_api import (
    DONE,
    adapter_id_for,
    fingerprint,
    openai_error_event,
    sampling_params,
    usage_json,
)
from .openai_schemas import CompletionRequest
from .schemas import GenerateParameters, GenerateRequest
from .sse import SseStream
from .wire import parse


def completion_requests(
    state: AppState, body: Any, max_client_batch_size: int
) -> tuple[list[GenerateRequest], dict]:
    c = parse(CompletionRequest, body)
    if c.suffix is not None:
        raise ValidationError(
            "Suffix is not supported and can be achieved by preprocessing the prompt."
        )
    if len(c.prompt) > max_client_batch_size:
        raise ValidationError(
            f"Number of prompts exceeds the maximum allowed batch size of {max_client_batch_size}"
        )
    do_sample, temperature = sampling_params(c.temperature)
    requests = [
        GenerateRequest(
            inputs=prompt,
            add_special_tokens=True,
            parameters=GenerateParameters(
                temperature=temperature,
                repetition_penalty=c.repetition_penalty,
                frequency_penalty=c.frequency_penalty,
                top_p=c.top_p,
                do_sample=do_sample,
                max_new_tokens=c.max_tokens,
                stop=c.stop or [],
                details=True,
                seed=c.seed,
                adapter_id=adapter_id_for(c.model),
            ),
        )
        for prompt in c.prompt
    ]
    return requests, {"stream": bool(c.stream)}


async def completions_body(request: web.Request, body: Any) -> web.StreamResponse:
    state = state_of(request)
    start_time = time.monotonic()
    state.metrics.inc("tgi_request_count")
    requests, extra = completion_requests(state, body, state.info["max_client_batch_size"])
    model = state.model_id

    def choice(index: int, text: str, finish_reason: str) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def head() -> dict:
        return {
            "object": "text_completion",
            "id": "",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": fingerprint(),
        }

    if extra["stream"]:
        if len(requests) == 1:

            def render(index: int, event, details: dict | None):
                if details is None:
                    return {**head(), "choices": [choice(0, event.token.text, "")]}
                usage = usage_json(details["input_length"], details["generated_tokens"])
                return {
                    **head(),
                    "choices": [choice(0, event.token.text, details["finish_reason"])],
                    "usage": usage,
                }

            return await stream_generate(
                request, state, requests[0], start_time, render, openai_error_event, DONE
            )
        return await _stream_many(request, state, requests, start_time, head, choice)

    results = await asyncio.gather(*(generate_json(state, r, start_time) for r in requests))
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, (answer, _, input_length) in enumerate(results):
        d = answer["details"]
        prompt_tokens += input_length
        completion_tokens += d["generated_tokens"]
        choices.append(
            choice(index, answer["generated_text"], chat_finish_reason(d["finish_reason"]))
        )
    return json_response(
        {**head(), "choices": choices, "usage": usage_json(prompt_tokens, completion_tokens)}
    )


async def completions(request: web.Request) -> web.StreamResponse:
    return await completions_body(request, await read_json(request))


async def _stream_many(
    request, state: AppState, requests, start_time, head, choice
) -> web.StreamResponse:
    """Several prompts streamed into one SSE response, events interleaved as they come."""
    streams = []
    try:
        for r in requests:  # validate and queue them all before the first byte
            cm = state.infer.stream(r)
            streams.append((cm, await cm.__aenter__()))
        sse = await SseStream.open(
            request, {"x-compute-type": state.compute_type}, state.keep_alive_s
        )
        out: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream) -> None:
            try:
                async for event in stream:
                    if isinstance(event, EndEvent):
                        g = event.generated_text
                        state.infer.record_success(
                            start_time, event.queued, event.start, g.generated_tokens
                        )
                        await out.put(
                            {
                                **head(),
                                "choices": [choice(index, event.token.text, g.finish_reason)],
                                "usage": usage_json(stream.input_length, g.generated_tokens),
                            }
                        )
                    elif isinstance(event, TokenEvent):
                        await out.put({**head(), "choices": [choice(index, event.token.text, "")]})
            except InferError as err:
                await out.put(openai_error_event(err))

        tasks = [asyncio.create_task(pump(i, s)) for i, (_, s) in enumerate(streams)]
        waiter = asyncio.gather(*tasks)
        waiter.add_done_callback(lambda _: out.put_nowait(None))
        try:
            while (item := await out.get()) is not None:
                await sse.send(item)
            await sse.send(DONE)
        finally:
            await sse.close()
        return sse.resp
    finally:
        for cm, _ in reversed(streams):
            await cm.__aexit__(None, None, None)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
