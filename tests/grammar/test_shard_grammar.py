"""Grammar requests through a real shard process, driven as the router drives it
(``tests/router_sim.py``): every output of 50 JSON schemas and 50 regexes validates, greedy and
sampled; grammar requests next to free ones, joining mid-stream and cancelled by FilterBatch,
equal their solo runs; free requests equal a run that has no grammar request at all; a bad
grammar fails its Prefill with INVALID_ARGUMENT naming the request while the batches in flight
continue. Prefix caching is on (RadixAllocator), so repeated prompts reuse cached KV."""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid

import grpc
import jsonschema
import pytest
from transformers import AutoTokenizer

import cases
from router_sim import RouterSim, start_shard
from tgi_npu_backend.pb import generate_pb2 as pb

KIND = {"json": pb.GRAMMAR_TYPE_JSON, "regex": pb.GRAMMAR_TYPE_REGEX}
SAMPLED = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def shard(bloom_dir):
    uds = f"{tempfile.gettempdir()}/tgi-grammar-{uuid.uuid4().hex[:8]}"
    proc = start_shard(bloom_dir, uds, env={"PREFIX_CACHING": "1"})
    sim = RouterSim(f"{uds}-0", AutoTokenizer.from_pretrained(bloom_dir, truncation_side="left"),
                    prefix_caching=True)
    sim.startup(max_prefill=4096)
    yield sim
    proc.terminate()
    assert proc.wait(30) == 0, proc.stderr.read()


def grammar(kind: str, value) -> dict:
    return dict(grammar=value if isinstance(value, str) else json.dumps(value), grammar_type=KIND[kind])


def check(kind: str, value: str, text: str) -> None:
    if kind == "regex":
        assert re.fullmatch(value, text), (value, text)
        for schema, regex in cases.ROUTER_SCHEMA_REGEXES:
            if regex == value:  # what the v3 router sends for a JSON schema: it parses
                parsed = json.loads(text)
                assert set(schema["required"]) <= set(parsed), (schema, text)
    else:
        jsonschema.validate(json.loads(text), json.loads(value))


def validity_run(shard: RouterSim, modes: list[str]) -> None:
    """Every grammar of ``cases`` once per mode, all in one batch."""
    grammars = [("json", json.dumps(s)) for s in cases.json_schemas()] + [("regex", r) for r in cases.regexes()]
    runs = [(g, m) for g in grammars for m in modes] if len(modes) > 1 else [(g, modes[0]) for g in grammars]
    requests = []
    for i, ((kind, value), mode) in enumerate(runs):
        sampled = mode == "sampled" or (mode == "alternate" and i % 2)
        sampling = dict(SAMPLED, seed=i) if sampled else {}
        requests.append(shard.request(f"Request {i}: answer in the format asked.", max_new_tokens=200,
                                      **grammar(kind, value), **sampling))
    results = shard.run({0: requests})
    unfinished = []
    for ((kind, value), _), r in zip(runs, requests):
        res = results[r.id]
        if res.finish_reason != pb.FINISH_REASON_EOS_TOKEN:
            unfinished.append((value, res.generated_text))
            continue
        check(kind, value, res.generated_text)
        assert res.ids[-1] == shard.tokenizer.eos_token_id  # EOS only where the grammar accepts
    assert not unfinished, unfinished


def test_every_output_validates(shard: RouterSim):
    """The 100 grammars in one batch, even ones greedy, odd ones sampled."""
    validity_run(shard, ["alternate"])


@pytest.mark.slow
def test_every_output_validates_greedy_and_sampled(shard: RouterSim):
    """All 100 grammars both ways: 200 requests in one batch."""
    validity_run(shard, ["greedy", "sampled"])


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]},
    },
    "required": ["name", "age", "pet"],
}
LEVEL = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5},
        "level": {"enum": ["low", "high", 3]},
    },
    "required": ["ok", "level"],
}


# Two KV blocks of shared prompt: the radix allocator finds them cached from the second request on.
PREAMBLE = "You are a careful assistant. Answer only in the format you are asked for, with no other text. "


def specs() -> dict[str, dict]:
    sp = {
        "json_greedy": dict(text="Give me a record", max_new_tokens=120, **grammar("json", PERSON)),
        "free_greedy": dict(text="The quick brown fox", max_new_tokens=20),
        "regex_sampled": dict(text="When?", max_new_tokens=40, seed=3, **SAMPLED,
                              **grammar("regex", r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]")),
        "json_sampled": dict(text="Another record", max_new_tokens=120, seed=11, **SAMPLED,
                             **grammar("json", LEVEL)),
        "free_sampled": dict(text="Once upon a time", max_new_tokens=25, seed=42, **SAMPLED),
        "free_penalties": dict(text="numbers 0 1 2 3", max_new_tokens=15, frequency_penalty=0.5,
                               typical_p=0.9, do_sample=True, seed=7),
        "regex_cancelled": dict(text="Choose", max_new_tokens=60,
                                **grammar("regex", "[a-z]{3,6}( [a-z]{3,6}){1,3}")),
        "router_regex": dict(text="As JSON", max_new_tokens=120, top_n=2,
                             **grammar("regex", cases.ROUTER_SCHEMA_REGEXES[1][1])),
    }
    for spec in sp.values():
        spec["text"] = PREAMBLE + spec["text"]
    return sp


def run_plan(sim: RouterSim, chosen: list[str], between=None):
    sp = {k: dict(v) for k, v in specs().items() if k in chosen}
    reqs = {k: sim.request(v.pop("text"), **v) for k, v in sp.items()}
    plan = {0: [reqs[k] for k in ("json_greedy", "free_greedy", "regex_cancelled", "free_penalties") if k in reqs],
            2: [reqs[k] for k in ("regex_sampled", "free_sampled") if k in reqs],
            4: [reqs[k] for k in ("json_sampled", "router_regex") if k in reqs]}
    cancel = {5: [reqs["regex_cancelled"].id]} if "regex_cancelled" in reqs else {}
    got = sim.run(plan, cancel=cancel, between=between)
    return {k: got[r.id] for k, r in reqs.items()}


def alone(sim: RouterSim, name: str):
    spec = dict(specs()[name])
    req = sim.request(spec.pop("text"), **spec)
    return sim.run({0: [req]})[req.id]


def same(x, y, cancelled: bool = False, exact: bool = False):
    if cancelled:  # a cancelled request's tokens are a prefix of its solo run
        assert x.ids == y.ids[: len(x.ids)] and x.generated_text is None
        return
    assert x.ids == y.ids
    assert x.generated_text == y.generated_text and x.finish_reason == y.finish_reason
    assert x.top_tokens == y.top_tokens
    if exact:
        assert x.logprobs == y.logprobs
    else:
        assert all(abs(a - b) < 1e-4 for a, b in zip(x.logprobs, y.logprobs))


@pytest.fixture(scope="module")
def mixed(shard: RouterSim):
    """Grammar and free requests in one changing batch: three join at step 0, two at step 2
    (their batch concatenated with the running one), two at step 4; one is cancelled at 5."""
    return run_plan(shard, list(specs()))


def test_mixed_batches_equal_solo_runs(shard: RouterSim, mixed):
    names = list(specs())
    for name in names:
        same(mixed[name], alone(shard, name), cancelled=(name == "regex_cancelled"))
    for name in ("json_greedy", "json_sampled", "regex_sampled", "router_regex"):
        res = mixed[name]
        assert res.finish_reason == pb.FINISH_REASON_EOS_TOKEN
        spec = specs()[name]
        check("json" if spec["grammar_type"] == pb.GRAMMAR_TYPE_JSON else "regex", spec["grammar"], res.generated_text)
    # TGI's convention: logprobs of the masked distribution; top tokens only allowed ones
    top = mixed["router_regex"]
    assert all(lp > float("-inf") for lp in top.logprobs)
    assert max(shard.cache_lens.values()) > 0, "a prompt's KV came from the prefix cache"


def test_free_requests_equal_a_run_without_grammar_requests(shard: RouterSim, mixed):
    free = ["free_greedy", "free_sampled", "free_penalties"]
    plain = run_plan(shard, free)
    for name in free:
        same(mixed[name], plain[name])


def test_bad_grammar_fails_its_prefill_and_batches_in_flight_continue(shard: RouterSim, mixed):
    refused, bad_ids = [], []

    def bad_prefill(step: int) -> None:
        if step != 3:
            return
        good = shard.request("fine", max_new_tokens=5)
        bad = shard.request("broken", max_new_tokens=5, **grammar("json", '{"type": "object", "properties": {"a": {"type": "strng"}}}'))
        bad_ids.append(bad.id)
        with pytest.raises(grpc.RpcError) as info:
            shard.prefill(shard.batch([good, bad]))
        refused.append(info.value)
        shard.release(good.id)
        shard.release(bad.id)
        with pytest.raises(grpc.RpcError) as info:
            shard.prefill(shard.batch([shard.request("also broken", max_new_tokens=5, **grammar("regex", "(a"))]))
        refused.append(info.value)
        shard.release(shard.next_request_id - 1)

    interrupted = run_plan(shard, list(specs()), between=bad_prefill)
    for name in specs():
        same(interrupted[name], mixed[name], cancelled=(name == "regex_cancelled"))
    assert [e.code() for e in refused] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert f"request {bad_ids[0]}: " in refused[0].details()
    assert "Invalid type: strng" in refused[0].details()
    assert "unclosed group" in refused[1].details()


def test_chunked_prefill_keeps_each_grammar(shard: RouterSim):
    """A grammar request whose long prompt takes several passes (chunked prefill) while grammar
    streams decode beside it: the streams get a token every pass, the long one's grammar starts
    with its first token, and all equal their solo runs."""
    sp = specs()
    streams = [sp["json_greedy"], sp["regex_sampled"], sp["free_greedy"]]
    long = dict(text=PREAMBLE * 4 + "Now the record:", max_new_tokens=120, seed=5, **SAMPLED,
                **grammar("json", LEVEL))

    def request(spec):
        spec = dict(spec)
        return shard.request(spec.pop("text"), **spec)

    stream_reqs = [request(s) for s in streams]
    long_req = request(long)
    results, trace = shard.run_chunked({0: stream_reqs, 2: [long_req]}, max_prefill=64)
    passes = [ids for _, ids in trace]
    first = next(i for i, ids in enumerate(passes) if long_req.id in ids)
    arrival = next(i for i, (name, _) in enumerate(trace) if name == "prefill" and i > 0)
    # the router cut its first chunk (64-token budget); the shard ran the rest in a later pass
    assert first > arrival and long_req.id not in passes[arrival], "the long prompt took several passes"
    for spec, req in [*zip(streams, stream_reqs), (long, long_req)]:
        solo = request(spec)
        same(results[req.id], shard.run({0: [solo]})[solo.id])
    res = results[long_req.id]
    assert res.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    check("json", json.dumps(LEVEL), res.generated_text)
