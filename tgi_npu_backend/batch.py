"""A batch of requests on the paged KV cache, with TGI's verbs: ``from_specs`` (validate +
tokenize, the shard's side of ``Batch.from_pb``), ``filter`` (keep ids, in the given order),
``concatenate`` (Decode of several batches, or a cached batch and a new one in a chunked
Prefill), ``plan_chunks`` (cut the next prompt chunks under the prefill budget) and ``cached``
(the CachedBatch the router sees).

A batch may hold requests in any phase: some still prefilling their prompt chunk by chunk, some
decoding. Each request keeps its own state (``request.py``); a forward pass runs every request's
next query (``Request.next_query``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .errors import InvalidRequestError
from .outputs import CachedBatch
from .prompt import tokenize_prompt
from .request import Request, RequestSpec, grammar_state, sampling_params
from .sampling import TokenChooser
from .settings import ShardSettings, TextSettings
from .stopping import IncrementalDetokenizer, StoppingCriteria

WARMUP_EXTRA_TOKENS = 2  # warmup runs a prefill and one decode step: prompt + 2 slots


@dataclass(frozen=True)
class BatchContext:
    """What ``from_specs`` needs besides the requests."""

    text: TextSettings
    settings: ShardSettings
    num_slots: int  # KV pool size in slots; 0 while warming up (no pool yet)
    max_input_tokens: int | None
    rank: int = 0
    world_size: int = 1

    @property
    def block_size(self) -> int:
        return self.settings.block_size


def _check_kv(ctx: BatchContext, r: RequestSpec, prompt_len: int, max_new: int) -> Tensor:
    """The router's blocks/slots must hold every position this request will write, inside the
    KV pool; returns ``slots[:prompt_len + max_new - 1]`` as a tensor."""
    need = prompt_len + max_new - 1
    slots = torch.tensor(list(r.slots), dtype=torch.int64)
    blocks = torch.tensor(list(r.blocks), dtype=torch.int64)
    num_blocks = ctx.num_slots // ctx.block_size
    if len(blocks) and int(blocks.max()) >= num_blocks:
        raise InvalidRequestError(
            f"request {r.id}: block {int(blocks.max())} is outside the KV pool of {num_blocks} blocks "
            f"(ids 0..{num_blocks - 1})"
        )
    if len(slots) < need:
        raise InvalidRequestError(
            f"request {r.id}: {len(slots)} KV slots cannot hold the prompt ({prompt_len} tokens) "
            f"plus max_new_tokens={max_new} - 1; send at least {need} slots"
        )
    if len(slots) and int(slots.max()) >= ctx.num_slots:
        raise InvalidRequestError(
            f"request {r.id}: slot {int(slots.max())} is outside the KV pool of {ctx.num_slots} slots"
        )
    pos = torch.arange(len(slots))
    block_idx = pos // ctx.block_size
    if len(blocks) < int(block_idx[-1]) + 1 if len(slots) else False:
        raise InvalidRequestError(
            f"request {r.id}: {len(blocks)} blocks cannot hold {len(slots)} slots of block size {ctx.block_size}"
        )
    expected = blocks[block_idx] * ctx.block_size + pos % ctx.block_size
    if not torch.equal(expected, slots):
        bad = int((expected != slots).nonzero()[0])
        raise InvalidRequestError(
            f"request {r.id}: slot {int(slots[bad])} at position {bad} is not in block "
            f"{int(blocks[block_idx[bad]])} (slot = block * {ctx.block_size} + offset)"
        )
    return slots[:need]


def duplicates(ids: list[int]) -> list[int]:
    """The ids listed more than once, sorted (checked on every step: the common case first)."""
    if len(set(ids)) == len(ids):
        return []
    return sorted(i for i, n in Counter(ids).items() if n > 1)


def _warmup_kv(requests: list[Request], block_size: int) -> None:
    """Warmup requests come without blocks: give them consecutive temporary ones (from 1)."""
    next_block = 1
    for r in requests:
        n = -(-(r.prompt_len + WARMUP_EXTRA_TOKENS) // block_size)
        r.blocks = list(range(next_block, next_block + n))
        r.slots = [b * block_size + o for b in r.blocks for o in range(block_size)]
        next_block += n


def _first_chunk(spec: RequestSpec, prompt_len: int, chunking: bool, warmup: bool) -> int:
    rest = prompt_len - spec.cache_len
    if spec.chunk_len is None or warmup:
        return rest
    if not chunking:
        raise InvalidRequestError(
            f"request {spec.id}: chunk_len={spec.chunk_len} but this shard runs without chunked "
            "prefill (PREFILL_CHUNKING=0); send whole prompts"
        )
    if not 0 < spec.chunk_len <= rest:
        raise InvalidRequestError(
            f"request {spec.id}: chunk_len={spec.chunk_len} must be in [1, {rest}] (the prompt's "
            f"{prompt_len} tokens minus cache_len={spec.cache_len})"
        )
    return spec.chunk_len


def make_request(spec: RequestSpec, ctx: BatchContext, warmup: bool) -> Request:
    """Validate and tokenize one request (InvalidRequestError names it)."""
    params = sampling_params(spec)
    ids = tokenize_prompt(ctx.text.tokenizer, spec, spec.text, ctx.max_input_tokens, warmup) if spec.text else []
    if not ids:
        raise InvalidRequestError(f"request {spec.id}: the prompt is empty; send at least one token")
    if ctx.max_input_tokens is not None and len(ids) > ctx.max_input_tokens and not warmup:
        raise InvalidRequestError(
            f"request {spec.id}: prompt has {len(ids)} tokens, more than "
            f"--max-input-tokens={ctx.max_input_tokens}; shorten it or set truncate"
        )
    if spec.cache_len >= len(ids):
        raise InvalidRequestError(
            f"request {spec.id}: cache_len={spec.cache_len} must be smaller than the prompt ({len(ids)} tokens)"
        )
    slot_tensor = torch.empty(0, dtype=torch.int64)
    if not warmup:
        slot_tensor = _check_kv(ctx, spec, len(ids), spec.max_new_tokens)
    return Request(
        id=spec.id,
        tokens=list(ids),
        prompt_len=len(ids),
        cache_len=spec.cache_len,
        cursor=spec.cache_len,
        chunk=_first_chunk(spec, len(ids), ctx.settings.chunking, warmup),
        blocks=list(spec.blocks),
        slots=list(spec.slots),
        params=params,
        stopping=StoppingCriteria(
            eos_token_ids=set(ctx.text.eos_token_ids),
            stop_sequences=list(spec.stop_sequences),
            max_new_tokens=spec.max_new_tokens,
            ignore_eos_token=spec.ignore_eos_token,
        ),
        detokenizer=IncrementalDetokenizer(ctx.text.tokenizer, ids),
        special_ids=ctx.text.special_ids,
        top_n=spec.top_n_tokens,
        prefill_logprobs=spec.prefill_logprobs,
        owned=spec.id % ctx.world_size == ctx.rank,
        slot_tensor=slot_tensor,
        grammar=None if warmup else grammar_state(spec, ctx.text.tokenizer, ctx.text.eos_token_ids),
    )


@dataclass
class Batch:
    id: int
    requests: list[Request]
    chooser: TokenChooser

    @classmethod
    def from_specs(
        cls, batch_id: int, specs: list[RequestSpec], ctx: BatchContext, warmup: bool = False
    ) -> Batch:
        if not specs:
            raise InvalidRequestError(f"batch {batch_id} has no requests")
        dup = duplicates([r.id for r in specs])
        if dup and not warmup:  # warmup requests all have id 0
            raise InvalidRequestError(
                f"batch {batch_id} holds request id(s) {dup} more than once; request ids must be unique"
            )
        requests = [make_request(spec, ctx, warmup) for spec in specs]
        if warmup:
            _warmup_kv(requests, ctx.block_size)
        chooser = TokenChooser(
            [r.params for r in requests], ctx.settings.device, grammars=[r.grammar for r in requests],
            watermark_gamma=ctx.settings.watermark_gamma, watermark_delta=ctx.settings.watermark_delta,
        )
        return cls(id=batch_id, requests=requests, chooser=chooser)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    @property
    def prefilling(self) -> bool:
        """Some request's prompt is not all in the KV cache yet."""
        return any(not r.prefilled for r in self.requests)

    @cached_property
    def wants_top_tokens(self) -> bool:
        """Some request asked for its top-n tokens (a batch's requests never change)."""
        return any(r.top_n > 0 for r in self.requests)

    @cached_property
    def _blocks_held(self) -> int:
        return sum(len(r.blocks) for r in self.requests)

    def filter(self, request_ids: list[int]) -> Batch:
        """Keep ``request_ids`` in that order (the router's order)."""
        index = {r.id: i for i, r in enumerate(self.requests)}
        missing = [i for i in request_ids if i not in index]
        if missing:
            raise InvalidRequestError(f"batch {self.id} has no request(s) {missing}")
        if not request_ids:
            raise InvalidRequestError(f"FilterBatch for batch {self.id} keeps no request; use ClearCache")
        dup = duplicates(request_ids)
        if dup:
            raise InvalidRequestError(
                f"FilterBatch for batch {self.id} lists request id(s) {dup} more than once; list each once"
            )
        keep = [index[i] for i in request_ids]
        return Batch(self.id, [self.requests[i] for i in keep], self.chooser.filter(keep))

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """Merge batches in order; the first batch's id is kept (as TGI)."""
        dup = duplicates([r.id for b in batches for r in b.requests])
        if dup:
            raise InvalidRequestError(
                f"batches {[b.id for b in batches]} share request id(s) {dup}; a request lives in one batch"
            )
        requests = [r for b in batches for r in b.requests]
        return cls(batches[0].id, requests, TokenChooser.concatenate([b.chooser for b in batches]))

    def plan_chunks(self, max_prefill_tokens: int) -> None:
        """Cut the next chunk of every request still prefilling, as TGI's shard does after a pass:
        a budget of ``max_prefill_tokens`` minus one token for each other request of the batch
        (each decodes one), given to the requests in batch order (the oldest first); a request
        always moves by at least one token."""
        budget = max_prefill_tokens - (len(self.requests) - 1)
        for r in self.requests:
            if r.prefilled or r.finished:
                continue
            r.chunk = max(min(r.prompt_len - r.cursor, budget), 1)
            budget -= r.chunk

    def cached(self, block_size: int) -> CachedBatch:
        return CachedBatch(
            id=self.id,
            request_ids=self.request_ids,
            size=len(self.requests),  # includes just-finished requests (router filters them)
            max_tokens=self._blocks_held * block_size,
            current_tokens=sum(r.query_len for r in self.requests),
        )
