"""The request queue and its ``next_batch`` (TGI ``backends/v3/src/queue.rs``).

Owned by the single batching task: ``next_batch`` is synchronous, so allocation never races.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace

from tgi_npu_backend.pb import generate_pb2 as pb

from .allocator import BlockAllocation, BlockAllocator
from .radix import RadixAllocator
from .entities import ValidRequest
from .errors import GenerationError, InferError, ValidationError
from .metrics import Metrics
from .protocol import request_to_pb

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Entry:
    """A queued or running request; events go to ``stream`` (an Event or an InferError)."""

    request: ValidRequest
    stream: asyncio.Queue = field(default_factory=asyncio.Queue)
    queue_time: float = field(default_factory=time.monotonic)
    id: int = -1  # set by Queue.append
    batch_time: float | None = None
    allocation: BlockAllocation | None = None
    # Set by the HTTP side when its client went away; the batching task drops the entry.
    cancelled: bool = False
    # Prompt tokens of the first pass when the prefill budget cut the prompt (chunked prefill)
    chunk_len: int | None = None

    def send(self, event: object) -> None:
        self.stream.put_nowait(event)

    def fail(self, error: InferError) -> None:
        self.stream.put_nowait(error)


@dataclass
class NextBatch:
    entries: dict[int, Entry]
    batch: pb.Batch


class Queue:
    def __init__(
        self,
        *,
        allocator: BlockAllocator | RadixAllocator | None,
        block_size: int,
        speculate: int,
        metrics: Metrics,
        support_chunking: bool = False,
    ) -> None:
        self.allocator = allocator  # None = padded model (requires_padding)
        # The shard takes prompts in chunks: the last request that does not fit the prefill
        # budget is cut to fit (queue.rs), and prompts longer than a prefill pass are admitted.
        self.support_chunking = support_chunking and allocator is not None
        self.block_size = max(block_size, 1)
        self.speculate = speculate
        self.metrics = metrics
        self.entries: deque[Entry] = deque()
        self.next_id = 0
        self.next_batch_id = 0
        self._appended = asyncio.Event()

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entry: Entry) -> None:
        entry.id = self.next_id
        self.next_id += 1
        self.entries.append(entry)
        self.metrics.set("tgi_queue_size", len(self.entries))
        self._appended.set()

    async def wait(self) -> None:
        """Return once an entry was appended since the last ``wait``."""
        await self._appended.wait()
        self._appended.clear()

    def wake(self) -> None:
        """Make the next ``wait`` return at once (entries are left to serve)."""
        self._appended.set()

    def drain(self) -> list[Entry]:
        drained = list(self.entries)
        self.entries.clear()
        self.metrics.set("tgi_queue_size", 0)
        return drained

    def free(self, entry: Entry, cache: bool = True) -> None:
        """Release the entry's blocks; ``cache=False`` when its prefill never ran (or failed), so
        a prefix-caching allocator must not keep its prompt blocks as cached KV."""
        if entry.allocation is not None and self.allocator is not None:
            self.allocator.free(entry.allocation, cache=cache)
            entry.allocation = None
            self._blocks_gauge()

    def _blocks_gauge(self) -> None:
        if self.allocator is not None:
            self.metrics.set("tgi_kv_blocks_free", self.allocator.free_blocks)
            self.metrics.set("tgi_kv_blocks_total", self.allocator.capacity)

    def next_batch(
        self,
        min_size: int | None,
        max_size: int | None,
        prefill_token_budget: int,
        token_budget: int,
    ) -> NextBatch | None:
        try:
            return self._next_batch(min_size, max_size, prefill_token_budget, token_budget)
        finally:
            self.metrics.set("tgi_queue_size", len(self.entries))
            self._blocks_gauge()

    def _next_batch(
        self, min_size, max_size, prefill_token_budget, token_budget
    ) -> NextBatch | None:
        if prefill_token_budget <= 0 or token_budget <= 0 or not self.entries:
            return None
        if min_size is not None and len(self.entries) < min_size:
            return None
        if max_size is not None and max_size == 0:
            return None
        bs = self.block_size
        prefill_token_budget = -(-prefill_token_budget // bs) * bs

        batch: list[Entry] = []
        max_input_length = prefill_tokens = decode_tokens = max_blocks = 0
        while self.entries:
            entry = self.entries.popleft()
            if entry.cancelled:  # the client went away while queued
                self.metrics.inc("tgi_request_failure", err="dropped")
                continue
            req = entry.request
            if self.allocator is None:
                # Padded shards pad every prompt to the longest one.
                max_input_length = max(max_input_length, req.input_length)
                prefill_tokens = (len(batch) + 1) * max_input_length
                decode_tokens += req.stopping.max_new_tokens
                total = prefill_tokens + decode_tokens + self.speculate
                if prefill_tokens > prefill_token_budget or total > token_budget:
                    self.entries.appendleft(entry)
                    break
            else:
                tokens = req.input_length + req.stopping.max_new_tokens + self.speculate - 1
                allocation = self.allocator.allocate(tokens, req.input_ids)
                if allocation is None:
                    self.entries.appendleft(entry)
                    break
                if allocation.prefix_len >= req.input_length:
                    # NOTE: queue.rs: the whole prompt matched; the shard must still run its last
                    # token to get the next-token logits.
                    allocation = replace(allocation, prefix_len=req.input_length - 1)
                postfix_len = req.input_length - allocation.prefix_len
                entry.chunk_len = None
                if prefill_tokens + postfix_len > prefill_token_budget:
                    chunk_len = prefill_token_budget - prefill_tokens
                    if not self.support_chunking or chunk_len <= 0:
                        self.allocator.free(allocation, cache=False)
                        self.entries.appendleft(entry)
                        break
                    # queue.rs: exactly fill the budget with the prompt's first chunk; the shard
                    # cuts the following chunks itself
                    entry.chunk_len = chunk_len
                    entry.allocation = allocation
                    max_blocks = max(max_blocks, len(allocation.blocks))
                    prefill_tokens += chunk_len
                    batch.append(entry)
                    break
                max_blocks = max(max_blocks, len(allocation.blocks))
                prefill_tokens += postfix_len
                entry.allocation = allocation
            batch.append(entry)
            if max_size is not None and len(batch) == max_size:
                break

        if not batch:
            return None
        if min_size is not None and len(batch) < min_size:
            for entry in reversed(batch):
                self.free(entry, cache=False)
                self.entries.appendleft(entry)
            return None

        now = time.monotonic()
        requests = []
        for entry in list(batch):
            entry.batch_time = now
            try:
                requests.append(
                    request_to_pb(entry.id, entry.request, entry.allocation, entry.chunk_len)
                )
            except Exception as err:  # a value validation let through: fail this request only
                log.exception(f"request {entry.id} cannot be sent to the shard")
                batch.remove(entry)
                self.free(entry, cache=False)
                self.metrics.inc("tgi_request_failure", err="validation")
                entry.fail(
                    ValidationError(f"the request cannot be sent to the shard: {err}")
                    if isinstance(err, (ValueError, TypeError))
                    else GenerationError(f"the request cannot be sent to the shard: {err!r}")
                )
        if not batch:
            if self.entries:
                self.wake()  # the batching task must come back for the others
            return None
        message = pb.Batch(
            id=self.next_batch_id,
            requests=requests,
            size=len(requests),
            max_tokens=prefill_tokens + decode_tokens,
            max_blocks=max_blocks,
        )
        self.next_batch_id += 1
        self.metrics.observe("tgi_batch_next_size", len(requests))
        return NextBatch(entries={e.id: e for e in batch}, batch=message)
