"""The shard's behaviour behind the eight RPCs, in plain values (``server.py`` converts the
protobuf at the edge). The generator orchestrates: build a batch, run a step, hand each request
its result (``request.py``); it keeps the batch cache and the KV pool.

Protocol facts this class keeps (docs/protocol.md):
* the warmup batch (all ids 0, no blocks) runs on a temporary KV cache and is not cached;
* the KV pool is sized once, by the first warmup, and persists across batches, ClearCache and
  later warmups (which run their batch and check their limits against it);
* Prefill/Decode return the batch still holding just-finished requests (the router filters);
* every RPC applies completely or changes nothing: bad ids, duplicates and clashing KV slots are
  refused before anything moves (``batch_cache``); a failed Warmup leaves pool and batches as
  they were; a Decode whose forward pass fails leaves its batches cached;
* each request's Generation is produced by exactly one rank (``request.id % world_size``);
  every rank keeps every request (the forward pass is collective) and sizes one KV pool.
"""

from __future__ import annotations

import math
import time

import torch
from loguru import logger

from .batch import Batch, BatchContext
from .batch_cache import BatchCache
from .distributed import ParallelContext
from .errors import InvalidRequestError, is_device_oom
from .kv_cache import KVCache
from .kv_sizing import size_kv_pool
from .logprobs import chosen_to_host, top_n_tokens
from .model_runner import ModelRunner
from .outputs import CachedBatch, Generation, Info, StepOutput, Tokens
from .request import Request, RequestSpec
from .settings import ShardSettings, TextSettings


def _now() -> int:
    return time.perf_counter_ns()


class Generator:
    def __init__(
        self,
        *,
        model,
        backend,
        text: TextSettings,
        settings: ShardSettings,
        parallel: ParallelContext = ParallelContext(),
    ):
        self.model = model
        self.backend = backend
        self.text = text
        self.settings = settings
        self.parallel = parallel
        self.platform = settings.platform
        self.device = settings.device
        self.block_size = settings.block_size
        self.max_input_tokens = settings.max_input_tokens  # until Warmup decides
        # Warmup's max_prefill_tokens: the budget of the prompt chunks the shard cuts itself
        # (chunked prefill); None until then, and without chunking
        self.max_prefill_tokens: int | None = None
        self.runner = ModelRunner(model, backend, self.device)
        self.kv_cache: KVCache | None = None
        self.cache = BatchCache()
        self._advancing = False  # set once a step starts changing its requests (see decode)

    # ------------------------------------------------------------------ info
    def info(self) -> Info:
        return Info(
            dtype=str(self.settings.dtype),
            device_type=self.platform.name,
            support_chunking=self.settings.chunking,
            use_prefix_caching=self.settings.prefix_caching,
            attention_impl=f"paged-{self.backend.name}",
            block_size=self.block_size,
        )

    def health(self) -> None:
        probe = torch.ones((2, 2), device=self.device)
        if float((probe @ probe).sum()) != 8.0:
            raise RuntimeError(f"device {self.device} returned a wrong result for a 2x2 matmul")

    # ------------------------------------------------------------------ batch cache
    def clear(self, batch_id: int | None) -> None:
        self.cache.clear(batch_id)

    def filter(self, batch_id: int, request_ids: list[int]) -> CachedBatch:
        batch = self.cache.get(batch_id, "FilterBatch").filter(request_ids)  # raises first
        self.cache.put(batch)
        return batch.cached(self.block_size)

    def _context(self, warmup: bool) -> BatchContext:
        return BatchContext(
            text=self.text,
            settings=self.settings,
            num_slots=0 if warmup else self.kv_cache.num_slots,
            max_input_tokens=self.max_input_tokens,
            rank=self.parallel.rank,
            world_size=self.parallel.world_size,
        )

    # ------------------------------------------------------------------ RPCs
    def prefill(
        self, batch_id: int, requests: list[RequestSpec], cached_batch_id: int | None = None
    ) -> StepOutput:
        """A new batch's first pass; with ``cached_batch_id`` (chunked prefill), that cached
        batch's next tokens run in the same pass and the two leave as one batch (its id)."""
        start = _now()
        if self.kv_cache is None:
            raise InvalidRequestError("Prefill before Warmup: the KV pool is sized by Warmup; call it first")
        if cached_batch_id is not None and not self.settings.chunking:
            raise InvalidRequestError(
                "Prefill with a cached_batch needs chunked prefill, which this shard runs without "
                "(PREFILL_CHUNKING=0); send the cached batch to Decode instead"
            )
        batch = Batch.from_specs(batch_id, requests, self._context(warmup=False))
        self.cache.check_new(batch, self.kv_cache.num_slots, self.block_size)
        if cached_batch_id is None:
            return self._step(batch, start, concat_ns=None)
        cached = self.cache.get(cached_batch_id, "Prefill")
        live = [r.id for r in cached.requests if not r.finished]
        t = _now()
        parts = [cached.filter(live), batch] if live else [batch]
        batch = Batch.concatenate(parts)
        concat_ns = _now() - t
        return self._step(batch, start, concat_ns, replaces=[cached_batch_id])

    def decode(self, batch_ids: list[int]) -> StepOutput:
        start = _now()
        batches = self.cache.for_decode(batch_ids)  # checked; still cached
        concat_ns = None
        if len(batches) > 1:
            t = _now()
            batch = Batch.concatenate(batches)
            concat_ns = _now() - t
        else:
            batch = batches[0]
        live = [r.id for r in batch.requests if not r.finished]
        if len(live) < len(batch):  # the router filters finished requests; be safe if it did not
            batch = batch.filter(live)
        return self._step(batch, start, concat_ns, replaces=batch_ids)

    def _step(
        self, batch: Batch, start: int, concat_ns: int | None, replaces: list[int] = ()
    ) -> StepOutput:
        """One step; on success the batches ``replaces`` leave the cache and the result enters.
        A failure before any request changed (the forward pass) leaves the cache as it was; a
        later one drops those batches, whose requests moved part-way (the router clears them)."""
        self._advancing = False
        try:
            generations, next_batch, forward_ns, decode_ns = self.generate_token(batch, self.kv_cache)
        except BaseException:
            if self._advancing:
                self.cache.remove(list(replaces))
            raise
        self.cache.remove(list(replaces))
        cached = None
        if next_batch is not None:
            self.cache.put(next_batch)
            cached = next_batch.cached(self.block_size)
        return StepOutput(generations, cached, forward_ns, decode_ns, _now() - start, concat_ns)

    def warmup(
        self, requests: list[RequestSpec], max_input: int | None, max_prefill: int, max_total: int | None
    ) -> tuple[int, int, int]:
        """Run the router's warmup batch on a temporary cache, then size the persistent KV pool
        (first Warmup only). Limits are checked before anything is kept, so a Warmup that fails
        leaves the pool, the cached batches and the limits as they were."""
        self.platform.empty_cache()
        batch = Batch.from_specs(0, requests, self._context(warmup=True), warmup=True)
        temp_blocks = max(b for r in batch.requests for b in r.blocks) + 1
        temp = KVCache(self.settings.kv_spec, temp_blocks, self.backend, self.device)
        n_tokens = sum(r.prompt_len for r in batch.requests)
        try:
            _, next_batch, _, _ = self.generate_token(batch, temp)  # prefill: the memory peak
            if next_batch is not None:
                self.generate_token(next_batch, temp)  # one decode step compiles decode kernels
            self.platform.synchronize()
        except RuntimeError as err:  # torch.OutOfMemoryError, or torch_npu's RuntimeError form
            if not is_device_oom(err):
                raise
            raise torch.OutOfMemoryError(
                f"Not enough memory to handle {n_tokens} prefill tokens. "
                "You need to decrease `--max-batch-prefill-tokens`"
            ) from err
        del temp, batch
        self.platform.empty_cache()

        reason = "kept from the first Warmup"
        if self.kv_cache is not None:
            # NOTE: a repeated Warmup (a router restart) keeps the pool: it was sized with the
            # model loaded and nothing has changed since; re-sizing would drop cached batches.
            num_blocks = self.kv_cache.num_blocks
        else:
            pool = size_kv_pool(self.settings, max_prefill=max_prefill, max_total=max_total,
                                model_max_length=self.text.model_max_length)
            num_blocks, reason = pool.num_blocks, pool.reason
            # NOTE: free memory differs between ranks; all must report (and allocate) one
            # capacity, and every other choice below is derived from it and from identical flags.
            num_blocks = self.parallel.all_reduce_min(num_blocks, self.device)
        capacity = num_blocks * self.block_size
        max_input, max_total = self._limits(max_input, max_prefill, max_total, capacity)
        if self.kv_cache is None:
            self.kv_cache = KVCache(self.settings.kv_spec, num_blocks, self.backend, self.device)
        self.max_input_tokens = max_input
        if self.settings.chunking:
            self.max_prefill_tokens = max_prefill
        logger.info(
            f"KV pool: {num_blocks} blocks x {self.block_size} tokens = {capacity} tokens "
            f"({num_blocks * self.settings.kv_spec.bytes_per_block / 2**20:.1f} MiB); "
            f"max_input_tokens={max_input} max_total_tokens={max_total}; {reason}"
        )
        return capacity, max_input, max_total

    def _limits(
        self, max_input: int | None, max_prefill: int, max_total: int | None, capacity: int
    ) -> tuple[int, int]:
        """Echo the router's limits when set; otherwise pick values the router accepts:
        max_input < max_total <= capacity and, without chunking, max_input <= max_prefill (with
        it a prompt may be longer than a prefill pass: max_input = max_total - 1, as TGI)."""
        if max_input is None:
            max_input = self.max_input_tokens
        if max_total is not None and max_total > capacity:
            raise InvalidRequestError(
                f"Not enough memory: max_total_tokens={max_total} but the KV pool holds {capacity} "
                "tokens; lower --max-total-tokens or give the KV pool more memory (--kv-cache-fraction)"
            )
        if max_total is None:
            limit = min(capacity, self.text.model_max_length or capacity)
            max_total = limit if max_input is None else max(max_input + 1, limit)
            max_total = min(max_total, capacity)
        if max_input is None:
            max_input = max_total - 1 if self.settings.chunking else min(max_total - 1, max_prefill)
        if not 0 < max_input < max_total:
            raise InvalidRequestError(
                f"max_input_tokens={max_input} must be smaller than max_total_tokens={max_total} "
                f"(KV pool: {capacity} tokens)"
            )
        return max_input, max_total

    # ------------------------------------------------------------------ one step
    def generate_token(self, batch: Batch, kv_cache: KVCache) -> tuple[list[Generation], Batch | None, int, int]:
        """One forward pass over every request's next query, then each request takes its result:
        a prompt chunk moves its cursor, and a request whose pass ends its prompt (or decodes)
        takes the chosen token. Requests still prefilling produce no Generation (as TGI)."""
        start = _now()
        requests = batch.requests
        prefilling = batch.prefilling
        if prefilling:
            yielding = [i for i, r in enumerate(requests) if r.yields_token]
        else:  # every request decodes one token
            yielding = list(range(len(requests)))
        out = self.runner.forward(batch, kv_cache)
        self._advancing = True  # sampling draws from the requests' generators: no way back
        chosen: list[int] = []
        chosen_logprobs: list[float] = []
        tops = None
        if yielding:
            next_ids, logprobs = self.runner.choose(batch, yielding, out.next_logits)
            if batch.wants_top_tokens:
                top_n = [requests[i].top_n if requests[i].owned else 0 for i in yielding]
                tops = top_n_tokens(logprobs, top_n)
            # device -> host sync: end of the forward part
            chosen, chosen_logprobs = chosen_to_host(logprobs, next_ids)
        forward_ns = _now() - start

        start = _now()
        row = {i: k for k, i in enumerate(yielding)} if prefilling else None
        special_ids = self.text.special_ids
        generations = []
        done = 0  # requests finished, before or during this step
        for i, r in enumerate(requests):
            if r.finished:
                done += 1
                continue
            was_prefilling = prefilling and not r.prefilled
            if was_prefilling:
                r.prefill_pass_done(out.prompt_logprobs[i])
            k = i if row is None else row.get(i)
            if k is None:
                continue  # a prompt chunk that does not end the prompt: no token yet
            token = chosen[k]
            piece, generated_text = r.take(token)
            if generated_text is not None:
                done += 1
            if not r.owned:
                continue
            gen = Generation(
                r.id, Tokens([token], [chosen_logprobs[k]], [piece], [token in special_ids]),
                generated_text=generated_text,
            )
            if was_prefilling and r.prefill_logprobs:
                gen.prefill_tokens = self._prefill_tokens(r)
            if tops is not None and r.top_n > 0:
                ids, lps = tops[k]
                gen.top_tokens = [Tokens(ids, lps, self._texts(ids), [t in special_ids for t in ids])]
            generations.append(gen)
        if prefilling and self.max_prefill_tokens is not None:
            batch.plan_chunks(self.max_prefill_tokens)
        decode_ns = _now() - start
        if done == len(requests):
            return generations, None, forward_ns, decode_ns
        return generations, batch, forward_ns, decode_ns

    def _texts(self, ids: list[int]) -> list[str]:
        return [self.text.tokenizer.decode([t], skip_special_tokens=False) for t in ids]

    def _prefill_tokens(self, r: Request) -> Tokens:
        """Prompt tokens with the logprob of each given the ones before (first: NaN, as TGI);
        positions whose KV came from the prefix cache were not computed: NaN too. Computed over
        one or several passes (chunks); each position appears once."""
        logprobs = [math.nan] * (r.cache_len + 1) + r.prompt_logprobs
        ids = r.prompt_ids
        return Tokens(ids=ids, logprobs=logprobs[: len(ids)], texts=self._texts(ids), is_special=[])
