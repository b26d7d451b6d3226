"""The shard over its socket, as a buggy router could drive it: every decodable but wrong RPC is
refused with a clear gRPC status (INVALID_ARGUMENT / NOT_FOUND, never INTERNAL), changes nothing,
and leaves the shard serving. A sentinel request cached on the shard from start to end must
produce exactly the tokens it produces alone; a normal request after each probe must too.

Also: the socket file is owner-only whatever the umask, a 2 MB prompt with a small ``truncate``
costs the generator thread milliseconds, and hypothesis fuzzes sequences of RPCs.
"""

from __future__ import annotations

import math
import os
import stat
import threading
import time
import tempfile
import uuid
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_sim import RouterSim, start_shard, text_input
from transformers import AutoTokenizer

from tgi_npu_backend.pb import generate_pb2 as pb

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
CLEAR = (OK, INVALID, NOT_FOUND)  # what any decodable RPC may get
SENTINEL_TEXT = "The sentinel keeps watch over the batch"
NORMAL_TEXT = "Hello there, general"
FUZZ_BLOCKS = 64  # blocks 1..63 are the fuzzer's: the router simulator allocates from the top


def call(stub, method: str, request) -> tuple[grpc.StatusCode, object]:
    """(status, response or error details) of one RPC."""
    try:
        return OK, getattr(stub, method)(request, timeout=60)
    except grpc.RpcError as err:
        return err.code(), err.details()


@dataclass
class Sentinel:
    """A long greedy request prefilled once and decoded now and then until the module ends."""

    request_id: int
    batch_id: int
    ids: list[int] = field(default_factory=list)

    def observe(self, generations) -> None:
        for g in generations:
            if g.request_id == self.request_id:
                self.ids += list(g.tokens.ids)

    def follow(self, response) -> None:
        """After a successful Prefill/Decode/FilterBatch: where the sentinel lives now."""
        self.observe(getattr(response, "generations", []))
        if response.HasField("batch") and self.request_id in response.batch.request_ids:
            self.batch_id = response.batch.id

    def step(self, live: Live) -> None:
        """One decode step, after putting the sentinel back in a batch of its own."""
        stub = live.stub
        code, resp = call(
            stub, "FilterBatch",
            pb.FilterBatchRequest(batch_id=self.batch_id, request_ids=[self.request_id]),
        )
        assert code == OK, resp
        code, resp = call(stub, "Decode", pb.DecodeRequest(batches=[resp.batch]))
        assert code == OK, resp
        self.follow(resp)


@dataclass
class Live:
    sim: RouterSim
    proc: object
    socket: str
    sentinel: Sentinel
    normal: list[int]  # tokens of NORMAL_TEXT served alone

    @property
    def stub(self):
        return self.sim.stubs[0]

    @property
    def num_blocks(self) -> int:
        return self.sim.max_supported // self.sim.info.block_size

    def normal_request_ok(self) -> None:
        req = self.sim.request(NORMAL_TEXT, max_new_tokens=4)
        assert self.sim.run({0: [req]})[req.id].ids == self.normal

    def alive(self) -> None:
        assert self.proc.poll() is None, "the shard exited"


@pytest.fixture(scope="module")
def live(bloom_dir):
    uds = f"{tempfile.gettempdir()}/tgi-robust-{uuid.uuid4().hex[:8]}"
    umask = os.umask(0)  # the socket must still be owner-only
    try:
        proc = start_shard(bloom_dir, uds)
    finally:
        os.umask(umask)
    # Every refused RPC logs a warning: drain the pipes, or the shard blocks writing its logs.
    logs: list[str] = []
    for pipe in (proc.stdout, proc.stderr):
        threading.Thread(target=lambda p=pipe: logs.extend(p), daemon=True).start()
    tokenizer = AutoTokenizer.from_pretrained(bloom_dir, truncation_side="left")
    sim = RouterSim(f"{uds}-0", tokenizer)
    sim.startup(max_input=256, max_prefill=256)
    normal = sim.request(NORMAL_TEXT, max_new_tokens=4)
    normal_ids = sim.run({0: [normal]})[normal.id].ids
    req = sim.request(SENTINEL_TEXT, max_new_tokens=2000, ignore_eos=True)
    gens, batch = sim.prefill(sim.batch([req]))
    sentinel = Sentinel(req.id, batch.id)
    sentinel.observe(gens)
    yield Live(sim, proc, f"{uds}-0", sentinel, normal_ids)
    proc.terminate()
    assert proc.wait(30) == 0, "".join(logs)[-3000:]


def check_sentinel(live: Live) -> None:
    """The sentinel's tokens so far are exactly those of the same request served alone."""
    live.sentinel.step(live)
    n = len(live.sentinel.ids)
    solo = live.sim.request(SENTINEL_TEXT, max_new_tokens=n, ignore_eos=True)
    assert live.sim.run({0: [solo]}, max_steps=n + 5)[solo.id].ids == live.sentinel.ids


def test_socket_is_owner_only_under_umask_000(live):
    mode = os.stat(live.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


# --------------------------------------------------------------------------------- the battery
def prefill_of(*requests: pb.Request, batch_id: int | None = None) -> pb.PrefillRequest:
    return pb.PrefillRequest(
        batch=pb.Batch(id=987_000 if batch_id is None else batch_id, requests=list(requests),
                       size=len(requests))
    )


def probes(live: Live):
    """(name, method, request, expected status, substring of the details) after building any
    requests with the simulator's allocator (released again after the probe)."""
    sim, s = live.sim, live.sentinel
    bs = sim.info.block_size

    def req(mutate=None, text="Hello there", **kw):
        r = sim.request(text, max_new_tokens=kw.pop("max_new_tokens", 4), **kw)
        sim.release(r.id)  # probes are refused (or cleared): their blocks go straight back
        if mutate:
            mutate(r)
        return r

    def set_param(**kw):
        return lambda r: [setattr(r.parameters, k, v) for k, v in kw.items()]

    sentinel_blocks = list(sim.blocks[s.request_id].blocks)
    beyond = live.num_blocks

    def with_blocks(blocks):
        def mutate(r):
            n = len(r.slots)
            del r.blocks[:]
            r.blocks.extend(blocks)
            del r.slots[:]
            r.slots.extend(blocks[p // bs] * bs + p % bs for p in range(n))
        return mutate

    twin_a = req()
    twin_b = req(with_blocks(list(twin_a.blocks)))
    twin_b.id = twin_a.id + 10_000
    dup_a = req()
    dup_b = req()
    dup_b.id = dup_a.id
    yield "Decode [S, S]", "Decode", pb.DecodeRequest(
        batches=[pb.CachedBatch(id=s.batch_id)] * 2), INVALID, "more than once"
    yield "Decode [S, unknown]", "Decode", pb.DecodeRequest(
        batches=[pb.CachedBatch(id=s.batch_id), pb.CachedBatch(id=424242)]), NOT_FOUND, "424242"
    yield "Decode []", "Decode", pb.DecodeRequest(), INVALID, "at least one batch"
    yield "FilterBatch duplicate ids", "FilterBatch", pb.FilterBatchRequest(
        batch_id=s.batch_id, request_ids=[s.request_id, s.request_id]), INVALID, "more than once"
    yield "FilterBatch unknown id", "FilterBatch", pb.FilterBatchRequest(
        batch_id=s.batch_id, request_ids=[s.request_id, 55555]), INVALID, "55555"
    yield "FilterBatch no id", "FilterBatch", pb.FilterBatchRequest(
        batch_id=s.batch_id), INVALID, "keeps no request"
    yield "FilterBatch unknown batch", "FilterBatch", pb.FilterBatchRequest(
        batch_id=424242, request_ids=[1]), NOT_FOUND, "424242"
    yield "Prefill duplicate request ids", "Prefill", prefill_of(dup_a, dup_b), INVALID, \
        "more than once"
    yield "Prefill a live request id", "Prefill", prefill_of(req(lambda r: setattr(
        r, "id", s.request_id))), INVALID, "still live"
    yield "Prefill a cached batch id", "Prefill", prefill_of(req(), batch_id=s.batch_id), \
        INVALID, "already cached"
    yield "block 2**32-1", "Prefill", prefill_of(req(lambda r: r.blocks.append(2**32 - 1))), \
        INVALID, "outside the KV pool"
    yield "block beyond the pool", "Prefill", prefill_of(req(with_blocks([beyond, beyond + 1]))), \
        INVALID, "outside the KV pool"
    yield "blocks of the sentinel", "Prefill", prefill_of(req(with_blocks(sentinel_blocks))), \
        INVALID, "belongs to another live request"
    yield "two requests, one block", "Prefill", prefill_of(twin_a, twin_b), INVALID, \
        "belongs to another live request"
    yield "a block twice", "Prefill", prefill_of(req(lambda r: with_blocks(
        [r.blocks[0]] * len(r.blocks))(r), text="word " * 20, max_new_tokens=2)), INVALID, \
        "more than once"
    for name, value in (("temperature", math.nan), ("temperature", math.inf),
                        ("top_p", math.nan), ("typical_p", math.inf),
                        ("repetition_penalty", math.nan), ("frequency_penalty", -math.inf)):
        yield f"{name}={value}", "Prefill", prefill_of(req(set_param(**{name: value}))), \
            INVALID, f"{name}={value}"
    yield "temperature 0", "Prefill", prefill_of(req(set_param(temperature=0.0))), INVALID, \
        "temperature must be > 0"
    yield "max_new_tokens 0", "Prefill", prefill_of(req(lambda r: setattr(
        r.stopping_parameters, "max_new_tokens", 0))), INVALID, "max_new_tokens"
    yield "max_new_tokens 2**32-1", "Prefill", prefill_of(req(lambda r: setattr(
        r.stopping_parameters, "max_new_tokens", 2**32 - 1))), INVALID, "KV slots cannot hold"
    yield "cache_len >= prompt", "Prefill", prefill_of(req(lambda r: setattr(
        r, "cache_len", 500))), INVALID, "cache_len"
    yield "grammar", "Prefill", prefill_of(req(set_param(grammar="[a-z]+"))), INVALID, "grammar"
    yield "empty prompt", "Prefill", prefill_of(req(lambda r: r.input_chunks.CopyFrom(
        text_input("")))), INVALID, "empty"
    yield "image only", "Prefill", prefill_of(req(lambda r: r.input_chunks.CopyFrom(pb.Input(
        chunks=[pb.InputChunk(image=pb.Image(data=b"x", mimetype="image/png"))])))), INVALID, "empty"
    yield "no requests", "Prefill", prefill_of(), INVALID, "no requests"
    yield "cached_batch unknown", "Prefill", pb.PrefillRequest(
        batch=prefill_of(req()).batch, cached_batch=pb.CachedBatch(id=424242)), NOT_FOUND, \
        "424242"
    yield "chunk_len beyond the prompt", "Prefill", prefill_of(req(lambda r: setattr(
        r, "chunk_len", 10_000))), INVALID, "chunk_len=10000"
    yield "prompt over --max-input-tokens", "Prefill", prefill_of(req(lambda r: setattr(
        r, "truncate", 0), text="word " * 600, max_new_tokens=1, truncate=2**31)), INVALID, \
        "more than --max-input-tokens"
    yield "2 MB prompt, no truncate", "Prefill", prefill_of(req(lambda r: (
        setattr(r, "truncate", 0), r.input_chunks.CopyFrom(text_input("word " * 400_000))))), \
        INVALID, "more than --max-input-tokens"
    yield "Warmup: absurd max_total_tokens", "Warmup", RouterSim.warmup_request(
        None, 2**31, 128, None), INVALID, "Not enough memory"
    same = RouterSim.warmup_request(64, 200, 128, None)
    same.max_total_tokens = 64
    yield "Warmup: max_input >= max_total", "Warmup", same, INVALID, "must be smaller than"
    yield "ClearCache unknown id", "ClearCache", pb.ClearCacheRequest(id=424242), OK, ""
    yield "extreme but valid parameters", "Prefill", prefill_of(req(set_param(
        top_k=2**32 - 1, seed=2**64 - 1, do_sample=True))), OK, ""


def test_battery_refuses_without_losing_anything(live: Live):
    stub = live.stub
    warm = RouterSim.warmup_request(live.sim.max_input, live.sim.max_total, 256, None)
    before = call(stub, "Warmup", warm)
    assert before[0] == OK
    failures = []
    for name, method, request, expected, needle in probes(live):
        code, resp = call(stub, method, request)
        if code != expected or (code != OK and needle not in resp):
            failures.append(f"{name}: {code.name} {resp!s:.300}")
        if code == OK and method == "Prefill" and resp.HasField("batch"):
            call(stub, "ClearCache", pb.ClearCacheRequest(id=resp.batch.id))
        live.alive()
        live.normal_request_ok()
        live.sentinel.step(live)
    assert failures == []
    assert call(stub, "Warmup", warm) == before  # same pool, same limits after failed Warmups


def test_a_2mb_prompt_with_small_truncate_costs_milliseconds(live: Live):
    sim = live.sim
    text = ("The quick brown fox jumps over the lazy dog. 深度学习 " * 40_000)[:2_000_000]
    r = sim.request("word " * 30, max_new_tokens=4, truncate=10)  # allocates 10 + 4 - 1 slots
    r.input_chunks.CopyFrom(text_input(text))
    r.inputs = text
    r.truncate = 10
    t = time.monotonic()
    gens, batch = sim.prefill(sim.batch([r]))
    elapsed = time.monotonic() - t
    want = sim.tokenizer(text, truncation=True, max_length=10)["input_ids"]
    solo = sim.request(sim.tokenizer.decode(want), max_new_tokens=1)
    assert elapsed < 0.5, f"Prefill of a 2 MB prompt with truncate=10 took {elapsed:.2f}s"
    assert len(gens) == 1 and batch is not None
    sim.clear(batch.id)
    sim.release(r.id)
    first = sim.run({0: [solo]})[solo.id].ids[0]
    assert gens[0].tokens.ids[0] == first  # the same 10 prompt tokens as tokenizing it all
    live.normal_request_ok()


# ---------------------------------------------------------------------------------- fuzzing
U32, U64 = 2**32 - 1, 2**64 - 1
def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """``one_of`` with weights (one_of drops repeated strategies)."""
    return st.sampled_from([i for i, (w, _) in enumerate(choices) for _ in range(w)]).flatmap(
        lambda i: choices[i][1]
    )


# A plausible request (what a correct router sends), then 0-2 faults from ADVERSARIAL.
SAMPLING = [  # (temperature, top_p, typical_p, repetition, frequency, top_k, do_sample, watermark)
    (1.0, 1.0, 1.0, 1.0, 0.0, 0, False, False),
    (0.7, 0.9, 1.0, 1.2, 0.5, 40, True, False),
    (1.3, 1.0, 0.8, 1.0, -1.0, 0, True, True),
]
plausible_request = st.builds(
    lambda rid, text, truncate, max_new, start, sampling, seed, top_n, logprobs, special, stop: {
        "id": rid, "text": text, "truncate": truncate, "max_new": max_new, "blocks": "valid",
        "start": start, "random_blocks": [], "cache_len": 0,
        **dict(zip(["temperature", "top_p", "typical_p", "repetition_penalty",
                    "frequency_penalty", "top_k", "do_sample", "watermark"], sampling)),
        "seed": seed, "top_n": top_n, "prefill_logprobs": logprobs,
        "add_special_tokens": special, "stop": stop, "grammar": "",
    },
    st.integers(100, 100_000),
    st.sampled_from(["Hello world", "def f(x):", "深度学习 is", "a", "word " * 30]),
    st.sampled_from([0, 0, 5, 40]),
    st.integers(1, 6),
    st.integers(1, FUZZ_BLOCKS - 8),
    st.sampled_from(SAMPLING),
    st.sampled_from([0, 42, U64]),
    st.sampled_from([0, 0, 3]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([[], [], ["a"], ["", "zz"]]),
)
bad_float = st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, 3e38, 2.5])
ADVERSARIAL = {
    "id": st.one_of(st.just("sentinel"), st.integers(100, 102), st.integers(0, U64)),
    "text": st.one_of(st.sampled_from(["", "word " * 300]), st.text(max_size=20)),
    "truncate": st.sampled_from([U32, 2**31, 1]),
    "max_new": st.sampled_from([0, 500, U32]),
    "blocks": st.sampled_from(["sentinel", "random", "beyond", "huge", "none", "short", "shifted"]),
    "random_blocks": st.lists(st.integers(0, U32), min_size=1, max_size=4),
    "cache_len": st.one_of(st.integers(1, 64), st.just(U32)),
    "temperature": bad_float, "top_p": bad_float, "typical_p": bad_float,
    "repetition_penalty": bad_float, "frequency_penalty": bad_float,
    "top_k": st.just(U32),
    "grammar": st.just("[a-z]"),
}
faults = st.lists(
    st.sampled_from(sorted(ADVERSARIAL)).flatmap(lambda k: st.tuples(st.just(k), ADVERSARIAL[k])),
    max_size=2,
)
request_spec = st.tuples(plausible_request, weighted((2, st.just([])), (1, faults))).map(
    lambda t: {**t[0], **dict(t[1]), **({"blocks": "random"} if any(
        k == "random_blocks" for k, _ in t[1]) else {})}
)
batch_ref = st.sampled_from(["made", "made", "made", "sentinel", 424_242])
prefill_op = st.tuples(
    st.just("prefill"),
    st.sampled_from([0] * 6 + ["made", "sentinel", 2**64 - 1]),  # 0: a fresh batch id
    st.lists(request_spec, min_size=1, max_size=3),
)

operation = weighted(
    (5, prefill_op),
    (4, st.tuples(st.just("decode"), st.sampled_from(
        ["made", "made", "made", "with sentinel", "dup", "unknown", "empty"]))),
    (2, st.tuples(st.just("filter"), batch_ref,
                  st.sampled_from(["subset", "subset", "dup", "unknown", "empty", "sentinel"]))),
    (1, st.tuples(st.just("clear"), st.one_of(st.just("made"), st.integers(0, U64)))),
    (1, st.tuples(st.just("warmup"), st.one_of(st.none(), st.integers(1, 300)),
                  st.one_of(st.none(), st.integers(0, 2**20)), st.integers(0, 128))),
    (1, st.tuples(st.just("health"))),
)


class Fuzzer:
    def __init__(self, live: Live) -> None:
        self.live = live
        self.made: dict[int, list[int]] = {}  # batches the fuzzer's RPCs left cached -> ids
        self.warmed = False
        self.batches = 0

    def next_batch(self) -> int:
        self.batches += 1
        return 500_000 + self.batches

    def batch_id(self, ref, data) -> int:
        if ref == "sentinel":
            return self.live.sentinel.batch_id
        if ref == "made":
            return data.draw(st.sampled_from(sorted(self.made))) if self.made else 123_456
        return ref

    def request(self, spec: dict) -> pb.Request:
        live, sim = self.live, self.live.sim
        bs = sim.info.block_size
        rid = live.sentinel.request_id if spec["id"] == "sentinel" else spec["id"]
        text = spec["text"]
        kw = {"truncation": True, "max_length": spec["truncate"]} if spec["truncate"] else {}
        n_prompt = len(sim.tokenizer(text, add_special_tokens=spec["add_special_tokens"], **kw)
                       ["input_ids"]) if text else 0
        need = max(n_prompt + min(spec["max_new"], 64) - 1, 1)
        n_blocks = -(-need // bs)
        mode = spec["blocks"]
        if mode == "sentinel":
            blocks = list(sim.blocks[live.sentinel.request_id].blocks)[:n_blocks]
        elif mode == "random":
            blocks = spec["random_blocks"]
        elif mode == "beyond":
            blocks = [live.num_blocks + i for i in range(n_blocks)]
        elif mode == "huge":
            blocks = list(range(spec["start"], spec["start"] + n_blocks)) + [U32]
        elif mode == "none":
            blocks = []
        else:
            blocks = list(range(spec["start"], min(spec["start"] + n_blocks, FUZZ_BLOCKS)))
        slots = [blocks[p // bs] * bs + p % bs for p in range(need) if p // bs < len(blocks)]
        slots = [s for s in slots if s <= U32]
        if mode == "short":
            slots = slots[:-1]
        elif mode == "shifted":
            slots = [s + 1 for s in slots]
        p = spec
        return pb.Request(
            id=rid, inputs=text, input_chunks=text_input(text), truncate=p["truncate"],
            parameters=pb.NextTokenChooserParameters(
                temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"],
                typical_p=p["typical_p"], do_sample=p["do_sample"], seed=p["seed"],
                repetition_penalty=p["repetition_penalty"],
                frequency_penalty=p["frequency_penalty"], watermark=p["watermark"],
                grammar=p["grammar"],
            ),
            stopping_parameters=pb.StoppingCriteriaParameters(
                max_new_tokens=p["max_new"], stop_sequences=p["stop"]),
            prefill_logprobs=p["prefill_logprobs"], top_n_tokens=p["top_n"],
            add_special_tokens=p["add_special_tokens"], blocks=blocks, slots=slots,
            cache_len=p["cache_len"],
        )

    def run(self, op, data) -> None:
        live, stub, s = self.live, self.live.stub, self.live.sentinel
        kind = op[0]
        if kind == "prefill":
            bid = self.batch_id(op[1], data) if op[1] != 0 else self.next_batch()
            request = pb.PrefillRequest(batch=pb.Batch(
                id=bid, requests=[self.request(spec) for spec in op[2]], size=len(op[2])))
            code, resp = call(stub, "Prefill", request)
        elif kind == "decode":
            mode = op[1]
            ids = data.draw(st.lists(st.sampled_from(sorted(self.made)), min_size=1, unique=True)
                            if self.made else st.just([]))
            if mode == "with sentinel":
                ids.insert(data.draw(st.integers(0, len(ids))), s.batch_id)
            elif mode == "dup":
                ids = ids + [data.draw(st.sampled_from(ids + [s.batch_id]))]
            elif mode == "unknown":
                ids = ids + [424_242]
            elif mode == "empty":
                ids = []
            code, resp = call(stub, "Decode", pb.DecodeRequest(
                batches=[pb.CachedBatch(id=i) for i in ids]))
            if code == OK:
                for i in ids:
                    self.made.pop(i, None)
        elif kind == "filter":
            bid = self.batch_id(op[1], data)
            known = self.made.get(bid, [s.request_id] if bid == s.batch_id else [1])
            mode = op[2]
            ids = data.draw(st.lists(st.sampled_from(known), min_size=1, unique=True))
            if mode == "dup":
                ids = ids + ids[:1]
            elif mode == "unknown":
                ids = ids + [data.draw(st.integers(0, U64))]
            elif mode == "empty":
                ids = []
            elif mode == "sentinel":
                ids = ids + [s.request_id]
            if bid == s.batch_id and s.request_id not in ids:
                ids.append(s.request_id)  # dropping the sentinel is legitimate, not a bug
            code, resp = call(stub, "FilterBatch", pb.FilterBatchRequest(
                batch_id=bid, request_ids=ids))
        elif kind == "clear":
            bid = self.batch_id(op[1], data)
            if bid == s.batch_id:
                return  # dropping the sentinel is legitimate
            code, resp = call(stub, "ClearCache", pb.ClearCacheRequest(id=bid))
            self.made.pop(bid, None)
        elif kind == "warmup":
            _, max_input, max_total, max_prefill = op
            try:  # (a max_total below a request's truncate cannot even be encoded)
                request = RouterSim.warmup_request(max_input, max_total, max(max_prefill, 1), None)
            except ValueError:
                return
            self.warmed = True
            code, resp = call(stub, "Warmup", request)
        else:
            code, resp = call(stub, "Health", pb.HealthRequest())
        assert code in CLEAR, f"{op}: {code.name}: {resp}"
        live.alive()
        if code == OK and kind in ("prefill", "decode", "filter"):
            s.follow(resp)
            batch = resp.batch if resp.HasField("batch") else None
            if batch is not None and s.request_id not in batch.request_ids:
                self.made[batch.id] = list(batch.request_ids)

    def cleanup(self) -> None:
        for bid in self.made:
            call(self.live.stub, "ClearCache", pb.ClearCacheRequest(id=bid))
        self.made = {}
        if self.warmed:
            sim = self.live.sim
            code, _ = call(self.live.stub, "Warmup", RouterSim.warmup_request(
                sim.max_input, sim.max_total, 256, None))
            assert code == OK


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(ops=st.lists(operation, min_size=1, max_size=5), data=st.data())
def test_fuzzed_rpcs_get_clear_statuses_and_corrupt_nothing(live: Live, ops, data):
    fuzzer = Fuzzer(live)
    try:
        for op in ops:
            fuzzer.run(op, data)
    finally:
        fuzzer.cleanup()
    live.sentinel.step(live)
    live.normal_request_ok()


def test_sentinel_survived_everything(live: Live):
    check_sentinel(live)
