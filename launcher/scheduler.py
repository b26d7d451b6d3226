"""The batching task (TGI ``backends/v3/src/backend.rs`` ``batching_task``).

One asyncio task drives the shards strictly sequentially: Prefill a batch from the queue, then
Decode([current, new?]) until the batch is empty, admitting new requests between steps under the
waiting-served ratio. After every step the live-entry map decides FilterBatch/ClearCache, so a
request that finished or whose client went away leaves the shard's batch and its blocks return
to the allocator.

The task survives any single request: a shard error fails the requests of that batch (each one's
424 names no other request), and an unexpected error fails the requests in flight, clears the
shard's batches and serves on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

from tgi_npu_backend.pb import generate_pb2 as pb

from .batch_queue import Entry, Queue
from .client import ShardedClient, StepResult
from .errors import ClientError, GenerationError, InferError
from .metrics import Metrics
from .protocol import generation_events

log = logging.getLogger(__name__)

# How the shard names requests in its errors ("request 7: ...", "request id(s) [3, 4] ...").
_REQUEST_IDS = re.compile(r"\brequest(?:\(s\)| id\(s\)| ids?)? \[?(\d+(?:, \d+)*)\]?")


def public_message(message: str, own_id: int) -> str:
    """A shard error as one request's client may see it: its own id becomes "this request",
    every other request's id "another request of the batch" (ids are the router's, and other
    users' requests are none of this client's business)."""

    def replace(match: re.Match) -> str:
        ids = {int(i) for i in match.group(1).split(", ")}
        return "this request" if own_id in ids else "another request of the batch"

    return _REQUEST_IDS.sub(replace, message)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    max_batch_size: int | None = None
    # The shard reported support_chunking: a new batch joins the running one in its Prefill
    # (Prefill(batch, cached_batch)), under the prefill budget left by the running batch
    support_chunking: bool = False


class Scheduler:
    def __init__(
        self, client: ShardedClient, queue: Queue, config: SchedulerConfig, metrics: Metrics
    ):
        self.client = client
        self.queue = queue
        self.config = config
        self.metrics = metrics
        self.healthy = True  # False after a generation error, until a model-health probe passes
        self._task: asyncio.Task | None = None
        self._live: list[dict[int, Entry]] = []  # entry maps of batches in flight (for shutdown)
        self.steps = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batching-task")
        self._task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("batching task crashed", exc_info=task.exception())
            self.healthy = False
            error = GenerationError(f"the batching task crashed: {task.exception()!r}")
            for entries in self._live:
                self._fail(entries, error)
            for entry in self.queue.drain():
                entry.fail(error)

    @property
    def crashed(self) -> BaseException | None:
        if self._task is None or not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    async def stop(self, reason: str = "the server is shutting down") -> None:
        """Cancel the batching task and fail every queued or running request."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # cancelled or crashed: final
        error = GenerationError(reason)
        for entries in self._live:
            self._fail(entries, error)
        for entry in self.queue.drain():
            entry.fail(error)

    async def _run(self) -> None:
        while True:
            await self.queue.wait()
            try:
                await self._serve_queue()
            except Exception as err:  # a bug must not take the server down: fail what is in flight
                log.exception(
                    "the batching task hit an unexpected error; failing the requests in flight"
                )
                self.healthy = False
                for entries in self._live:
                    self._fail(entries, GenerationError(f"unexpected router error: {err!r}"))
                self._live = []
                try:
                    await self.client.clear_cache(None)
                except Exception as clear_err:  # noqa: BLE001 (logged; keep serving)
                    log.error(f"ClearCache after the error failed: {clear_err!r}")
                self.queue.wake()  # serve whatever is still queued

    async def _serve_queue(self) -> None:
        cfg = self.config
        while (
            nb := self.queue.next_batch(
                None,
                cfg.max_batch_size,
                cfg.max_batch_prefill_tokens,
                cfg.max_batch_total_tokens,
            )
        ) is not None:
            entries = nb.entries
            self._live = [entries]
            cached = await self._prefill(nb.batch, entries)
            waiting_tokens = 1
            while cached is not None:
                batches = [cached]
                self.metrics.set("tgi_batch_current_size", cached.size)
                self.metrics.set("tgi_batch_current_max_tokens", cached.max_tokens)
                token_budget = max(cfg.max_batch_total_tokens - cached.max_tokens, 0)
                max_size = None
                if cfg.max_batch_size is not None:
                    max_size = max(cfg.max_batch_size - cached.size, 0)
                if cfg.support_chunking:
                    # backend.rs: the next batch is concatenated with the running one, whose
                    # next pass already takes current_tokens of the prefill budget; no minimum
                    # size (a prefill no longer stalls the running requests)
                    min_size = None
                    prefill_budget = max(cfg.max_batch_prefill_tokens - cached.current_tokens, 0)
                else:
                    if waiting_tokens >= cfg.max_waiting_tokens:
                        min_size = None  # waited long enough: admit even a small batch
                    else:
                        min_size = int(cached.size * cfg.waiting_served_ratio)
                    prefill_budget = cfg.max_batch_prefill_tokens
                new = self.queue.next_batch(min_size, max_size, prefill_budget, token_budget)
                if new is not None and cfg.support_chunking:
                    self.metrics.inc("tgi_batch_concat", reason="chunking")
                    entries.update(new.entries)  # one batch from here on, also if it fails
                    batches = []
                    cached = await self._prefill(new.batch, entries, cached)
                    if cached is not None:
                        batches.append(cached)
                    waiting_tokens = 1
                elif new is not None:
                    reason = "backpressure" if min_size is not None else "wait_exceeded"
                    self.metrics.inc("tgi_batch_concat", reason=reason)
                    self._live = [entries, new.entries]
                    new_cached = await self._prefill(new.batch, new.entries)
                    if new_cached is not None:
                        entries.update(new.entries)
                        batches.append(new_cached)
                    self._live = [entries]
                    waiting_tokens = 1
                if not batches:
                    break
                cached = await self._decode(batches, entries)
                waiting_tokens += 1
            self._live = []
            self.metrics.set("tgi_batch_current_size", 0)
            self.metrics.set("tgi_batch_current_max_tokens", 0)

    async def _prefill(
        self,
        batch: pb.Batch,
        entries: dict[int, Entry],
        cached: pb.CachedBatch | None = None,
    ) -> pb.CachedBatch | None:
        """Prefill ``batch``; with ``cached`` (chunking) the running batch's next tokens run in
        the same pass and the two come back as one batch."""
        ids = [batch.id] + ([cached.id] if cached is not None else [])
        return await self._step("prefill", ids, entries, lambda: self.client.prefill(batch, cached))

    async def _decode(
        self, batches: list[pb.CachedBatch], entries: dict[int, Entry]
    ) -> pb.CachedBatch | None:
        return await self._step(
            "decode", [b.id for b in batches], entries, lambda: self.client.decode(batches)
        )

    async def _step(
        self, method: str, batch_ids: list[int], entries: dict[int, Entry], call
    ) -> pb.CachedBatch | None:
        start = time.monotonic()
        self.metrics.inc("tgi_batch_inference_count", method=method)
        try:
            result: StepResult = await call()
        except ClientError as err:
            for batch_id in batch_ids:
                try:
                    await self.client.clear_cache(batch_id)
                except ClientError:
                    pass
            log.error(f"{method} failed: {err}")
            self.healthy = False
            self._fail_each(entries, str(err))
            self.metrics.inc("tgi_batch_inference_failure", method=method)
            return None
        filter_start = time.monotonic()
        self._send_generations(result, entries)
        try:
            next_batch = await self._filter(result.batch, entries)
        except ClientError as err:
            # NOTE: the Rust router panics here (unwrap); failing the batch keeps serving.
            log.error(f"FilterBatch/ClearCache after {method} failed: {err}")
            if result.batch is not None:
                try:
                    await self.client.clear_cache(result.batch.id)
                except ClientError:
                    pass
            self.healthy = False
            self._fail_each(entries, str(err))
            return None
        t = result.timings
        if t.concat_ns is not None:
            self.metrics.observe("tgi_batch_concat_duration", t.concat_ns / 1e9, method="decode")
        self.metrics.observe("tgi_batch_forward_duration", t.forward_ns / 1e9, method=method)
        self.metrics.observe("tgi_batch_decode_duration", t.decode_ns / 1e9, method=method)
        self.metrics.observe(
            "tgi_batch_filter_duration", time.monotonic() - filter_start, method=method
        )
        self.metrics.observe(
            "tgi_batch_inference_duration", time.monotonic() - start, method=method
        )
        self.metrics.inc("tgi_batch_inference_success", method=method)
        self.steps += 1
        return next_batch

    def _send_generations(self, result: StepResult, entries: dict[int, Entry]) -> None:
        for gen in result.generations:
            entry = entries.get(gen.request_id)
            if entry is None:
                log.error(f"the shard returned a generation for unknown request {gen.request_id}")
                continue
            if entry.cancelled:
                continue  # swept below
            events, finished = generation_events(
                gen, entry.queue_time, entry.batch_time or entry.queue_time
            )
            for event in events:
                entry.send(event)
            if finished:
                self._remove(entries, entry)
        for entry in [e for e in entries.values() if e.cancelled]:
            self.metrics.inc("tgi_request_failure", err="dropped")
            self._remove(entries, entry)

    def _remove(self, entries: dict[int, Entry], entry: Entry, cache: bool = True) -> None:
        entries.pop(entry.id, None)
        self.queue.free(entry, cache=cache)

    def _fail_each(self, entries: dict[int, Entry], message: str) -> None:
        """Fail every entry with a shard error, each seeing only its own request id."""
        for entry in list(entries.values()):
            self._fail({entry.id: entry}, GenerationError(public_message(message, entry.id)))
            entries.pop(entry.id, None)

    def _fail(self, entries: dict[int, Entry], error: InferError) -> None:
        for entry in list(entries.values()):
            self.metrics.inc("tgi_request_failure", err=error.error_type)
            entry.fail(error)
            self._remove(entries, entry, cache=False)  # the shard may not have written its KV

    async def _filter(
        self, batch: pb.CachedBatch | None, entries: dict[int, Entry]
    ) -> pb.CachedBatch | None:
        """FilterBatch to the live ids when the shard's batch holds others; ClearCache if none."""
        if batch is None:
            return None
        if batch.size == len(entries):
            return batch
        keep = [i for i in batch.request_ids if i in entries]
        if not keep:
            await self.client.clear_cache(batch.id)
            return None
        return await self.client.filter_batch(batch.id, keep)
