"""The shard started through its CLI and driven over its Unix socket the way TGI's v3 router does.

Oracle: every request served in a busy, changing batch (joining mid-stream, neighbours cancelled,
stop sequences, truncation, seeded sampling, health probes in between) produces exactly what it
produces when served alone.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid

import grpc
import pytest
from transformers import AutoTokenizer

from router_sim import RouterSim, start_shard
from served_equal import FLOAT32_TOLERANCE, logprob_tolerance, same_top_tokens
from tgi_npu_backend.launcher.allocator import BlockAllocator
from tgi_npu_backend.pb import generate_pb2 as pb

MODELS = ["bloom_dir", "gemma_mqa_dir"]
# (device, dtype): the CPU path, and the NPU path through the torch_npu emulation in both half
# types (BLOOM in fp16 as MindIE ships it, Gemma in bf16 as TGI defaults it).
MODES = {
    "bloom_dir": [("cpu", "float32"), ("npu-emulated", "float16")],
    "gemma_mqa_dir": [("cpu", "float32"), ("npu-emulated", "bfloat16")],
}
PARAMS = [(m, d, t) for m in MODELS for d, t in MODES[m]]


@pytest.fixture(scope="module", params=PARAMS, ids=[f"{m[:-4]}-{d}" for m, d, _ in PARAMS])
def shard(request):
    model, device, dtype = request.param
    model_dir = request.getfixturevalue(model)
    uds = f"{tempfile.gettempdir()}/tgi-test-{uuid.uuid4().hex[:8]}"
    # The launcher's defaults for head_dim 64/128/256 models: the shard reports prefix caching
    # (this RouterSim still allocates without reuse: cache_len = 0 is always valid).
    proc = start_shard(
        model_dir, uds, extra_args=["--device", device, "--dtype", dtype],
        env={"ATTENTION": "flashinfer", "PREFIX_CACHING": "true"},
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, truncation_side="left")
    sim = RouterSim(f"{uds}-0", tokenizer)
    sim.mode = (device, dtype)
    sim.startup(max_input=256, max_prefill=256)
    yield sim
    proc.terminate()
    assert proc.wait(30) == 0, proc.stderr.read()
    assert not os.path.exists(f"{uds}-0"), "the socket is removed on shutdown"
    # On the emulated NPU every kernel ran fused: no "runs the reference path" warning.
    assert "reference (non-fused) path" not in proc.stdout.read()


def specs(sim: RouterSim) -> dict[str, dict]:
    return {
        "a": dict(text="The quick brown fox", max_new_tokens=20),
        "b": dict(text="Hello 深度学习", max_new_tokens=12, top_n=3, prefill_logprobs=True),
        "c": dict(text="def add(a, b):", max_new_tokens=10),
        "d": dict(text="Once upon a time", max_new_tokens=30),
        "f": dict(text="Pour déguster un ortolan, il faut tout d'abord", truncate=5, max_new_tokens=8,
                  prefill_logprobs=True),
        "g": dict(text="Ascend NPU paged", max_new_tokens=12, do_sample=True, seed=42, temperature=0.8,
                  top_k=50, top_p=0.95, repetition_penalty=1.3),
        "h": dict(text="numbers 0 1 2 3", max_new_tokens=10, do_sample=True, seed=7, watermark=True,
                  frequency_penalty=0.5, typical_p=0.9),
    }


def alone(sim: RouterSim, spec: dict):
    spec = dict(spec)
    req = sim.request(spec.pop("text"), **spec)
    return sim.run({0: [req]})[req.id]


def same(x, y, cancelled: bool = False, tol: float = FLOAT32_TOLERANCE):
    if cancelled:  # a cancelled request's tokens are a prefix of its solo run
        assert x.ids == y.ids[: len(x.ids)] and x.generated_text is None
        return
    assert x.ids == y.ids
    assert x.texts == y.texts
    assert x.generated_text == y.generated_text
    assert x.finish_reason == y.finish_reason
    assert x.seed == y.seed
    same_top_tokens(x.top_tokens, x.top_logprobs, y.top_tokens, y.top_logprobs, tol)
    for a, b in zip(x.logprobs, y.logprobs):
        assert abs(a - b) < tol
    assert (x.prefill is None) == (y.prefill is None)
    if x.prefill is not None:
        assert list(x.prefill.ids) == list(y.prefill.ids)


def test_info_and_discovery(shard: RouterSim):
    info = shard.info
    assert info.block_size >= 1 and not info.requires_padding
    assert info.support_chunking and info.use_prefix_caching  # PREFIX_CACHING=true, PREFILL_CHUNKING unset
    device, dtype = shard.mode
    assert info.dtype == f"torch.{dtype}" and info.device_type == device
    # the backend's block size: 16 on CPU, 128 on NPU (head_dim <= 128)
    assert info.block_size == (16 if device == "cpu" else 128)
    assert shard.urls == [f"unix://{shard.master_socket}"]  # every rank, rank 0 included


def test_requests_in_a_changing_batch_match_their_solo_runs(shard: RouterSim):
    sp = specs(shard)
    solo = {k: alone(shard, v) for k, v in sp.items()}
    # a stop sequence taken from "a"'s own output: stop sequences are matched at the end of the
    # text streamed so far, so it ends where one of its tokens ends
    prefixes = ["".join(solo["a"].texts[:k]) for k in range(3, len(solo["a"].texts))]
    stop = next(p[-3:] for p in prefixes if len(p) >= 3 and "\ufffd" not in p[-3:])
    sp["e"] = dict(text="The quick brown fox", max_new_tokens=20, stop=[stop])
    solo["e"] = alone(shard, sp["e"])
    assert solo["e"].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert solo["e"].generated_text.endswith(stop) and len(solo["e"].ids) < len(solo["a"].ids)
    assert solo["g"].seed == 42 and solo["a"].seed is None  # seed reported for sampled requests only

    free_before = shard.allocator.free_blocks
    reqs = {}
    for k, v in sp.items():
        v = dict(v)
        reqs[k] = shard.request(v.pop("text"), **v)
    plan = {0: [reqs[k] for k in "abde"], 2: [reqs["c"], reqs["f"]], 4: [reqs["g"], reqs["h"]]}
    got = shard.run(plan, cancel={3: [reqs["d"].id]})
    for k, req in reqs.items():
        same(got[req.id], solo[k], cancelled=(k == "d"), tol=logprob_tolerance(shard.info.dtype))
    assert shard.allocator.free_blocks == free_before, "every block came back"


def test_stream_pieces_join_to_generated_text(shard: RouterSim):
    for text in ["Hello 深度学习", "Emoji: 🙂 🚀", "The quick brown fox"]:
        res = alone(shard, dict(text=text, max_new_tokens=24, ignore_eos=True))
        special = set(shard.tokenizer.all_special_ids)
        joined = "".join(t for i, t in zip(res.ids, res.texts) if i not in special)
        assert joined == res.generated_text
        assert res.generated_tokens == len(res.ids) == 24


def test_prefill_tokens_only_when_asked_and_left_truncated(shard: RouterSim):
    text = "Pour déguster un ortolan, il faut tout d'abord"
    res = alone(shard, dict(text=text, truncate=5, max_new_tokens=3, prefill_logprobs=True))
    expected = shard.tokenizer(text, truncation=True, max_length=5)["input_ids"]
    assert list(res.prefill.ids) == expected
    assert math.isnan(res.prefill.logprobs[0]) and all(lp <= 0 for lp in res.prefill.logprobs[1:])
    assert len(res.prefill.texts) == len(expected)
    assert alone(shard, dict(text=text, max_new_tokens=3)).prefill is None


def test_top_n_tokens_include_the_chosen_token(shard: RouterSim):
    res = alone(shard, dict(text="The quick brown fox", max_new_tokens=5, top_n=4))
    assert len(res.top_tokens) == 5
    for tok, top in zip(res.ids, res.top_tokens):
        assert len(top) >= 4 and tok == top[0]  # greedy: the chosen token is the best


def test_health_probe_and_unknown_adapter_between_steps(shard: RouterSim):
    solo = alone(shard, dict(text="Once upon a time", max_new_tokens=8))
    req = shard.request("Once upon a time", max_new_tokens=8)
    req.adapter_id = "no-such-adapter"  # must fall back to the base model

    def probe(step):
        if step in (1, 3):
            gens, probe_batch = shard.health_probe()  # writes block 0: must not disturb the batch
            assert len(gens) == 1 and probe_batch is None
            shard._all("Health", pb.HealthRequest())
            assert shard._all("Info", pb.InfoRequest())[-1] == shard.info

    got = shard.run({0: [req]}, between=probe)[req.id]
    same(got, solo)


def _code(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value.code(), info.value.details()


def test_bad_input_is_rejected_and_nothing_cached_is_lost(shard: RouterSim):
    stub = shard.stubs[0]
    solo = alone(shard, dict(text="The quick brown fox", max_new_tokens=10))
    req = shard.request("The quick brown fox", max_new_tokens=10)
    gens, batch = shard.prefill(shard.batch([req]))
    ids = [gens[0].tokens.ids[0]]
    gens, batch = shard.decode([batch])
    ids.append(gens[0].tokens.ids[0])

    code, msg = _code(stub.Decode, pb.DecodeRequest(batches=[pb.CachedBatch(id=987654)]))
    assert code == grpc.StatusCode.NOT_FOUND and "987654" in msg
    code, _ = _code(stub.Decode, pb.DecodeRequest(batches=[batch, pb.CachedBatch(id=987654)]))
    assert code == grpc.StatusCode.NOT_FOUND  # the valid batch is still cached (checked below)
    code, _ = _code(stub.FilterBatch, pb.FilterBatchRequest(batch_id=987654, request_ids=[1]))
    assert code == grpc.StatusCode.NOT_FOUND
    stub.ClearCache(pb.ClearCacheRequest(id=987654))  # unknown id: no-op

    def bad(mutate, expect):
        r = shard.request("Hello there", max_new_tokens=4)
        mutate(r)
        code, msg = _code(stub.Prefill, pb.PrefillRequest(batch=shard.batch([r])))
        shard.release(r.id)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, msg
        assert f"request {r.id}" in msg and expect in msg, msg

    bad(lambda r: r.ClearField("slots"), "slots")
    bad(lambda r: r.slots.__setitem__(0, r.slots[0] + 1), "not in block")
    bad(lambda r: (r.input_chunks.chunks[0].__setattr__("text", ""), r.__setattr__("inputs", "")), "empty")
    bad(lambda r: r.parameters.__setattr__("temperature", 0.0), "temperature")
    bad(lambda r: r.parameters.__setattr__("grammar", "[a-z]+"), "grammar")
    bad(lambda r: r.stopping_parameters.__setattr__("max_new_tokens", 0), "max_new_tokens")
    long_text = "The quick brown fox jumps " * 100
    bad(lambda r: (r.input_chunks.chunks[0].__setattr__("text", long_text), r.__setattr__("truncate", 0)),
        "max-input-tokens")

    while batch is not None:  # the original batch continues exactly as it would have
        gens, batch = shard.decode([batch])
        ids.append(gens[0].tokens.ids[0])
    shard.release(req.id)
    assert ids == solo.ids


def test_warmup_echoes_limits_and_is_not_cached(shard: RouterSim):
    stub = shard.stubs[0]
    req = shard.warmup_request(max_input=40, max_total=64, max_prefill=128, max_batch_size=None)
    assert len(req.batch.requests) == 4 and all(r.id == 0 for r in req.batch.requests)
    resp = stub.Warmup(req)
    assert (resp.max_input_tokens, resp.max_total_tokens) == (40, 64)
    assert resp.max_supported_total_tokens >= 64
    code, _ = _code(stub.Decode, pb.DecodeRequest(batches=[pb.CachedBatch(id=0)]))
    assert code == grpc.StatusCode.NOT_FOUND  # the warmup batch was not kept
    resp = stub.Warmup(shard.warmup_request(None, None, 256, None))  # back to shard-chosen limits
    assert resp.max_input_tokens < resp.max_total_tokens <= resp.max_supported_total_tokens
    shard.max_input = resp.max_input_tokens
    shard.allocator = BlockAllocator(resp.max_supported_total_tokens, shard.info.block_size)
    assert alone(shard, dict(text="Hello", max_new_tokens=3)).generated_tokens == 3


def test_add_special_tokens_as_sent(shard: RouterSim):
    """The shard tokenizes as the router does: BOS (Gemma) only when add_special_tokens is set."""
    text = "Hello there"
    for add in (True, False):
        res = alone(shard, dict(text=text, max_new_tokens=2, prefill_logprobs=True, add_special_tokens=add))
        assert list(res.prefill.ids) == shard.tokenizer(text, add_special_tokens=add)["input_ids"]
    if shard.tokenizer.bos_token == "<bos>":  # Gemma's tokenizer adds BOS; BLOOM's adds nothing
        res = alone(shard, dict(text=text, max_new_tokens=2, prefill_logprobs=True))
        assert res.prefill.ids[0] == shard.tokenizer.bos_token_id


def test_timings_and_concatenation(shard: RouterSim):
    a = shard.request("The quick brown fox", max_new_tokens=4)
    b = shard.request("Hello", max_new_tokens=4)
    stub = shard.stubs[0]
    first = stub.Prefill(pb.PrefillRequest(batch=shard.batch([a])))
    second = stub.Prefill(pb.PrefillRequest(batch=shard.batch([b])))
    assert not first.HasField("concat_ns")
    assert 0 < first.forward_ns and 0 < first.decode_ns and first.total_ns >= first.forward_ns + first.decode_ns
    resp = stub.Decode(pb.DecodeRequest(batches=[first.batch, second.batch]))
    assert resp.HasField("concat_ns") and resp.batch.id == first.batch.id  # the first id is kept
    assert list(resp.batch.request_ids) == [a.id, b.id] and resp.batch.size == 2
    assert resp.batch.current_tokens == 2 and resp.batch.max_tokens == (len(a.blocks) + len(b.blocks)) * shard.info.block_size
    shard.clear(resp.batch.id)
    shard.release(a.id)
    shard.release(b.id)
