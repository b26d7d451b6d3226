"""A batch of requests on the paged KV cache, with TGI's four verbs:
``from_pb`` (validate + tokenize), ``filter`` (keep ids, in the given order),
``concatenate`` (Decode of several batches) and ``to_pb`` (the CachedBatch the router sees).

Every request of a batch is in the same phase: a batch built by ``from_pb`` is prefilled by its
first step and decodes afterwards, and only decoding batches are ever concatenated.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tgi_npu_backend.pb import generate_pb2 as pb

from .errors import InvalidRequestError
from .prompt import text_of, tokenize_prompt
from .sampling import SamplingParams, TokenChooser
from .settings import ShardSettings, TextSettings
from .stopping import IncrementalDetokenizer, StoppingCriteria

WARMUP_EXTRA_TOKENS = 2  # warmup runs a prefill and one decode step: prompt + 2 slots
FLOAT_PARAMETERS = ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty")


@dataclass(frozen=True)
class BatchContext:
    """What ``from_pb`` needs besides the protobuf batch."""

    text: TextSettings
    settings: ShardSettings
    num_slots: int  # KV pool size in slots; 0 while warming up (no pool yet)
    max_input_tokens: int | None
    rank: int = 0
    world_size: int = 1

    @property
    def block_size(self) -> int:
        return self.settings.block_size


@dataclass
class RequestState:
    id: int
    prompt_ids: list[int]
    all_ids: list[int]  # prompt + generated so far
    cache_len: int  # leading prompt tokens whose KV the router says is already cached
    blocks: list[int]
    slots: list[int]  # slots[p] holds the KV of position p
    params: SamplingParams
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    top_n: int
    prefill_logprobs: bool
    owned: bool  # this rank returns the request's Generations (request.id % world_size == rank)
    # slots[:kv_len] as a tensor: every KV slot this request reads or writes (overlap checks)
    slot_tensor: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    prefilled: bool = False
    finished: bool = False
    generated: list[int] = field(default_factory=list)

    @property
    def input_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def kv_len(self) -> int:
        """Positions this request can ever hold: prompt + max_new_tokens - 1."""
        return self.input_length + self.stopping.max_new_tokens - 1

    def written_slots(self, block_size: int) -> Tensor:
        """The slots this request's forward passes write, from the first block it does not share
        (positions before ``cache_len`` are a reused prefix; with a whole-prompt match the router
        sends ``cache_len = prompt - 1``, which rewrites one position of a shared block with the
        same KV, so that block is left out)."""
        first = -(-self.cache_len // block_size) * block_size
        return self.slot_tensor[first:]

    def next_query(self) -> tuple[list[int], int]:
        """Tokens of the next forward pass and the position of the first of them."""
        if not self.prefilled:
            return self.prompt_ids[self.cache_len :], self.cache_len
        return self.all_ids[-1:], len(self.all_ids) - 1


def _check_kv(ctx: BatchContext, r: pb.Request, prompt_len: int, max_new: int) -> Tensor:
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


def request_parameters(r: pb.Request) -> SamplingParams:
    """The request's sampling parameters, or InvalidRequestError naming it when the shard cannot
    serve them (non-finite or impossible values, a grammar, max_new_tokens 0). The launcher's
    validation must refuse all of these first: the protocol has no per-request error, so one
    refused request fails its whole Prefill."""
    p = r.parameters
    for name in FLOAT_PARAMETERS:
        value = getattr(p, name)
        if not math.isfinite(value):
            raise InvalidRequestError(f"request {r.id}: {name}={value} is not a finite number")
    params = SamplingParams(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, typical_p=p.typical_p,
        do_sample=p.do_sample, seed=p.seed, repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty, watermark=p.watermark,
    )
    try:
        params.validate()
    except ValueError as err:
        raise InvalidRequestError(f"request {r.id}: {err}") from None
    if p.grammar:
        raise InvalidRequestError(
            f"request {r.id}: grammar-constrained generation is not supported by this shard; "
            "send no grammar (start the router with --disable-grammar-support)"
        )
    max_new = r.stopping_parameters.max_new_tokens
    if max_new < 1:
        raise InvalidRequestError(f"request {r.id}: max_new_tokens must be at least 1, got {max_new}")
    return params


def _duplicates(ids: list[int]) -> list[int]:
    return sorted(i for i, n in Counter(ids).items() if n > 1)


def _warmup_kv(requests: list[RequestState], block_size: int) -> None:
    """Warmup requests come without blocks: give them consecutive temporary ones (from 1)."""
    next_block = 1
    for r in requests:
        n = -(-(r.input_length + WARMUP_EXTRA_TOKENS) // block_size)
        r.blocks = list(range(next_block, next_block + n))
        r.slots = [b * block_size + o for b in r.blocks for o in range(block_size)]
        next_block += n


@dataclass
class Batch:
    id: int
    requests: list[RequestState]
    chooser: TokenChooser

    @classmethod
    def from_pb(cls, batch: pb.Batch, ctx: BatchContext, warmup: bool = False) -> Batch:
        if not batch.requests:
            raise InvalidRequestError(f"batch {batch.id} has no requests")
        dup = _duplicates([r.id for r in batch.requests])
        if dup and not warmup:  # warmup requests all have id 0
            raise InvalidRequestError(
                f"batch {batch.id} holds request id(s) {dup} more than once; request ids must be unique"
            )
        states = []
        for r in batch.requests:
            params = request_parameters(r)
            max_new = r.stopping_parameters.max_new_tokens
            text = text_of(r)
            ids = tokenize_prompt(ctx.text.tokenizer, r, text, ctx.max_input_tokens, warmup) if text else []
            if not ids:
                raise InvalidRequestError(f"request {r.id}: the prompt is empty; send at least one token")
            if ctx.max_input_tokens is not None and len(ids) > ctx.max_input_tokens and not warmup:
                raise InvalidRequestError(
                    f"request {r.id}: prompt has {len(ids)} tokens, more than "
                    f"--max-input-tokens={ctx.max_input_tokens}; shorten it or set truncate"
                )
            if r.cache_len >= len(ids):
                raise InvalidRequestError(
                    f"request {r.id}: cache_len={r.cache_len} must be smaller than the prompt ({len(ids)} tokens)"
                )
            slot_tensor = torch.empty(0, dtype=torch.int64)
            if not warmup:
                slot_tensor = _check_kv(ctx, r, len(ids), max_new)
            states.append(
                RequestState(
                    id=r.id,
                    prompt_ids=ids,
                    all_ids=list(ids),
                    cache_len=r.cache_len,
                    blocks=list(r.blocks),
                    slots=list(r.slots),
                    params=params,
                    stopping=StoppingCriteria(
                        eos_token_ids=set(ctx.text.eos_token_ids),
                        stop_sequences=list(r.stopping_parameters.stop_sequences),
                        max_new_tokens=max_new,
                        ignore_eos_token=r.stopping_parameters.ignore_eos_token,
                    ),
                    detokenizer=IncrementalDetokenizer(ctx.text.tokenizer, ids),
                    top_n=r.top_n_tokens,
                    prefill_logprobs=r.prefill_logprobs,
                    owned=r.id % ctx.world_size == ctx.rank,
                    slot_tensor=slot_tensor,
                )
            )
        if warmup:
            _warmup_kv(states, ctx.block_size)
        chooser = TokenChooser(
            [s.params for s in states], ctx.settings.device,
            watermark_gamma=ctx.settings.watermark_gamma, watermark_delta=ctx.settings.watermark_delta,
        )
        return cls(id=batch.id, requests=states, chooser=chooser)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    @property
    def is_prefill(self) -> bool:
        return not self.requests[0].prefilled

    def filter(self, request_ids: list[int]) -> Batch:
        """Keep ``request_ids`` in that order (the router's order)."""
        index = {r.id: i for i, r in enumerate(self.requests)}
        missing = [i for i in request_ids if i not in index]
        if missing:
            raise InvalidRequestError(f"batch {self.id} has no request(s) {missing}")
        if not request_ids:
            raise InvalidRequestError(f"FilterBatch for batch {self.id} keeps no request; use ClearCache")
        dup = _duplicates(request_ids)
        if dup:
            raise InvalidRequestError(
                f"FilterBatch for batch {self.id} lists request id(s) {dup} more than once; list each once"
            )
        keep = [index[i] for i in request_ids]
        return Batch(self.id, [self.requests[i] for i in keep], self.chooser.filter(keep))

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """Merge decoding batches in order; the first batch's id is kept (as TGI)."""
        if any(b.is_prefill for b in batches):
            raise ValueError("only batches that finished their prefill can be concatenated")
        dup = _duplicates([r.id for b in batches for r in b.requests])
        if dup:
            raise InvalidRequestError(
                f"batches {[b.id for b in batches]} share request id(s) {dup}; a request lives in one batch"
            )
        requests = [r for b in batches for r in b.requests]
        return cls(batches[0].id, requests, TokenChooser.concatenate([b.chooser for b in batches]))

    def to_pb(self, block_size: int) -> pb.CachedBatch:
        return pb.CachedBatch(
            id=self.id,
            request_ids=self.request_ids,
            size=len(self.requests),  # includes just-finished requests (router filters them)
            max_tokens=sum(len(r.blocks) for r in self.requests) * block_size,
            current_tokens=sum(len(r.next_query()[0]) for r in self.requests),
        )
