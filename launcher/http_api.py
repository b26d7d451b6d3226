"""TGI's HTTP API on aiohttp (``router/src/server.rs``): native routes here, OpenAI routes in
``openai_api``. Errors are ``{"error", "error_type"}`` with 422/424/429/500 as TGI maps them.

Deliberate difference: errors known before the first byte of a stream (validation, overload) are
answered with their HTTP status instead of TGI's ``200`` + SSE error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .access import add_cors, auth_middleware
from .entities import EndEvent, PrefillEvent, TokenEvent
from .errors import IncompleteGenerationStreamError, InferError, ValidationError
from .infer import Infer
from .json_body import parse_json
from .metrics import Metrics
from .schemas import CompatGenerateRequest, GenerateRequest, details_json, stream_event_json
from .sse import KEEP_ALIVE_S, SseStream, dumps
from .tokenizer import Tokenizer
from .validation import INLINE_TOKENIZE_CHARS
from .wire import parse

log = logging.getLogger(__name__)

STATE = web.AppKey("state", object)


@dataclass
class AppState:
    infer: Infer
    tokenizer: Tokenizer
    metrics: Metrics
    info: dict[str, Any]  # the /info body
    compute_type: str = "cpu"
    keep_alive_s: float = KEEP_ALIVE_S  # SSE keep-alive comment interval

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


@dataclass
class Restart:
    """Returned by a ``render`` to replace the running request with ``request`` (rendered by
    ``render``) in the same SSE response: TGI's chat stream does this when the model picks
    ``no_tool``."""

    request: GenerateRequest
    render: Callable


async def _pump(stream, sse: SseStream, state: AppState, start_time: float, render):
    """Send one request's events; a ``Restart`` when ``render`` asks for one."""
    index = 0
    async for event in stream:
        index += 1
        if isinstance(event, PrefillEvent):
            continue
        details = None
        if isinstance(event, EndEvent):
            g = event.generated_text
            state.infer.record_success(start_time, event.queued, event.start, g.generated_tokens)
            details = {
                "finish_reason": g.finish_reason,
                "generated_tokens": g.generated_tokens,
                "seed": g.seed,
                "input_length": stream.input_length,
            }
        data = render(index, event, details)
        if isinstance(data, Restart):
            return data
        for item in data if isinstance(data, list) else [data] if data is not None else []:
            await sse.send(item)
    if not stream.finished:
        state.metrics.inc("tgi_request_failure", err="incomplete")
        raise IncompleteGenerationStreamError()
    return None


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
    ``data:`` lines (a dict, a list of dicts, None, or a ``Restart``). Validation/overload errors
    raise before streaming; later errors become one ``error_event(err)`` line. ``done`` ends the
    stream. Keep-alive comments go out while no event does (``sse``)."""
    p = req.parameters
    if (p.best_of or 1) != 1:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if p.decoder_input_details:
        raise ValidationError(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    sse: SseStream | None = None
    try:
        async with state.infer.stream(req) as stream:
            sse = await SseStream.open(request, base_headers(state, req), state.keep_alive_s)
            try:
                restart = await _pump(stream, sse, state, start_time, render)
            except InferError as err:
                restart = None
                await sse.send(error_event(err))
        while restart is not None:
            try:
                async with state.infer.stream(restart.request) as stream:
                    restart = await _pump(stream, sse, state, start_time, restart.render)
            except InferError as err:
                await sse.send(error_event(err))
                break
        if done is not None:
            await sse.send(done)
    except ConnectionError:  # the client went away; leaving `stream` cancelled the request
        if sse is None:
            raise
    finally:
        if sse is not None:
            await sse.close()
    return sse.resp


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


def json_response(body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, headers=headers, dumps=lambda o: dumps(o).decode())


async def generate(request: web.Request) -> web.Response:
    state = state_of(request)
    start_time = time.monotonic()
    state.metrics.inc("tgi_request_count")
    req = parse(GenerateRequest, await read_json(request))
    body, headers, _ = await generate_json(state, req, start_time)
    return json_response(body, headers)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    start_time = time.monotonic()
    state.metrics.inc("tgi_request_count")
    req = parse(GenerateRequest, await read_json(request))
    return await stream_generate(
        request, state, req, start_time, native_render(req, req.parameters.details)
    )


async def compat_generate_body(request: web.Request, body: Any) -> web.StreamResponse:
    """``POST /``: ``{inputs, parameters, stream}``; the non-stream answer is a one-item list."""
    state = state_of(request)
    start_time = time.monotonic()
    state.metrics.inc("tgi_request_count")
    req = parse(CompatGenerateRequest, body)
    if req.parameters.return_full_text is None:
        req.parameters.return_full_text = False
    if req.stream:
        return await stream_generate(
            request, state, req, start_time, native_render(req, req.parameters.details)
        )
    answer, headers, _ = await generate_json(state, req, start_time)
    return json_response([answer], headers)


async def compat_generate(request: web.Request) -> web.StreamResponse:
    return await compat_generate_body(request, await read_json(request))


async def info(request: web.Request) -> web.Response:
    return web.json_response(state_of(request).info)


async def health(request: web.Request) -> web.Response:
    if await state_of(request).infer.health():
        return web.Response(status=200)
    return web.json_response({"error": "unhealthy", "error_type": "healthcheck"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    state = state_of(request)
    return web.Response(text=state.metrics.render(), content_type="text/plain", charset="utf-8")


async def tokenize_text(state: AppState, text: str, add_special_tokens: bool) -> list[dict]:
    if len(text) <= INLINE_TOKENIZE_CHARS:
        return state.tokenizer.tokenize(text, add_special_tokens)
    # a long text: off the event loop, with the GIL released
    return await asyncio.to_thread(state.tokenizer.tokenize, text, add_special_tokens, True)


async def tokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    req = parse(GenerateRequest, await read_json(request))
    return json_response(await tokenize_text(state, req.inputs, req.add_special_tokens))


def build_app(
    state: AppState,
    payload_limit: int = 2_000_000,
    api_key: str | None = None,
    cors_allow_origin: tuple[str, ...] = (),
    tracer: Any = None,
) -> web.Application:
    from . import completions, docs, openai_api, sagemaker
    from .tracing import tracing_middleware

    middlewares = [error_middleware]
    if tracer is not None:
        middlewares.insert(0, tracing_middleware(tracer))
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
    sagemaker.add_routes(app)
    docs.add_routes(app)
    return app
