"""A fake v3 shard for router tests: the 8 RPCs with deterministic tokens and TGI's batch-cache
semantics, plus checks of what the router sends.

Next token = ``(last_token * 7 + 3) % vocab``. The shard tokenizes prompts with the model's own
tokenizer (left truncation to ``Request.truncate``, text chunks only) and checks that
``len(slots) == input_length + max_new_tokens - 1`` (router and shard tokenizers agree), that no
live request writes a KV slot another live request owns (blocks never double-allocated), and that
block 0 is used only by the health probe. Violations are collected in ``FakeShard.violations``.

Also runnable as a fake ``text-generation-server`` (``serve`` / ``download-weights``) for
launcher process tests. Env knobs: ``FAKE_SHARD_RECORD`` (a directory) receives each call's argv
and env; ``FAKE_SHARD_DOWNLOAD_FAIL`` makes download-weights fail; ``FAKE_SHARD_CRASH_AFTER=S``
makes rank ``FAKE_SHARD_CRASH_RANK`` (0) exit during startup; ``FAKE_SHARD_CRASH_FILE=PATH`` makes
rank 0 exit while serving once PATH exists.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import grpc

from tgi_npu_backend.pb import generate_pb2 as pb
from tgi_npu_backend.pb import generate_pb2_grpc as pb_grpc

U64_MAX = 2**64 - 1
FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "eos": pb.FINISH_REASON_EOS_TOKEN,
    "stop": pb.FINISH_REASON_STOP_SEQUENCE,
}


def next_token(last: int, vocab: int) -> int:
    return (last * 7 + 3) % vocab


@dataclass
class ReqState:
    id: int
    input_ids: list[int]
    max_new_tokens: int
    stop_sequences: list[str]
    ignore_eos: bool
    slots: list[int]
    top_n: int
    prefill_logprobs: bool
    seed: int | None
    scripted: list[int] | None = None  # the tokens to answer (``FakeShard.script``)
    generated: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class BatchState:
    id: int
    requests: list[ReqState]


class FakeShard(pb_grpc.TextGenerationServiceServicer):
    def __init__(
        self,
        tokenizer,
        *,
        uds_base: str,
        rank: int = 0,
        world_size: int = 1,
        block_size: int = 16,
        max_supported_total_tokens: int | None = 4096,
        default_max_input: int = 1000,
        default_max_total: int = 1024,
        step_delay: float = 0.0,
        script=None,
    ) -> None:
        self.tok = tokenizer
        self.vocab = len(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.specials = set(tokenizer.all_special_ids)
        self.uds_base = uds_base
        self.rank = rank
        self.world_size = world_size
        self.block_size = block_size
        self.max_supported = max_supported_total_tokens
        self.default_max_input = default_max_input
        self.default_max_total = default_max_total
        self.step_delay = step_delay
        self.cache: dict[int, BatchState] = {}
        self.slot_owner: dict[int, int] = {}
        self.calls: list[tuple[str, object]] = []
        self.violations: list[str] = []
        self.fail_next: dict[str, str] = {}  # rpc name -> error message, used once
        # script(pb.Request) -> a text to answer with (tokenized, then EOS), or None for the
        # usual deterministic tokens: stands in for a model that follows a grammar.
        self.script = script
        self.metadata: list[tuple[str, dict]] = []  # (rpc, gRPC invocation metadata)

    # ---- helpers -----------------------------------------------------------------------------
    def encode(self, r: pb.Request) -> list[int]:
        text = "".join(c.text for c in r.input_chunks.chunks if c.WhichOneof("chunk") == "text")
        ids = self.tok(text, add_special_tokens=r.add_special_tokens)["input_ids"]
        return ids[-r.truncate :] if r.truncate else ids

    async def _maybe_fail(self, name: str, context) -> None:
        message = self.fail_next.pop(name, None)
        if message is not None:
            await context.abort(grpc.StatusCode.INTERNAL, message)

    def _release(self, req: ReqState) -> None:
        for s in req.slots:
            if self.slot_owner.get(s) == req.id:
                del self.slot_owner[s]

    def _claim(self, req: ReqState, position: int) -> None:
        if position >= len(req.slots):
            self.violations.append(
                f"request {req.id}: no slot for position {position} ({len(req.slots)} slots)"
            )
            return
        slot = self.slot_owner.setdefault(req.slots[position], req.id)
        if slot != req.id:
            self.violations.append(
                f"request {req.id} writes slot {req.slots[position]} owned by request {slot}"
            )

    def _to_pb(self, b: BatchState) -> pb.CachedBatch:
        ids = [r.id for r in b.requests]
        blocks = sum(-(-len(r.slots) // self.block_size) for r in b.requests)
        return pb.CachedBatch(
            id=b.id,
            request_ids=ids,
            size=len(ids),
            max_tokens=blocks * self.block_size,
            current_tokens=len(ids),
        )

    def _step(
        self, b: BatchState, prefill: bool
    ) -> tuple[list[pb.Generation], pb.CachedBatch | None]:
        gens = []
        for r in b.requests:
            if r.done:
                continue
            last = r.generated[-1] if r.generated else (r.input_ids[-1] if r.input_ids else 0)
            position = len(r.input_ids) + len(r.generated) - 1
            if prefill:
                for p in range(len(r.input_ids)):
                    self._claim(r, p)
            else:
                self._claim(r, position)
            if r.scripted is not None:
                step = len(r.generated)
                tok = r.scripted[step] if step < len(r.scripted) else self.eos
            else:
                tok = next_token(last, self.vocab)
            r.generated.append(tok)
            text = self.tok.decode([tok])
            reason = None
            if len(r.generated) >= r.max_new_tokens:
                reason = "length"
            elif tok == self.eos and not r.ignore_eos:
                reason = "eos"
            elif any(self.tok.decode(r.generated).endswith(s) for s in r.stop_sequences):
                reason = "stop"
            if r.id % self.world_size != self.rank:
                r.done = reason is not None
                continue
            g = pb.Generation(
                request_id=r.id,
                tokens=pb.Tokens(
                    ids=[tok], logprobs=[-0.5], texts=[text], is_special=[tok in self.specials]
                ),
            )
            if prefill and r.prefill_logprobs:
                g.prefill_tokens.CopyFrom(
                    pb.Tokens(
                        ids=r.input_ids,
                        logprobs=[math.nan] + [-1.0] * (len(r.input_ids) - 1),
                        texts=[self.tok.decode([i]) for i in r.input_ids],
                    )
                )
            if r.top_n:
                alts = [(tok + k) % self.vocab for k in range(r.top_n)]
                g.top_tokens.append(
                    pb.Tokens(
                        ids=alts,
                        logprobs=[-0.5 - k for k in range(r.top_n)],
                        texts=[self.tok.decode([a]) for a in alts],
                        is_special=[a in self.specials for a in alts],
                    )
                )
            if reason is not None:
                r.done = True
                gt = pb.GeneratedText(
                    text=self.tok.decode(r.generated, skip_special_tokens=True),
                    generated_tokens=len(r.generated),
                    finish_reason=FINISH[reason],
                )
                if r.seed is not None:
                    gt.seed = r.seed
                g.generated_text.CopyFrom(gt)
            gens.append(g)
        if all(r.done for r in b.requests):
            for r in b.requests:
                self._release(r)
            return gens, None
        self.cache[b.id] = b
        return gens, self._to_pb(b)

    def _scripted(self, r: pb.Request) -> list[int] | None:
        text = self.script(r) if self.script is not None and r.id != U64_MAX else None
        return None if text is None else self.tok(text, add_special_tokens=False)["input_ids"]

    # ---- RPCs --------------------------------------------------------------------------------
    async def Info(self, request, context):
        self.calls.append(("Info", None))
        return pb.InfoResponse(
            requires_padding=False,
            dtype="torch.float32",
            device_type="cpu",
            speculate=0,
            support_chunking=False,
            use_prefix_caching=False,
            attention_impl="paged",
            block_size=self.block_size,
        )

    async def ServiceDiscovery(self, request, context):
        self.calls.append(("ServiceDiscovery", None))
        return pb.ServiceDiscoveryResponse(
            urls=[f"unix://{self.uds_base}-{r}" for r in range(self.world_size)]
        )

    async def ClearCache(self, request, context):
        batch_id = request.id if request.HasField("id") else None
        self.calls.append(("ClearCache", batch_id))
        await self._maybe_fail("ClearCache", context)
        ids = list(self.cache) if batch_id is None else [batch_id]
        for i in ids:
            b = self.cache.pop(i, None)
            for r in b.requests if b else []:
                self._release(r)
        return pb.ClearCacheResponse()

    async def FilterBatch(self, request, context):
        self.calls.append(("FilterBatch", (request.batch_id, list(request.request_ids))))
        await self._maybe_fail("FilterBatch", context)
        b = self.cache.pop(request.batch_id, None)
        if b is None:
            await context.abort(grpc.StatusCode.INTERNAL, f"batch {request.batch_id} not found")
        keep = set(request.request_ids)
        if not keep:
            self.violations.append("FilterBatch with no request ids")
        for r in b.requests:
            if r.id not in keep:
                self._release(r)
        by_id = {r.id: r for r in b.requests}
        b.requests = [by_id[i] for i in request.request_ids if i in by_id]
        self.cache[b.id] = b
        return pb.FilterBatchResponse(batch=self._to_pb(b))

    async def Warmup(self, request, context):
        self.calls.append(("Warmup", request))
        await self._maybe_fail("Warmup", context)
        for r in request.batch.requests:
            if r.id != 0 or r.blocks or r.slots:
                self.violations.append("warmup request with id != 0 or with blocks/slots")
        max_input = (
            request.max_input_tokens
            if request.HasField("max_input_tokens")
            else self.default_max_input
        )
        max_total = (
            request.max_total_tokens
            if request.HasField("max_total_tokens")
            else self.default_max_total
        )
        resp = pb.WarmupResponse(max_input_tokens=max_input, max_total_tokens=max_total)
        if self.max_supported is not None:
            resp.max_supported_total_tokens = self.max_supported
        return resp

    async def Prefill(self, request, context):
        self.calls.append(("Prefill", request.batch))
        self.metadata.append(("Prefill", dict(context.invocation_metadata() or ())))
        await self._maybe_fail("Prefill", context)
        start = time.perf_counter_ns()
        if self.step_delay:
            await asyncio.sleep(self.step_delay)
        reqs = []
        for r in request.batch.requests:
            ids = self.encode(r)
            mnt = r.stopping_parameters.max_new_tokens
            if r.id != U64_MAX:
                if len(r.slots) != len(ids) + mnt - 1:
                    self.violations.append(
                        f"request {r.id}: {len(r.slots)} slots for {len(ids)} prompt tokens + {mnt} new - 1"
                    )
                if 0 in r.blocks:
                    self.violations.append(f"request {r.id} was given the reserved block 0")
                if len(r.slots) > len(r.blocks) * self.block_size:
                    self.violations.append(f"request {r.id}: more slots than its blocks hold")
            reqs.append(
                ReqState(
                    id=r.id,
                    input_ids=ids,
                    max_new_tokens=mnt,
                    stop_sequences=list(r.stopping_parameters.stop_sequences),
                    ignore_eos=r.stopping_parameters.ignore_eos_token,
                    slots=list(r.slots),
                    top_n=r.top_n_tokens,
                    prefill_logprobs=r.prefill_logprobs,
                    seed=r.parameters.seed if r.parameters.do_sample else None,
                    scripted=self._scripted(r),
                )
            )
        gens, batch = self._step(BatchState(request.batch.id, reqs), prefill=True)
        total = time.perf_counter_ns() - start
        resp = pb.PrefillResponse(
            generations=gens, forward_ns=total // 2, decode_ns=total // 4, total_ns=total
        )
        if batch is not None:
            resp.batch.CopyFrom(batch)
        return resp

    async def Decode(self, request, context):
        self.calls.append(("Decode", [b.id for b in request.batches]))
        self.metadata.append(("Decode", dict(context.invocation_metadata() or ())))
        await self._maybe_fail("Decode", context)
        start = time.perf_counter_ns()
        if self.step_delay:
            await asyncio.sleep(self.step_delay)
        batches = []
        for cb in request.batches:
            b = self.cache.pop(cb.id, None)
            if b is None:
                await context.abort(grpc.StatusCode.INTERNAL, f"batch {cb.id} not found")
            batches.append(b)
        merged = BatchState(batches[0].id, [r for b in batches for r in b.requests])
        gens, batch = self._step(merged, prefill=False)
        total = time.perf_counter_ns() - start
        resp = pb.DecodeResponse(
            generations=gens, forward_ns=total // 2, decode_ns=total // 4, total_ns=total
        )
        if len(batches) > 1:
            resp.concat_ns = 1000
        if batch is not None:
            resp.batch.CopyFrom(batch)
        return resp

    async def Health(self, request, context):
        self.calls.append(("Health", None))
        await self._maybe_fail("Health", context)
        return pb.HealthResponse()

    # ---- oracle ------------------------------------------------------------------------------
    def expected(
        self, prompt: str, max_new_tokens: int, add_special_tokens: bool = True
    ) -> list[int]:
        ids = self.tok(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        out, last = [], ids[-1]
        for _ in range(max_new_tokens):
            last = next_token(last, self.vocab)
            out.append(last)
            if last == self.eos:
                break
        return out

    def live_slots(self) -> int:
        return len(self.slot_owner)


async def start_fake_shards(
    tokenizer, uds_base: str, world_size: int = 1, **kw
) -> tuple[list[FakeShard], list]:
    """Start ``world_size`` fake shards in this event loop; returns (shards, grpc servers)."""
    shards, servers = [], []
    for rank in range(world_size):
        shard = FakeShard(tokenizer, uds_base=uds_base, rank=rank, world_size=world_size, **kw)
        server = grpc.aio.server()
        pb_grpc.add_TextGenerationServiceServicer_to_server(shard, server)
        server.add_insecure_port(f"unix://{uds_base}-{rank}")
        await server.start()
        shards.append(shard)
        servers.append(server)
    return shards, servers


# ---- fake `text-generation-server` executable ----------------------------------------------
def _record(argv: list[str]) -> None:
    out = os.environ.get("FAKE_SHARD_RECORD")
    if out:
        name = f"{argv[0]}-{os.environ.get('RANK', 'x')}.json"
        with open(os.path.join(out, name), "w") as f:
            json.dump({"argv": argv, "env": dict(os.environ)}, f)


def _opt(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else default


async def _serve(argv: list[str]) -> None:
    import signal

    from transformers import AutoTokenizer

    model, uds = argv[1], _opt(argv, "--uds-path", "/tmp/text-generation-server")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    print(
        json.dumps(
            {"text": f"fake shard {rank} loading {model}\n", "record": {"level": {"name": "INFO"}}}
        ),
        flush=True,
    )
    crash = os.environ.get("FAKE_SHARD_CRASH_AFTER")
    if crash is not None and rank == int(os.environ.get("FAKE_SHARD_CRASH_RANK", "0")):
        await asyncio.sleep(float(crash))
        print(
            "fake shard: simulated CUDA error: device-side assert triggered",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(3)
    tok = AutoTokenizer.from_pretrained(model)
    shard = FakeShard(tok, uds_base=uds, rank=rank, world_size=world)
    server = grpc.aio.server()
    pb_grpc.add_TextGenerationServiceServicer_to_server(shard, server)
    server.add_insecure_port(f"unix://{uds}-{rank}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    crash_file = os.environ.get("FAKE_SHARD_CRASH_FILE")
    while crash_file and rank == 0 and not stop.is_set():
        if os.path.exists(crash_file):
            print("fake shard: simulated crash while serving", file=sys.stderr, flush=True)
            os._exit(4)
        await asyncio.sleep(0.1)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str]) -> None:
    _record(argv)
    if argv[0] == "download-weights":
        if os.environ.get("FAKE_SHARD_DOWNLOAD_FAIL"):
            print("fake download failed: no such model", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    if argv[0] == "serve":
        asyncio.run(_serve(argv))
        sys.exit(0)
    print(f"fake shard: unknown command {argv}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
