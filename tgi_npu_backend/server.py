"""The gRPC servicer (protobuf in, protobuf out through ``wire``: each RPC delegates to the
Generator in plain values) and the serve loop on ``unix://{uds_path}-{rank}``.

Generator calls run on one worker thread, in arrival order (the router sends Prefill/Decode
strictly one after another), so the event loop stays free for Health and signals. The model is
loaded on that same thread: torch's OpenMP runtime (libgomp) keeps a team of worker threads for
every thread that runs a parallel op, and two teams are more of its threads than a small host's
cores. Loading on the main thread and stepping on the worker made a bloom-560m batch-1 decode
step ~1.45x slower on 2 cores (the README's Performance section). On an NPU the current device is
per thread too: the thread that binds it (``Platform.set_device``, in ``build_generator``) is
the one that runs the steps. That thread stays in ``torch.inference_mode`` for its whole life
(entered once, not per step).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_reflection.v1alpha import reflection
from loguru import logger

from tgi_npu_backend.pb import generate_pb2 as pb
from tgi_npu_backend.pb import generate_pb2_grpc as pb_grpc

from . import wire
from .config import ServerConfig
from .distributed import abort_process
from .generator import Generator
from .interceptor import ExceptionInterceptor

_THREAD = threading.local()


def _stay_in_inference_mode() -> None:
    """The generator thread's initializer: ``torch.inference_mode`` for the thread's life.

    NOTE: entering it per forward pass costs tens of microseconds of host time per decode step
    (a dozen Python calls in torch's context-manager code, run right after a forward pass has
    evicted them from the CPU caches; benchmarks/bench_host.py); ``ModelRunner.forward`` enters
    it only where it is off. Every tensor this thread makes is an inference tensor, and no
    tensor leaves the thread."""
    mode = torch.inference_mode()
    mode.__enter__()
    _THREAD.inference_mode = mode  # the mode holds while the object lives


def torch_thread() -> ThreadPoolExecutor:
    """The single thread that loads the model and then runs every Generator call."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="generator", initializer=_stay_in_inference_mode
    )


class TextGenerationService(pb_grpc.TextGenerationServiceServicer):
    def __init__(self, generator: Generator, server_urls: list[str],
                 worker: ThreadPoolExecutor | None = None):
        self.generator = generator
        self.server_urls = server_urls
        # the thread that loaded the model (serve): every torch op runs on it
        self._worker = worker or torch_thread()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def Info(self, request, context):
        return wire.info_pb(self.generator.info())

    async def Health(self, request, context):
        await self._run(self.generator.health)
        return pb.HealthResponse()

    async def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(urls=self.server_urls)  # every rank, rank 0 included

    async def ClearCache(self, request, context):
        await self._run(self.generator.clear, request.id if request.HasField("id") else None)
        return pb.ClearCacheResponse()

    async def FilterBatch(self, request, context):
        batch = await self._run(self.generator.filter, request.batch_id, list(request.request_ids))
        return pb.FilterBatchResponse(batch=wire.cached_batch_pb(batch))

    async def Warmup(self, request, context):
        max_input = request.max_input_tokens if request.HasField("max_input_tokens") else None
        max_total = request.max_total_tokens if request.HasField("max_total_tokens") else None
        supported, max_input, max_total = await self._run(
            self.generator.warmup, wire.batch_requests(request.batch), max_input,
            request.max_prefill_tokens, max_total,
        )
        return pb.WarmupResponse(
            max_supported_total_tokens=supported, max_input_tokens=max_input, max_total_tokens=max_total
        )

    async def Prefill(self, request, context):
        cached = request.cached_batch.id if request.HasField("cached_batch") else None
        out = await self._run(
            self.generator.prefill, request.batch.id, wire.batch_requests(request.batch), cached
        )
        return wire.step_pb(out, pb.PrefillResponse)

    async def Decode(self, request, context):
        out = await self._run(self.generator.decode, [b.id for b in request.batches])
        return wire.step_pb(out, pb.DecodeResponse)


async def serve_async(config: ServerConfig, generator: Generator, worker: ThreadPoolExecutor) -> bool:
    """Serve until SIGINT/SIGTERM (returns False) or a fatal error (returns True)."""
    stop = asyncio.Event()
    fatal = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def on_fatal() -> None:
        fatal.set()
        stop.set()

    interceptors = [ExceptionInterceptor(on_fatal=on_fatal)]
    provider = None
    if config.otlp_endpoint:
        from .tracing import TracingInterceptor, otlp_tracer_provider

        provider = otlp_tracer_provider(config.otlp_endpoint, config.otlp_service_name, config.rank)
        interceptors.insert(0, TracingInterceptor(provider))  # outermost: spans see the status
        logger.info(f"exporting traces to {config.otlp_endpoint} as {config.otlp_service_name}")
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.max_send_message_length", 2**31 - 1),
        ],
    )
    pb_grpc.add_TextGenerationServiceServicer_to_server(
        TextGenerationService(generator, config.server_urls, worker), server
    )
    names = (pb.DESCRIPTOR.services_by_name["TextGenerationService"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if os.path.exists(config.socket_path):
        os.unlink(config.socket_path)  # a stale socket from an earlier run
    # The socket is the shard's whole API (ClearCache included): owner-only whatever the umask.
    # gRPC binds (and creates the file) in add_insecure_port, so the umask covers its creation.
    umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix://{config.socket_path}")  # the launcher's readiness signal
    finally:
        os.umask(umask)
    os.chmod(config.socket_path, 0o600)
    await server.start()
    logger.info(f"Server started at unix://{config.socket_path}")
    await stop.wait()
    generator.parallel.shutdown()  # peers are going down too: stop watching them
    logger.info("Fatal error: shutting down" if fatal.is_set() else "Signal received. Shutting down")
    await server.stop(grace=0 if fatal.is_set() else 5)
    if os.path.exists(config.socket_path):
        os.unlink(config.socket_path)
    if provider is not None:
        provider.shutdown()  # flush the last spans
    return fatal.is_set()


def serve(config: ServerConfig) -> None:
    from .host_malloc import one_arena
    from .load import build_generator

    one_arena()  # before the generator thread exists (see host_malloc)
    worker = torch_thread()
    try:
        # the model is loaded before any socket exists, on the thread that will run it
        generator = worker.submit(build_generator, config).result()
    except KeyboardInterrupt:
        # the loading thread cannot be interrupted, and interpreter shutdown would join it
        abort_process(f"rank {config.rank}: interrupted while loading the model")
    if asyncio.run(serve_async(config, generator, worker)):
        # A fatal error (device OOM, a tensor-parallel peer gone): exit non-zero at once, without
        # joining the generator thread, which may still be blocked in a collective.
        abort_process(f"rank {config.rank}: stopped after a fatal error (logged above)")
