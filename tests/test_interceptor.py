"""The interceptor maps handler exceptions to gRPC status; only fatal errors stop the server."""

from __future__ import annotations

import asyncio
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
        path = f"/tmp/tgi-icpt-{uuid.uuid4().hex[:8]}"
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
