"""The interceptor maps handler exceptions to gRPC status; only fatal errors stop the server."""

from __future__ import annotations

import asyncio
import tempfile
import uuid

import grpc
import pytest
import torch

from tgi_npu_backend.errors import BatchNotFoundError, FatalError, InvalidRequestError
from tgi_npu_backend.interceptor import ExceptionInterceptor
from tgi_npu_backend.pb import generate_pb2 as pb
from tgi_npu_backend.pb import generate_pb2_grpc as pb_grpc
from tgi_npu_backend.server import TextGenerationService


class RaisingGenerator:
    """Raises whatever the test put in ``error`` from every call."""

    error: BaseException | None = None

    def clear(self, batch_id):
        if self.error is not None:
            raise self.error

    def health(self):
        raise ZeroDivisionError("not a RuntimeError: INTERNAL, no shutdown")


@pytest.mark.parametrize(
    "error, code, fatal",
    [
        (InvalidRequestError("request 3: bad"), grpc.StatusCode.INVALID_ARGUMENT, False),
        (BatchNotFoundError("batch 9 is not cached"), grpc.StatusCode.NOT_FOUND, False),
        (NotImplementedError("later"), grpc.StatusCode.UNIMPLEMENTED, False),
        (RuntimeError("shape mismatch in a kernel"), grpc.StatusCode.INTERNAL, False),
        (FatalError("device lost"), grpc.StatusCode.INTERNAL, True),
        (torch.OutOfMemoryError("out of memory"), grpc.StatusCode.INTERNAL, True),
    ],
)
def test_exceptions_map_to_status(error, code, fatal):
    async def scenario():
        stopped = asyncio.Event()
        server = grpc.aio.server(interceptors=[ExceptionInterceptor(on_fatal=stopped.set)])
        gen = RaisingGenerator()
        pb_grpc.add_TextGenerationServiceServicer_to_server(TextGenerationService(gen, ["unix://x-0"]), server)
        path = f"{tempfile.gettempdir()}/tgi-icpt-{uuid.uuid4().hex[:8]}"
        server.add_insecure_port(f"unix://{path}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
                stub = pb_grpc.TextGenerationServiceStub(channel)
                gen.error = error
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ClearCache(pb.ClearCacheRequest(id=1))
                assert info.value.code() == code
                assert str(error).strip("'") in info.value.details()
                assert stopped.is_set() == fatal
                if not fatal:  # still serving
                    gen.error = None
                    await stub.ClearCache(pb.ClearCacheRequest())
                    resp = await stub.ServiceDiscovery(pb.ServiceDiscoveryRequest())
                    assert list(resp.urls) == ["unix://x-0"]
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Health(pb.HealthRequest())
                    assert info.value.code() == grpc.StatusCode.INTERNAL and not stopped.is_set()
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_tracing_spans_follow_the_callers_context():
    """--otlp-endpoint: one SERVER span per RPC, child of the router's propagated trace, with the
    RPC's outcome as its status."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tgi_npu_backend.tracing import TracingInterceptor, make_tracer_provider

    exporter = InMemorySpanExporter()
    provider = make_tracer_provider("tgi-test", exporter, rank=3)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    async def scenario():
        server = grpc.aio.server(interceptors=[TracingInterceptor(provider), ExceptionInterceptor(lambda: None)])
        gen = RaisingGenerator()
        pb_grpc.add_TextGenerationServiceServicer_to_server(TextGenerationService(gen, ["unix://x-0"]), server)
        path = f"{tempfile.gettempdir()}/tgi-trace-{uuid.uuid4().hex[:8]}"
        server.add_insecure_port(f"unix://{path}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
                stub = pb_grpc.TextGenerationServiceStub(channel)
                meta = (("traceparent", f"00-{trace_id}-{parent_id}-01"),)
                await stub.ServiceDiscovery(pb.ServiceDiscoveryRequest(), metadata=meta)
                gen.error = InvalidRequestError("request 5: bad")
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ClearCache(pb.ClearCacheRequest(id=1))
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    provider.force_flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert len(spans) == len(exporter.get_finished_spans()) == 2
    ok = spans["generate.v3.TextGenerationService/ServiceDiscovery"]
    assert f"{ok.context.trace_id:032x}" == trace_id and f"{ok.parent.span_id:016x}" == parent_id
    assert ok.status.is_ok and ok.attributes["rpc.method"] == "ServiceDiscovery"
    assert ok.resource.attributes["service.name"] == "tgi-test"
    assert ok.resource.attributes["service.instance.id"] == "rank-3"
    failed = spans["generate.v3.TextGenerationService/ClearCache"]
    assert not failed.status.is_ok and failed.parent is None
