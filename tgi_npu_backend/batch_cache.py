"""The shard's cached batches between RPCs, and the checks that keep every RPC all-or-nothing.

The router is trusted, but a bug there must not turn into silent wrong answers for other
requests. So before an RPC changes anything, it is refused (``InvalidRequestError``, gRPC
INVALID_ARGUMENT) when it would:
* Decode the same batch twice, or batches that share a request (their states would be merged);
* Prefill a batch id that is already cached (the cached batch would be dropped), or a request id
  that is still live in a cached batch (a later Decode would merge two states of one id);
* write KV slots that a live request holds, or that another request of the same Prefill writes.
Unknown batch ids in Decode/FilterBatch are ``BatchNotFoundError`` (NOT_FOUND); ClearCache of an
unknown id is a no-op, as in TGI.
"""

from __future__ import annotations

import torch

from .batch import Batch, duplicates
from .errors import BatchNotFoundError, InvalidRequestError


class BatchCache:
    def __init__(self) -> None:
        self._batches: dict[int, Batch] = {}

    def __contains__(self, batch_id: int) -> bool:
        return batch_id in self._batches

    def __len__(self) -> int:
        return len(self._batches)

    def ids(self) -> list[int]:
        return sorted(self._batches)

    def get(self, batch_id: int, rpc: str) -> Batch:
        if batch_id not in self._batches:
            raise BatchNotFoundError(f"{rpc}: batch {batch_id} is not cached on this shard")
        return self._batches[batch_id]

    def put(self, batch: Batch) -> None:
        self._batches[batch.id] = batch

    def clear(self, batch_id: int | None = None) -> None:
        if batch_id is None:
            self._batches.clear()
        else:
            self._batches.pop(batch_id, None)

    def remove(self, batch_ids: list[int]) -> None:
        for batch_id in batch_ids:
            self._batches.pop(batch_id, None)

    def for_decode(self, batch_ids: list[int]) -> list[Batch]:
        """The cached batches a Decode names, checked; they stay cached until the step succeeds."""
        if not batch_ids:
            raise InvalidRequestError("Decode needs at least one batch")
        dup = duplicates(batch_ids)
        if dup:
            raise InvalidRequestError(
                f"Decode lists batch id(s) {dup} more than once; list each cached batch once"
            )
        missing = [i for i in batch_ids if i not in self._batches]
        if missing:
            raise BatchNotFoundError(
                f"batch id(s) {missing} are not cached on this shard (cached: {self.ids()})"
            )
        return [self._batches[i] for i in batch_ids]

    def check_new(self, batch: Batch, num_slots: int, block_size: int) -> None:
        """Refuse a Prefill batch that would clash with the cached ones (see the module doc)."""
        if batch.id in self._batches:
            raise InvalidRequestError(
                f"Prefill: batch id {batch.id} is already cached on this shard; batch ids must be "
                "unique (ClearCache the old batch first)"
            )
        live = [r for b in self._batches.values() for r in b.requests if not r.finished]
        clash = sorted({r.id for r in live} & set(batch.request_ids))
        if clash:
            raise InvalidRequestError(
                f"Prefill: request id(s) {clash} are still live in a cached batch; request ids "
                "must be unique"
            )
        taken = torch.zeros(num_slots, dtype=torch.bool)  # [num_slots] held by a live request
        if live:
            taken[torch.cat([r.slot_tensor for r in live])] = True
        for r in batch.requests:
            written = r.written_slots(block_size)
            if len(written) == 0:
                continue
            hit = taken[written]
            if bool(hit.any()):
                slot = int(written[hit.nonzero()[0]])
                raise InvalidRequestError(
                    f"request {r.id}: KV slot {slot} (block {slot // block_size}) belongs to "
                    "another live request; a block may be given to one request at a time"
                )
            if len(torch.unique(written)) != len(written):
                raise InvalidRequestError(
                    f"request {r.id}: its blocks list a KV slot more than once; give each "
                    "position its own slot"
                )
            taken[written] = True
