"""``/v1/completions`` as TGI serves it: one or several prompts (<= --max-client-batch-size),
OpenAI ``text_completion`` objects, streaming ending with ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from .entities import EndEvent, TokenEvent, chat_finish_reason
from .errors import InferError, ValidationError
from .http_api import (
    AppState,
    dumps,
    generate_json,
    read_json,
    send_sse,
    start_sse,
    state_of,
    stream_generate,
)
from .openai_api import (
    DONE,
    adapter_id_for,
    fingerprint,
    openai_error_event,
    sampling_params,
    usage_json,
)
from .schemas import Fields, GenerateParameters, GenerateRequest


def completion_requests(
    state: AppState, body: Any, max_client_batch_size: int
) -> tuple[list[GenerateRequest], dict]:
    f = Fields(body, "")
    if "prompt" not in body:
        raise ValidationError(
            "Failed to deserialize the JSON body into the target type: missing field `prompt`"
        )
    prompts = f.get("prompt", "str_list")
    if body.get("suffix") is not None:
        raise ValidationError(
            "Suffix is not supported and can be achieved by preprocessing the prompt."
        )
    if len(prompts) > max_client_batch_size:
        raise ValidationError(
            f"Number of prompts exceeds the maximum allowed batch size of {max_client_batch_size}"
        )
    do_sample, temperature = sampling_params(f)
    stream = bool(f.get("stream", "bool", False))
    model = f.get("model", "str")
    requests = [
        GenerateRequest(
            inputs=prompt,
            add_special_tokens=True,
            parameters=GenerateParameters(
                temperature=temperature,
                repetition_penalty=f.get("repetition_penalty", "f32"),
                frequency_penalty=f.get("frequency_penalty", "f32"),
                top_p=f.get("top_p", "f32"),
                do_sample=do_sample,
                max_new_tokens=f.get("max_tokens", "u32"),
                stop=f.get("stop", "str_list", []),
                details=True,
                seed=f.get("seed", "u64"),
                adapter_id=adapter_id_for(model),
            ),
        )
        for prompt in prompts
    ]
    return requests, {"stream": stream}


async def completions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    start_time = time.monotonic()
    state.metrics.inc("tgi_request_count")
    requests, extra = completion_requests(
        state, await read_json(request), state.info["max_client_batch_size"]
    )
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
    for index, (body, _, input_length) in enumerate(results):
        d = body["details"]
        prompt_tokens += input_length
        completion_tokens += d["generated_tokens"]
        choices.append(
            choice(index, body["generated_text"], chat_finish_reason(d["finish_reason"]))
        )
    return web.json_response(
        {**head(), "choices": choices, "usage": usage_json(prompt_tokens, completion_tokens)},
        dumps=lambda o: dumps(o).decode(),
    )


async def _stream_many(
    request, state: AppState, requests, start_time, head, choice
) -> web.StreamResponse:
    """Several prompts streamed into one SSE response, events interleaved as they come."""
    streams = []
    try:
        for r in requests:  # validate and queue them all before the first byte
            cm = state.infer.stream(r)
            streams.append((cm, await cm.__aenter__()))
        resp = await start_sse(request, {"x-compute-type": state.compute_type})
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
        while (item := await out.get()) is not None:
            await send_sse(resp, item)
        await send_sse(resp, DONE)
        return resp
    finally:
        for cm, _ in reversed(streams):
            await cm.__aexit__(None, None, None)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
