"""grpc.aio clients for the v3 shards (TGI ``backends/v3/src/client``).

``ShardClient`` talks to one shard; ``ShardedClient`` fans every call out to all shards
concurrently and merges the answers as the Rust ``ShardedClient`` does: generations are
concatenated, the next batch and Info/Health/FilterBatch come from the last shard, timings
from the slowest shard, Warmup is the minimum answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from tgi_npu_backend.pb import generate_pb2 as pb
from tgi_npu_backend.pb import generate_pb2_grpc as pb_grpc

from .errors import ClientError
from .protocol import U64_MAX, chooser_pb, make_request
from .tracing import interceptors  # the current span's traceparent in each call's metadata

# NOTE: the Rust router keeps tonic's 4 MiB decode limit; we accept larger Prefill answers
# (prefill logprobs + top-n of big batches) rather than fail them.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 2**31 - 1),
]


@dataclass(frozen=True)
class Timings:
    forward_ns: int
    decode_ns: int
    total_ns: int
    concat_ns: int | None


@dataclass
class StepResult:
    generations: list[pb.Generation]
    batch: pb.CachedBatch | None
    timings: Timings


WarmupAnswer = tuple[int | None, int, int]  # (max_supported_total_tokens, max_input, max_total)


def _step(resp) -> StepResult:
    timings = Timings(
        resp.forward_ns,
        resp.decode_ns,
        resp.total_ns,
        resp.concat_ns if resp.HasField("concat_ns") else None,
    )
    return StepResult(
        list(resp.generations), resp.batch if resp.HasField("batch") else None, timings
    )


def strip_unix(url: str) -> str:
    return url.removeprefix("unix://")


class ShardClient:
    """One shard over its Unix socket."""

    def __init__(self, uds_path: str) -> None:
        self.uds_path = uds_path
        self.channel = grpc.aio.insecure_channel(
            f"unix://{uds_path}", options=CHANNEL_OPTIONS, interceptors=interceptors()
        )
        self.stub = pb_grpc.TextGenerationServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, name: str, request):
        try:
            return await getattr(self.stub, name)(request)
        except grpc.aio.AioRpcError as err:
            connection = err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            raise ClientError(err.details() or str(err.code()), connection=connection) from None

    async def service_discovery(self) -> list[str]:
        resp = await self._call("ServiceDiscovery", pb.ServiceDiscoveryRequest())
        return [strip_unix(u) for u in resp.urls]

    async def info(self) -> pb.InfoResponse:
        return await self._call("Info", pb.InfoRequest())

    async def health(self) -> pb.HealthResponse:
        return await self._call("Health", pb.HealthRequest())

    async def clear_cache(self, batch_id: int | None) -> None:
        req = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(id=batch_id)
        await self._call("ClearCache", req)

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> pb.CachedBatch | None:
        resp = await self._call(
            "FilterBatch", pb.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids)
        )
        return resp.batch if resp.HasField("batch") else None

    async def warmup(self, request: pb.WarmupRequest) -> WarmupAnswer:
        resp = await self._call("Warmup", request)
        supported = (
            resp.max_supported_total_tokens if resp.HasField("max_supported_total_tokens") else None
        )
        return supported, resp.max_input_tokens, resp.max_total_tokens

    async def prefill(self, batch: pb.Batch, cached_batch: pb.CachedBatch | None) -> StepResult:
        req = pb.PrefillRequest(batch=batch)
        if cached_batch is not None:
            req.cached_batch.CopyFrom(cached_batch)
        return _step(await self._call("Prefill", req))

    async def decode(self, batches: list[pb.CachedBatch]) -> StepResult:
        return _step(await self._call("Decode", pb.DecodeRequest(batches=batches)))


def _merge(results: list[StepResult]) -> StepResult:
    last = results[-1]
    generations: list[pb.Generation] = []
    for r in results:
        generations.extend(r.generations)
    slowest = max((r.timings for r in results), key=lambda t: t.total_ns)
    return StepResult(generations, last.batch, slowest)


def _warmup_key(answer: WarmupAnswer) -> tuple:
    supported, max_input, max_total = answer
    # Rust orders Option with None < Some(_).
    return (supported is not None, supported or 0, max_input, max_total)


class ShardedClient:
    """All shards; calls are serialised by one lock (the shards run one RPC at a time anyway,
    and the health probe's Prefill must not interleave with the batching task's calls)."""

    def __init__(self, clients: list[ShardClient]) -> None:
        if not clients:
            raise ClientError("ServiceDiscovery returned no shard URLs")
        self.clients = clients
        self.lock = asyncio.Lock()

    @classmethod
    async def connect(cls, master_uds_path: str) -> ShardedClient:
        """ServiceDiscovery on the master shard, then one client per listed URL."""
        master = ShardClient(master_uds_path)
        try:
            urls = await master.service_discovery()
        except ClientError as err:
            raise ClientError(
                f"Server does not support v3 interface ({err})", connection=True
            ) from None
        finally:
            await master.close()
        return cls([ShardClient(u) for u in urls])

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

    async def _all(self, fn):
        async with self.lock:
            return await asyncio.gather(*(fn(c) for c in self.clients))

    async def info(self) -> pb.InfoResponse:
        return (await self._all(lambda c: c.info()))[-1]

    async def health(self) -> pb.HealthResponse:
        return (await self._all(lambda c: c.health()))[-1]

    async def clear_cache(self, batch_id: int | None) -> None:
        await self._all(lambda c: c.clear_cache(batch_id))

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> pb.CachedBatch | None:
        return (await self._all(lambda c: c.filter_batch(batch_id, request_ids)))[-1]

    async def warmup(self, request: pb.WarmupRequest) -> WarmupAnswer:
        answers = await self._all(lambda c: c.warmup(request))
        return min(answers, key=_warmup_key)

    async def prefill(
        self, batch: pb.Batch, cached_batch: pb.CachedBatch | None = None
    ) -> StepResult:
        return _merge(await self._all(lambda c: c.prefill(batch, cached_batch)))

    async def decode(self, batches: list[pb.CachedBatch]) -> StepResult:
        return _merge(await self._all(lambda c: c.decode(batches)))

    async def model_health(self) -> None:
        """One-token Prefill on the reserved block 0 (``sharded_client.rs`` model_health)."""
        request = make_request(
            id=U64_MAX,
            text="liveness",
            truncate=1,
            add_special_tokens=False,
            parameters=chooser_pb(),
            max_new_tokens=1,
            blocks=[0],
            slots=[0],
        )
        batch = pb.Batch(id=U64_MAX, requests=[request], size=1, max_tokens=2, max_blocks=1)
        await self.prefill(batch, None)
        # NOTE: the Rust router leaves this batch in the shard's cache (the next probe replaces
        # it); clearing it is harmless and frees the shard's memory for it.
        await self.clear_cache(U64_MAX)
