"""OpenTelemetry tracing for ``--otlp-endpoint``: one server span per RPC, exported over OTLP/gRPC.

The v3 router injects its trace context into the gRPC metadata (W3C ``traceparent``), so each
shard span becomes a child of the router's request span, as with TGI's own server.
"""

from __future__ import annotations

import grpc
from opentelemetry import propagate
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

EXPORT_TIMEOUT_S = 5  # an unreachable collector must not hold up shutdown for long


def make_tracer_provider(service_name: str, exporter: SpanExporter, rank: int = 0) -> TracerProvider:
    resource = Resource.create({"service.name": service_name, "service.instance.id": f"rank-{rank}"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def otlp_tracer_provider(endpoint: str, service_name: str, rank: int = 0) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=EXPORT_TIMEOUT_S)
    return make_tracer_provider(service_name, exporter, rank)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span around every unary RPC, parented by the caller's propagated context."""

    def __init__(self, provider: TracerProvider):
        self.tracer = provider.get_tracer("tgi_npu_backend")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        full = handler_call_details.method  # /generate.v3.TextGenerationService/Prefill
        service, _, method = full.lstrip("/").rpartition("/")
        carrier = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}

        async def traced(request, context):
            parent = propagate.extract(carrier)
            with self.tracer.start_as_current_span(
                full.lstrip("/"),
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
                record_exception=True,
                set_status_on_exception=True,
            ) as span:
                response = await inner(request, context)
                span.set_status(Status(StatusCode.OK))
                return response

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
