"""Router-side tracing, as TGI's router does it with ``--otlp-endpoint``: one span per HTTP
request (a child of the caller's W3C ``traceparent`` header when it sends one), one span per
Prefill / Decode / FilterBatch / ClearCache the batching task sends (a Prefill span links to its
requests' spans), and the current span's
``traceparent`` in the gRPC metadata of every shard call, so each shard's RPC span (the shard's
``TracingInterceptor``) is a child of the router's.

Without ``--otlp-endpoint`` the tracer is OpenTelemetry's no-op one: no span is recorded and no
``traceparent`` is sent.
"""

from __future__ import annotations

from typing import Any

import grpc
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

TRACER = web.AppKey("tracer", object)
# TGI's handler names (``#[instrument]`` on the axum handlers), by route.
SPAN_NAMES = {
    ("POST", "/"): "compat_generate",
    ("POST", "/generate"): "generate",
    ("POST", "/generate_stream"): "generate_stream",
    ("POST", "/v1/chat/completions"): "chat_completions",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/invocations"): "sagemaker_compatibility",
    ("POST", "/tokenize"): "tokenize",
    ("POST", "/chat_tokenize"): "get_chat_tokenize",
}
TRACED_CALLS = ("prefill", "decode", "filter_batch", "clear_cache")


def router_tracer(
    otlp_endpoint: str | None, service_name: str, provider: Any = None
) -> tuple[trace.Tracer, Any]:
    """(tracer, the provider this call created or None). The tracer exports to
    ``otlp_endpoint``, or through ``provider`` (tests); it is the no-op tracer without either.
    A created provider must be shut down at exit (it flushes the last spans)."""
    created = None
    if provider is None and otlp_endpoint:
        from tgi_npu_backend.tracing import otlp_tracer_provider

        provider = created = otlp_tracer_provider(otlp_endpoint, service_name)
    if provider is None:
        return trace.NoOpTracer(), None
    return provider.get_tracer("tgi_npu_backend.launcher"), created


def tracing_middleware(tracer: trace.Tracer):
    @web.middleware
    async def middleware(request: web.Request, handler):
        name = SPAN_NAMES.get((request.method, request.path))
        if name is None or isinstance(tracer, trace.NoOpTracer):
            return await handler(request)
        parent = propagate.extract(dict(request.headers))
        with tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.method": request.method, "http.route": request.path},
        ) as span:
            response = await handler(request)
            span.set_attribute("http.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return middleware


class SpanLinks:
    """Request id -> the span context of the HTTP request it came from, while it is queued or
    running: a Prefill span links to the request spans of its batch (TGI's batch spans
    ``follows_from`` them)."""

    def __init__(self) -> None:
        self._contexts: dict[int, trace.SpanContext] = {}

    def add(self, request_id: int) -> None:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            self._contexts[request_id] = context

    def discard(self, request_id: int) -> None:
        self._contexts.pop(request_id, None)

    def links(self, request_ids) -> list[trace.Link]:
        return [trace.Link(self._contexts[i]) for i in request_ids if i in self._contexts]


class TracedClient:
    """The sharded client with a CLIENT span around each batch RPC (``prefill``, ``decode``,
    ...), attributes ``batch.id`` / ``batch.size`` where known; a Prefill span links to its
    requests' spans. Everything else passes through."""

    def __init__(self, client: Any, tracer: trace.Tracer, links: SpanLinks | None = None) -> None:
        self._client = client
        self._tracer = tracer
        self.span_links = links or SpanLinks()

    def __getattr__(self, name: str) -> Any:
        inner = getattr(self._client, name)
        if name not in TRACED_CALLS or isinstance(self._tracer, trace.NoOpTracer):
            return inner

        async def traced(*args, **kwargs):
            batch = args[0] if args else None
            attributes, links = {}, []
            if hasattr(batch, "id") and hasattr(batch, "requests"):
                attributes = {"batch.id": batch.id, "batch.size": len(batch.requests)}
                links = self.span_links.links(r.id for r in batch.requests)
            elif isinstance(batch, list):
                attributes = {"batch.count": len(batch)}
            # NOTE: batch spans are roots (TGI: ``parent: None``): a batch serves many requests.
            with self._tracer.start_as_current_span(
                name,
                context=otel_context.Context(),
                kind=SpanKind.CLIENT,
                attributes=attributes,
                links=links,
            ):
                return await inner(*args, **kwargs)

        return traced


class TraceContextInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the current span's W3C ``traceparent`` to each shard call's gRPC metadata."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if carrier:
            metadata = list(client_call_details.metadata or ()) + list(carrier.items())
            client_call_details = client_call_details._replace(metadata=metadata)
        return await continuation(client_call_details, request)


def interceptors() -> list[grpc.aio.ClientInterceptor]:
    return [TraceContextInterceptor()]
