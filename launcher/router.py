"""Assembles the router once the shards are warm: allocator, queue, batching task, validation,
HTTP server; and takes it down again."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tgi_npu_backend.pb import generate_pb2 as pb

from .allocator import BlockAllocator
from .batch_queue import Queue
from .client import ShardedClient
from .errors import LauncherError
from .http_api import STATE, AppState, build_app
from .http_api import metrics as metrics_route
from .infer import Infer
from .metrics import Metrics
from .radix import RadixAllocator
from .scheduler import Scheduler, SchedulerConfig
from .sse import KEEP_ALIVE_S
from .tokenizer import Tokenizer
from .tracing import TracedClient, router_tracer
from .validation import ValidationLimits, Validator
from .version import VERSION
from .warmup import Limits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterSettings:
    """The launcher flags the router itself uses."""

    model_id: str
    quantize: str | None = None  # the resolved --quantize (the shards' weight scheme), for /info
    hostname: str = "127.0.0.1"
    port: int = 3000
    prometheus_port: int | None = None
    max_concurrent_requests: int = 128
    max_best_of: int = 1
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    max_batch_size: int | None = None
    validation_workers: int = 2
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000
    # seconds in-flight requests get to finish once a stop begins (--graceful-termination-timeout)
    shutdown_timeout: float = 90.0
    api_key: str | None = field(default=None, repr=False)
    cors_allow_origin: tuple[str, ...] = ()
    disable_grammar_support: bool = False
    otlp_endpoint: str | None = None  # router spans go there (the shards get the flag too)
    otlp_service_name: str = "text-generation-inference.router"
    keep_alive_s: float = KEEP_ALIVE_S  # SSE keep-alive comment interval (axum's default)


def info_json(s: RouterSettings, limits: Limits, prefill_chunking: bool = False) -> dict:
    """TGI's ``/info`` body (no dtype/device fields, as in TGI 3.x), plus whether prompts enter
    in chunks (the shard's support_chunking) and the weight quantization the shards serve."""
    return {
        "model_id": s.model_id,
        "model_sha": None,
        "model_pipeline_tag": None,
        "max_concurrent_requests": s.max_concurrent_requests,
        "max_best_of": s.max_best_of,
        "max_stop_sequences": s.max_stop_sequences,
        "max_input_tokens": limits.max_input_tokens,
        "max_total_tokens": limits.max_total_tokens,
        "validation_workers": s.validation_workers,
        "max_client_batch_size": s.max_client_batch_size,
        "router": "tgi-npu-launcher",
        "version": VERSION,
        "sha": None,
        "docker_label": None,
        "prefill_chunking": prefill_chunking,
        "quantize": s.quantize,
    }


@dataclass
class Router:
    client: ShardedClient
    scheduler: Scheduler
    infer: Infer
    queue: Queue
    allocator: BlockAllocator | RadixAllocator | None
    metrics: Metrics
    runners: list[web.AppRunner] = field(default_factory=list)
    shutdown_timeout: float = 0.0
    stopped: bool = False
    tracer_provider: Any = None  # the OTLP provider the router created, shut down at stop

    @classmethod
    async def start(
        cls,
        client: ShardedClient,
        info: pb.InfoResponse,
        limits: Limits,
        settings: RouterSettings,
        tokenizer: Tokenizer,
        tracer_provider: Any = None,
    ) -> Router:
        """``tracer_provider``: an OpenTelemetry TracerProvider for the router's spans (tests);
        by default one exporting to ``settings.otlp_endpoint``, if given."""
        metrics = Metrics(limits.max_input_tokens, limits.max_total_tokens)
        metrics.set("tgi_batch_max_total_tokens", limits.max_batch_total_tokens)
        tracer, own_provider = router_tracer(
            settings.otlp_endpoint, settings.otlp_service_name, tracer_provider
        )
        client = TracedClient(client, tracer)
        if info.support_chunking:
            log.info("chunked prefill: prompts enter in chunks under --max-batch-prefill-tokens")
        allocator = None
        if not info.requires_padding:
            window = info.window_size if info.HasField("window_size") else None
            if info.use_prefix_caching and window is None:
                # block_allocator.rs: the shard reports prefix caching => the radix allocator
                allocator = RadixAllocator(limits.max_batch_total_tokens, info.block_size)
                log.info("Using the radix block allocator (prefix caching)")
            else:
                if info.use_prefix_caching:
                    log.warning("prefix caching with a sliding window is not supported; no reuse")
                allocator = BlockAllocator(limits.max_batch_total_tokens, info.block_size, window)
        queue = Queue(
            allocator=allocator,
            block_size=info.block_size,
            speculate=info.speculate,
            metrics=metrics,
            support_chunking=info.support_chunking,
        )
        scheduler = Scheduler(
            client,
            queue,
            SchedulerConfig(
                max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
                max_batch_total_tokens=limits.max_batch_total_tokens,
                waiting_served_ratio=settings.waiting_served_ratio,
                max_waiting_tokens=settings.max_waiting_tokens,
                max_batch_size=settings.max_batch_size,
                support_chunking=info.support_chunking and not info.requires_padding,
            ),
            metrics,
        )
        validator = Validator(
            tokenizer,
            ValidationLimits(
                max_input_tokens=limits.max_input_tokens,
                max_total_tokens=limits.max_total_tokens,
                max_stop_sequences=settings.max_stop_sequences,
                max_top_n_tokens=settings.max_top_n_tokens,
                max_best_of=settings.max_best_of,
                grammar_support=not settings.disable_grammar_support,
            ),
        )
        infer = Infer(
            validator=validator,
            queue=queue,
            scheduler=scheduler,
            client=client,
            metrics=metrics,
            max_concurrent_requests=settings.max_concurrent_requests,
            allocator=allocator,
            speculate=info.speculate,
            span_links=client.span_links,
        )
        router = cls(
            client,
            scheduler,
            infer,
            queue,
            allocator,
            metrics,
            shutdown_timeout=settings.shutdown_timeout,
            tracer_provider=own_provider,
        )
        scheduler.start()
        state = AppState(
            infer=infer,
            tokenizer=tokenizer,
            metrics=metrics,
            info=info_json(settings, limits, info.support_chunking),
            compute_type=info.device_type or "cpu",
            keep_alive_s=settings.keep_alive_s,
        )
        app = build_app(
            state, settings.payload_limit, settings.api_key, settings.cors_allow_origin, tracer
        )
        await router._serve(app, settings.hostname, settings.port, settings.shutdown_timeout)
        if settings.prometheus_port is not None:
            prom = web.Application()
            prom[STATE] = state
            prom.router.add_get("/metrics", metrics_route)
            await router._serve(
                prom, settings.hostname, settings.prometheus_port, settings.shutdown_timeout
            )
        return router

    async def _serve(
        self, app: web.Application, host: str, port: int, shutdown_timeout: float
    ) -> None:
        runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, access_log=None
        )
        await runner.setup()
        self.runners.append(runner)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as err:
            raise LauncherError(
                f"cannot listen on {host}:{port} ({err}): pick another --port"
            ) from None

    @property
    def port(self) -> int:
        """The bound port of the main site (useful with port 0)."""
        server = self.runners[0].addresses[0]
        return server[1]

    async def stop(self, drain: bool = False) -> None:
        """Stop HTTP and close the shard channels. ``drain`` (SIGTERM, as TGI's router): stop
        accepting requests and let those in flight finish for up to ``shutdown_timeout``
        seconds, then cancel the rest. Otherwise fail in-flight requests at once."""
        if self.stopped:
            return
        self.stopped = True
        self.infer.closing = True
        if not drain:
            await self.scheduler.stop()
        elif self.infer.in_flight:
            log.info(
                f"Draining {self.infer.in_flight} in-flight request(s) for up to "
                f"{self.shutdown_timeout:g}s"
            )
        for runner in self.runners:  # closes the listeners, then waits for running handlers
            await runner.cleanup()
        await self.scheduler.stop()
        await self.client.close()
        if self.tracer_provider is not None:  # flush the last spans (bounded export timeout)
            await asyncio.to_thread(self.tracer_provider.shutdown)
