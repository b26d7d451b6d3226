"""Between HTTP and the batching task (TGI ``router/src/infer/mod.rs``): the concurrency limit,
validation, queueing, and turning a request's event stream into a response."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .allocator import BlockAllocator
from .batch_queue import Entry, Queue
from .client import ShardedClient
from .entities import (
    EndEvent,
    GeneratedText,
    PrefillEvent,
    PrefillToken,
    Token,
    TokenEvent,
    ValidRequest,
)
from .errors import (
    ClientError,
    GenerationError,
    IncompleteGenerationError,
    InferError,
    OverloadedError,
    ValidationError,
)
from .metrics import Metrics
from .radix import RadixAllocator
from .scheduler import Scheduler
from .schemas import GenerateRequest
from .tracing import SpanLinks
from .validation import Validator

log = logging.getLogger(__name__)


@dataclass
class InferResponse:
    input_length: int
    generated_text: GeneratedText
    prefill: list[PrefillToken] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[list[Token]] = field(default_factory=list)
    queued: float = 0.0
    start: float = 0.0


class RequestStream:
    """Events of one queued request; leaving ``Infer.stream`` early cancels it."""

    def __init__(self, entry: Entry, request: ValidRequest, scheduler: Scheduler) -> None:
        self.entry = entry
        self.request = request
        self.input_length = request.input_length
        self.finished = False
        self._scheduler = scheduler

    async def __aiter__(self) -> AsyncIterator[PrefillEvent | TokenEvent | EndEvent]:
        while not self.finished:
            event = await self.entry.stream.get()
            if isinstance(event, InferError):
                self.finished = True
                if isinstance(event, GenerationError):
                    self._scheduler.healthy = False
                raise event
            if isinstance(event, EndEvent):
                self.finished = True
            yield event


class Infer:
    def __init__(
        self,
        *,
        validator: Validator,
        queue: Queue,
        scheduler: Scheduler,
        client: ShardedClient,
        metrics: Metrics,
        max_concurrent_requests: int,
        allocator: BlockAllocator | RadixAllocator | None,
        speculate: int = 0,
        span_links: SpanLinks | None = None,
    ) -> None:
        self.validator = validator
        self.queue = queue
        self.scheduler = scheduler
        self.client = client
        self.metrics = metrics
        self.max_concurrent_requests = max_concurrent_requests
        self.allocator = allocator
        self.speculate = speculate
        self.span_links = span_links  # request id -> its HTTP span, for the batch spans' links
        self.in_flight = 0
        self.closing = False  # set on shutdown: new requests are refused

    @asynccontextmanager
    async def stream(self, request: GenerateRequest) -> AsyncIterator[RequestStream]:
        """Validate and queue ``request``; yields its event stream. Raises OverloadedError when
        ``--max-concurrent-requests`` are in flight, ValidationError for a bad request."""
        if self.closing:
            raise OverloadedError("the server is shutting down")
        if self.in_flight >= self.max_concurrent_requests:
            self.metrics.inc("tgi_request_failure", err="overloaded")
            raise OverloadedError()
        self.in_flight += 1
        try:
            try:
                valid = await self.validator.validate(request)
                self._check_capacity(valid)
            except ValidationError:
                self.metrics.inc("tgi_request_failure", err="validation")
                raise
            self.metrics.observe("tgi_request_input_length", valid.input_length)
            self.metrics.observe("tgi_request_max_new_tokens", valid.stopping.max_new_tokens)
            entry = Entry(request=valid)
            self.queue.append(entry)
            if self.span_links is not None:
                self.span_links.add(entry.id)
            stream = RequestStream(entry, valid, self.scheduler)
            try:
                yield stream
            finally:
                if self.span_links is not None:
                    self.span_links.discard(entry.id)
                if not stream.finished:
                    # The client went away: the batching task drops it at its next step.
                    entry.cancelled = True
        finally:
            self.in_flight -= 1

    def _check_capacity(self, valid: ValidRequest) -> None:
        if self.allocator is None:
            return
        tokens = valid.input_length + valid.stopping.max_new_tokens + self.speculate - 1
        needed = self.allocator.blocks_for(tokens)
        if needed > self.allocator.capacity:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` need {needed} KV blocks but the KV cache has "
                f"{self.allocator.capacity}: lower `max_new_tokens` or give the KV cache more memory"
            )

    async def generate(self, request: GenerateRequest) -> InferResponse:
        """Run ``request`` to its end and collect tokens (TGI ``Infer::generate``)."""
        prefill: list[PrefillToken] = []
        tokens: list[Token] = []
        top_tokens: list[list[Token]] = []
        async with self.stream(request) as stream:
            async for event in stream:
                if isinstance(event, PrefillEvent):
                    prefill = event.tokens
                    continue
                tokens.append(event.token)
                top_tokens.append(event.top_tokens)
                if isinstance(event, EndEvent):
                    return InferResponse(
                        input_length=stream.input_length,
                        generated_text=event.generated_text,
                        prefill=prefill,
                        tokens=tokens,
                        top_tokens=top_tokens,
                        queued=event.queued,
                        start=event.start,
                    )
        self.metrics.inc("tgi_request_failure", err="incomplete")
        raise IncompleteGenerationError()

    async def health(self) -> bool:
        """Health RPC while healthy; after a generation error, the model-health Prefill."""
        if self.scheduler.crashed is not None:
            return False
        try:
            if self.scheduler.healthy:
                await self.client.health()
            else:
                await self.client.model_health()
            ok = True
        except ClientError as err:
            log.error(f"health check failed: {err}")
            ok = False
        self.scheduler.healthy = ok
        return ok

    def record_success(
        self, start_time: float, queued: float, start: float, generated_tokens: int
    ) -> dict[str, str]:
        """TGI's success metrics and timing headers for a finished request."""
        now = time.monotonic()
        total = now - start_time
        validation = max(queued - start_time, 0.0)
        queue_time = max(start - queued, 0.0)
        inference = now - start
        per_token = inference / max(generated_tokens, 1)
        m = self.metrics
        m.inc("tgi_request_success")
        m.observe("tgi_request_duration", total)
        m.observe("tgi_request_validation_duration", validation)
        m.observe("tgi_request_queue_duration", queue_time)
        m.observe("tgi_request_inference_duration", inference)
        m.observe("tgi_request_mean_time_per_token_duration", per_token)
        m.observe("tgi_request_generated_tokens", generated_tokens)
        return {
            "x-compute-time": str(total),
            "x-total-time": str(int(total * 1000)),
            "x-validation-time": str(int(validation * 1000)),
            "x-queue-time": str(int(queue_time * 1000)),
            "x-inference-time": str(int(inference * 1000)),
            "x-time-per-token": str(int(per_token * 1000)),
        }
