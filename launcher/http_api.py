"""TGI's HTTP API on aiohttp (``router/src/server.rs``): native routes here, OpenAI routes in
``openai_api``. Errors are ``{"error", "error_type"}`` with 422/424/429/500 as TGI maps them.

Deliberate difference: errors known before the first byte of a stream (validation, overload) are
answered with their HTTP status instead of TGI's ``200`` + SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .access import add_cors, auth_middleware
from .entities import EndEvent, PrefillEvent, TokenEvent
from .errors import IncompleteGenerationStreamError, InferError, ValidationError
from .infer import Infer
from .json_body import parse_json
from .metrics import Metrics
from .schemas import GenerateRequest, details_json, stream_event_json
from .tokenizer import Tokenizer
from .validation import INLINE_TOKENIZE_CHARS

log = logging.getLogger(__name__)

STATE = web.AppKey("state", object)


@dataclass
class AppState:
    infer: Infer
    tokenizer: Tokenizer
    metrics: Metrics
    info: dict[str, Any]  # the /info body
    compute_type: str = "cpu"

    @property
    def model_id(self) -> str:
        return self.info["model_id"]


def state_of(request: web.Request) -> AppState:
    return request.app[STATE]  # type: ignore[return-value]


def error_response(err: InferError) -> web.Response:
    return web.json_response(err.to_json(), status=err.status)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except InferError as err:
        return error_response(err)
    except web.HTTPRequestEntityTooLarge as err:
        return web.json_response({"error": err.text, "error_type": "payload_too_large"}, status=413)
    except web.HTTPException:
        raise
    except Exception as err:  # a bug: one request gets a JSON 500, the server keeps serving
        log.exception(f"{request.method} {request.path} failed")
        return web.json_response(
            {"error": f"internal error: {type(err).__name__}: {err}", "error_type": "internal"},
            status=500,
        )


async def read_json(request: web.Request) -> Any:
    """The body, parsed as strictly as TGI's serde_json (``json_body``)."""
    return parse_json(await request.read())


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()


async def start_sse(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **headers,
        }
    )
    await resp.prepare(request)
    return resp


async def send_sse(resp: web.StreamResponse, data: Any) -> None:
    payload = data if isinstance(data, bytes) else dumps(data)
    await resp.write(b"data: " + payload + b"\n\n")


def base_headers(state: AppState, req: GenerateRequest) -> dict[str, str]:
    return {"x-compute-type": state.compute_type, "x-compute-characters": str(len(req.inputs))}


async def generate_json(
    state: AppState, req: GenerateRequest, start_time: float
) -> tuple[dict, dict[str, str], int]:
    """Run a non-streaming request: (GenerateResponse body, headers, input_length)."""
    p = req.parameters
    resp = await state.infer.generate(req)
    g = resp.generated_text
    headers = base_headers(state, req)
    headers.update(
        state.infer.record_success(start_time, resp.queued, resp.start, g.generated_tokens)
    )
    headers["x-prompt-tokens"] = str(resp.input_length)
    headers["x-generated-tokens"] = str(g.generated_tokens)
    text = (req.inputs + g.text) if p.return_full_text else g.text
    body: dict[str, Any] = {"generated_text": text}
    if p.details or p.decoder_input_details:
        body["details"] = details_json(g, resp.prefill, resp.tokens, resp.top_tokens)
    return body, headers, resp.input_length


async def stream_generate(
    request: web.Request,
    state: AppState,
    req: GenerateRequest,
    start_time: float,
    render,
    error_event=lambda err: err.to_json(),
    done: bytes | None = None,
) -> web.StreamResponse:
    """Stream ``req`` as SSE; ``render(index, event, details)`` turns an event into the JSON of
    ``data:`` lines (a dict, a list of dicts, or None). Validation/overload errors raise before
    streaming; later errors become one ``error_event(err)`` line. ``done`` ends the stream."""
    p = req.parameters
    if (p.best_of or 1) != 1:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if p.decoder_input_details:
        raise ValidationError(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    async with state.infer.stream(req) as stream:
        resp = await start_sse(request, base_headers(state, req))
        index = 0
        try:
            async for event in stream:
                index += 1
                if isinstance(event, PrefillEvent):
                    continue
                details = None
                if isinstance(event, EndEvent):
                    g = event.generated_text
                    state.infer.record_success(
                        start_time, event.queued, event.start, g.generated_tokens
                    )
                    details = {
                        "finish_reason": g.finish_reason,
                        "generated_tokens": g.generated_tokens,
                        "seed": g.seed,
                        "input_length": stream.input_length,
                    }
                data = render(index, event, details)
                for item in data if isinstance(data, list) else [data] if data is not None else []:
                    await send_sse(resp, item)
        except InferError as err:
            await send_sse(resp, error_event(err))
        except ConnectionError:  # the client went away; leaving `stream` cancels the request
            return resp
        else:
            if not stream.finished:
                state.metrics.inc("tgi_request_failure", err="incomplete")
                await send_sse(resp, error_event(IncompleteGenerationStreamError()))
        if done is not None:
            await send_sse(resp, done)
        return resp


def native_render(req: GenerateRequest, details_wanted: bool):
    def render(index: int, event: TokenEvent | EndEvent, details: dict | None):
        if isinstance(event, EndEvent):
            text = event.generated_text.text
            if req.parameters.return_full_text:
                text = req.inputs + text
            return stream_event_json(
                index, event.token, event.top_tokens, text, details if details_wanted else None
            )
        return stream_event_json(index, event.token, event.top_tokens)

    return render


async def generate(request: web.Request) -> web.Response:
    state = state_of(request)
    start_time = time.monotonic()
    state.metrics.inc("tgi_request_count")
    req = GenerateRequest.parse(await read_json(request))
    body, headers, _ = await generate_json(state, req, start_time)
    return web.json_response(body, headers=headers, dumps=lambda o: dumps(o).decode())


async def generate_stream(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    start_time = time.monotonic()
    state.metrics.inc("tgi_request_count")
    req = GenerateRequest.parse(await read_json(request))
    return await stream_generate(
        request, state, req, start_time, native_render(req, req.parameters.details)
    )


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """``POST /``: ``{inputs, parameters, stream}``; the non-stream answer is a one-item list."""
    state = state_of(request)
    start_time = time.monotonic()
    state.metrics.inc("tgi_request_count")
    req = GenerateRequest.parse(await read_json(request))
    if req.parameters.return_full_text is None:
        req.parameters.return_full_text = False
    if req.stream:
        return await stream_generate(
            request, state, req, start_time, native_render(req, req.parameters.details)
        )
    body, headers, _ = await generate_json(state, req, start_time)
    return web.json_response([body], headers=headers, dumps=lambda o: dumps(o).decode())


async def info(request: web.Request) -> web.Response:
    return web.json_response(state_of(request).info)


async def health(request: web.Request) -> web.Response:
    if await state_of(request).infer.health():
        return web.Response(status=200)
    return web.json_response({"error": "unhealthy", "error_type": "healthcheck"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    state = state_of(request)
    return web.Response(text=state.metrics.render(), content_type="text/plain", charset="utf-8")


async def tokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    req = GenerateRequest.parse(await read_json(request))
    if len(req.inputs) <= INLINE_TOKENIZE_CHARS:
        tokens = state.tokenizer.tokenize(req.inputs, req.add_special_tokens)
    else:  # a long text: off the event loop, with the GIL released
        tokens = await asyncio.to_thread(
            state.tokenizer.tokenize, req.inputs, req.add_special_tokens, True
        )
    return web.json_response(tokens, dumps=lambda o: dumps(o).decode())


def build_app(
    state: AppState,
    payload_limit: int = 2_000_000,
    api_key: str | None = None,
    cors_allow_origin: tuple[str, ...] = (),
) -> web.Application:
    from . import completions, openai_api

    middlewares = [error_middleware]
    if api_key:
        middlewares.insert(0, auth_middleware(api_key))
    app = web.Application(client_max_size=payload_limit, middlewares=middlewares)
    add_cors(app, cors_allow_origin, allow_authorization=bool(api_key))
    app[STATE] = state
    app.router.add_post("/", compat_generate)
    app.router.add_get("/", health)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_get("/info", info)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", tokenize)
    openai_api.add_routes(app)
    completions.add_routes(app)
    return app
