"""A synchronous stand-in for TGI's v3 router, for driving shards in tests.

It follows backends/v3 (PROTOCOL.md b.1-b.3): ServiceDiscovery on the master socket only, then
ClearCache, Info and Warmup on every listed shard; the router's warmup batch; the simple block
allocator (block 0 reserved, ``input_length + max_new_tokens - 1`` slots per request, blocks
freed when a request leaves) or, with ``prefix_caching=True``, the radix allocator (prompt token ids
from the tokenizer, ``cache_len`` = reused prefix, minus 1 when the whole prompt matched); FilterBatch when the live set shrinks, ClearCache when it empties;
the health probe Prefill on block 0. Calls to several shards run concurrently and their
generations are concatenated, as the router's sharded client does.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from tgi_npu_backend.launcher.allocator import BlockAllocator
from tgi_npu_backend.launcher.radix import RadixAllocator
from tgi_npu_backend.launcher.warmup import build_warmup_request
from tgi_npu_backend.pb import generate_pb2 as pb
from tgi_npu_backend.pb import generate_pb2_grpc as pb_grpc
from tgi_npu_backend.wire import batch_requests

U64_MAX = 2**64 - 1


def plain(batch: pb.Batch) -> tuple[int, list]:
    """A protobuf batch as the in-process ``Generator.prefill`` takes it (id, RequestSpecs)."""
    return batch.id, batch_requests(batch)
@dataclass
class Result:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    top_tokens: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    prefill: pb.Tokens | None = None
    generated_text: str | None = None
    finish_reason: int | None = None
    seed: int | None = None
    generated_tokens: int | None = None


WORDS = "the a of NPU paged block cache token prompt stream decode model batch router shard".split()


def words(seed: int, n: int) -> list[str]:
    """``n`` seeded random words (a word and a number: several tokens each)."""
    rng = random.Random(seed)
    return [rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(n)]


def text_of_tokens(tokenizer, seed: int, n: int) -> str:
    """The longest text of seeded random words that tokenizes to at most ``n`` tokens (each
    prefix of the words is a prefix of the tokens: byte-level BPE splits at the spaces)."""
    pool = words(seed, n)
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer(" ".join(pool[:mid]))["input_ids"]) <= n:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(pool[:lo])


def params(**kw) -> pb.NextTokenChooserParameters:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, do_sample=False, seed=0,
                repetition_penalty=1.0, frequency_penalty=0.0, watermark=False)
    base.update(kw)
    return pb.NextTokenChooserParameters(**base)


def text_input(text: str) -> pb.Input:
    return pb.Input(chunks=[pb.InputChunk(text=text)])


class RouterSim:
    def __init__(self, master_socket: str, tokenizer, prefix_caching: bool = False):
        self.tokenizer = tokenizer
        self.prefix_caching = prefix_caching
        self.cache_lens: dict[int, int] = {}  # request id -> cache_len sent
        self.master_socket = master_socket
        self.pool = ThreadPoolExecutor(max_workers=8)
        self.next_request_id = 0
        self.next_batch_id = 0
        self.blocks: dict[int, object] = {}  # request id -> BlockAllocation
        self.prompt_lens: dict[int, int] = {}  # request id -> prompt tokens (router's count)

    # ---------------------------------------------------------------- shard calls
    def _all(self, method: str, request):
        """``method`` on every shard at once, as the router's concurrent calls; one shard is
        called directly (a pool's thread hop added 0.12 ms to each call here, which the router's
        async calls do not)."""
        if len(self.stubs) == 1:
            return [getattr(self.stubs[0], method)(request)]
        futures = [self.pool.submit(getattr(s, method), request) for s in self.stubs]
        return [f.result() for f in futures]

    def startup(self, max_input: int | None = None, max_total: int | None = None,
                max_prefill: int = 4096, max_batch_size: int | None = None) -> pb.InfoResponse:
        master = grpc.insecure_channel(f"unix://{self.master_socket}")
        urls = pb_grpc.TextGenerationServiceStub(master).ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
        master.close()
        self.urls = list(urls)
        self.channels = [grpc.insecure_channel(u) for u in self.urls]
        self.stubs = [pb_grpc.TextGenerationServiceStub(c) for c in self.channels]
        self._all("ClearCache", pb.ClearCacheRequest())
        self.info = self._all("Info", pb.InfoRequest())[-1]
        warm = self._all("Warmup", self.warmup_request(max_input, max_total, max_prefill, max_batch_size))
        key = min((w.max_supported_total_tokens, w.max_input_tokens, w.max_total_tokens) for w in warm)
        self.max_supported, self.max_input, self.max_total = key
        if max_input is not None:
            assert self.max_input == max_input, "the shard must echo max_input_tokens"
        if max_total is not None:
            assert self.max_total == max_total, "the shard must echo max_total_tokens"
        assert self.max_input < self.max_total <= self.max_supported
        if not self.info.support_chunking:
            assert self.max_input <= max_prefill
        if self.prefix_caching:
            self.allocator = RadixAllocator(self.max_supported, self.info.block_size)
        else:
            self.allocator = BlockAllocator(self.max_supported, self.info.block_size)
        return self.info

    @staticmethod
    def warmup_request(max_input, max_total, max_prefill, max_batch_size) -> pb.WarmupRequest:
        """grpc_client.rs warmup: requests until max_prefill tokens are covered, all with id 0
        (built by the launcher's router, whose own tests check it against the Rust router)."""
        return build_warmup_request(max_input, max_prefill, max_total, max_batch_size)

    # ---------------------------------------------------------------- requests
    def request(self, text: str, max_new_tokens: int = 16, truncate: int | None = None,
                stop: list[str] | None = None, prefill_logprobs: bool = False, top_n: int = 0,
                add_special_tokens: bool = True, ignore_eos: bool = False, **sampling) -> pb.Request:
        truncate = truncate if truncate is not None else self.max_input
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens, truncation=True,
                             max_length=truncate)["input_ids"]
        rid = self.next_request_id
        self.next_request_id += 1
        # queue.rs: no token ids (no prefix reuse) when prompt logprobs are asked for
        prefill_ids = None if prefill_logprobs else list(ids)
        alloc = self.allocator.allocate(len(ids) + max_new_tokens - 1, prefill_ids)
        assert alloc is not None, "KV pool exhausted in test"
        blocks, slots = list(alloc.blocks), list(alloc.slots)
        self.blocks[rid] = alloc
        cache_len = min(alloc.prefix_len, len(ids) - 1)  # whole prompt matched: run its last token
        self.cache_lens[rid] = cache_len
        self.prompt_lens[rid] = len(ids)
        return pb.Request(
            id=rid, inputs=text, input_chunks=text_input(text), truncate=truncate,
            parameters=params(**sampling), add_special_tokens=add_special_tokens,
            stopping_parameters=pb.StoppingCriteriaParameters(
                max_new_tokens=max_new_tokens, stop_sequences=stop or [], ignore_eos_token=ignore_eos),
            prefill_logprobs=prefill_logprobs, top_n_tokens=top_n, blocks=blocks, slots=slots,
            cache_len=cache_len,
        )

    def release(self, request_id: int) -> None:
        self.allocator.free(self.blocks.pop(request_id))

    def batch(self, requests: list[pb.Request]) -> pb.Batch:
        bid = self.next_batch_id
        self.next_batch_id += 1
        return pb.Batch(id=bid, requests=requests, size=len(requests),
                        max_tokens=sum(len(r.slots) for r in requests),
                        max_blocks=max(len(r.blocks) for r in requests))

    def prefill(self, batch: pb.Batch, cached: pb.CachedBatch | None = None):
        message = pb.PrefillRequest(batch=batch)
        if cached is not None:
            message.cached_batch.CopyFrom(cached)
        resps = self._all("Prefill", message)
        return [g for r in resps for g in r.generations], resps[-1].batch if resps[-1].HasField("batch") else None

    def decode(self, batches: list[pb.CachedBatch]):
        resps = self._all("Decode", pb.DecodeRequest(batches=batches))
        return [g for r in resps for g in r.generations], resps[-1].batch if resps[-1].HasField("batch") else None

    def filter(self, batch_id: int, keep: list[int]) -> pb.CachedBatch:
        return self._all("FilterBatch", pb.FilterBatchRequest(batch_id=batch_id, request_ids=keep))[-1].batch

    def clear(self, batch_id: int | None = None) -> None:
        self._all("ClearCache", pb.ClearCacheRequest(id=batch_id) if batch_id is not None else pb.ClearCacheRequest())

    def health_probe(self):
        req = pb.Request(id=U64_MAX, inputs="liveness", input_chunks=text_input("liveness"), truncate=1,
                         add_special_tokens=False, parameters=params(),
                         stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1),
                         blocks=[0], slots=[0])
        return self.prefill(pb.Batch(id=U64_MAX, requests=[req], size=1, max_tokens=2, max_blocks=1))

    # ---------------------------------------------------------------- serving loop
    def run(self, plan: dict[int, list[pb.Request]], cancel: dict[int, list[int]] | None = None,
            max_steps: int = 500, between=None) -> dict[int, Result]:
        """Serve like backend.rs: ``plan[step]`` are requests admitted (Prefill) before decode step
        ``step``; ``cancel[step]`` are request ids whose clients disconnect before that step;
        ``between(step)`` runs before each step (e.g. other RPCs a router may send meanwhile)."""
        cancel = cancel or {}
        results: dict[int, Result] = {}
        live: set[int] = set()
        current: pb.CachedBatch | None = None
        for step in range(max_steps):
            if between is not None:
                between(step)
            for rid in cancel.get(step, []):
                if rid in live:
                    live.discard(rid)
                    self.release(rid)
            new = None
            if plan.get(step):
                for r in plan[step]:
                    results[r.id] = Result()
                    live.add(r.id)
                gens, new = self.prefill(self.batch(plan[step]))
                self._consume(gens, results, live)
                new = self._maybe_filter(new, live)
            if current is not None:
                current = self._maybe_filter(current, live)
            batches = [b for b in (current, new) if b is not None]
            if batches:
                gens, current = self.decode(batches)
                self._consume(gens, results, live)
                current = self._maybe_filter(current, live)
            elif not any(k > step for k in plan):
                break
        assert not live, f"requests never finished: {live}"
        return results

    def run_chunked(self, plan: dict[int, list[pb.Request]], max_prefill: int,
                    max_steps: int = 2000) -> tuple[dict[int, Result], list[tuple[str, set[int]]]]:
        """Serve like backend.rs with ``support_chunking``: queued requests enter under a prefill
        budget (``max_prefill`` minus the running batch's ``current_tokens``, rounded up to the
        block size, as queue.rs) and the last one admitted is cut to fit (``chunk_len``); a new
        batch goes to ``Prefill(batch, cached_batch=running)``, then every loop decodes.
        ``plan[step]`` requests join the queue at loop ``step``. Returns the results and, per
        RPC, which requests got a token."""
        results: dict[int, Result] = {}
        live: set[int] = set()
        queue: list[pb.Request] = []
        trace: list[tuple[str, set[int]]] = []
        current: pb.CachedBatch | None = None

        def record(name, gens):
            trace.append((name, {g.request_id for g in gens}))

        for step in range(max_steps):
            for r in plan.get(step, []):
                results[r.id] = Result()
                live.add(r.id)
                queue.append(r)
            budget = max_prefill - (current.current_tokens if current is not None else 0)
            new = self._cut(queue, budget) if budget > 0 else None
            if new is not None:
                gens, current = self.prefill(self.batch(new), current)
                record("prefill", gens)
                self._consume(gens, results, live)
                current = self._maybe_filter(current, live)
            if current is not None:
                gens, current = self.decode([current])
                record("decode", gens)
                self._consume(gens, results, live)
                current = self._maybe_filter(current, live)
            elif not queue and not any(k > step for k in plan):
                break
        assert not live, f"requests never finished: {live}"
        return results, trace

    def _cut(self, queue: list[pb.Request], budget: int) -> list[pb.Request] | None:
        bs = self.info.block_size
        budget = -(-budget // bs) * bs
        taken, tokens = [], 0
        while queue:
            r = queue[0]
            postfix = self.prompt_lens[r.id] - r.cache_len
            if tokens + postfix > budget:
                chunk = budget - tokens
                if chunk > 0:
                    cut = pb.Request()
                    cut.CopyFrom(queue.pop(0))
                    cut.chunk_len = chunk
                    taken.append(cut)
                break
            taken.append(queue.pop(0))
            tokens += postfix
        return taken or None

    def _consume(self, gens, results: dict[int, Result], live: set[int]) -> None:
        for g in gens:
            if g.request_id not in live:
                continue  # cancelled: the router drops its generations
            res = results[g.request_id]
            assert len(g.tokens.ids) == len(g.tokens.logprobs) == len(g.tokens.texts) == len(g.tokens.is_special) >= 1
            if g.HasField("prefill_tokens"):
                assert res.prefill is None, "prefill_tokens must come only once"
                res.prefill = g.prefill_tokens
            res.ids += g.tokens.ids
            res.logprobs += g.tokens.logprobs
            res.texts += g.tokens.texts
            res.top_tokens += [list(t.ids) for t in g.top_tokens]
            res.top_logprobs += [list(t.logprobs) for t in g.top_tokens]
            if g.HasField("generated_text"):
                gt = g.generated_text
                assert gt.generated_tokens >= 1
                res.generated_text, res.finish_reason = gt.text, gt.finish_reason
                res.generated_tokens = gt.generated_tokens
                res.seed = gt.seed if gt.HasField("seed") else None
                live.discard(g.request_id)
                self.release(g.request_id)

    def _maybe_filter(self, batch: pb.CachedBatch | None, live: set[int]) -> pb.CachedBatch | None:
        if batch is None:
            return None
        assert batch.size == len(batch.request_ids)
        keep = [i for i in batch.request_ids if i in live]
        if not keep:
            self.clear(batch.id)
            return None
        if len(keep) != batch.size:
            return self.filter(batch.id, keep)
        return batch


def start_shard(model_dir, uds_path: str, extra_args: list[str] = (), env: dict | None = None,
                rank: int = 0, world_size: int = 1, timeout: float = 120.0) -> subprocess.Popen:
    """Start ``text-generation-server serve`` as the launcher does and wait for its socket."""
    socket = f"{uds_path}-{rank}"
    if os.path.exists(socket):
        os.unlink(socket)
    full_env = dict(os.environ)
    full_env.update({"ATTENTION": "paged", "PREFIX_CACHING": "0", "RANK": str(rank),
                     "WORLD_SIZE": str(world_size), "TGI_NPU_KV_CACHE_FRACTION": "0.01"})
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "tgi_npu_backend.cli", "serve", str(model_dir),
           "--uds-path", uds_path, "--logger-level", "INFO", "--json-output",
           "--otlp-service-name", "text-generation-inference.router", *extra_args]
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not os.path.exists(socket):
        if proc.poll() is not None:
            raise RuntimeError(f"shard exited with {proc.returncode}: {proc.stderr.read()}\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise TimeoutError(f"shard socket {socket} did not appear in {timeout}s")
        time.sleep(0.1)
    return proc

