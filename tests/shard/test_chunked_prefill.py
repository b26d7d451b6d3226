"""Chunked prefill through the router-like driver: ``support_chunking`` in Info, prompts cut by
``chunk_len`` and by the shard's own budget, ``Prefill(batch, cached_batch)`` running the running
batch's decode tokens in the same pass as the new prompt chunk.

The oracle is each request's solo run on the same shard without chunking (whole prompt in one
pass): tokens equal, logprobs (and prompt logprobs) within 1e-4 in float32.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid

import pytest
from router_sim import RouterSim, start_shard, text_of_tokens, words
from transformers import AutoTokenizer

STREAMS = 8

# (model fixture, long prompt tokens, max_batch_prefill_tokens, prefix caching)
CASES = [
    pytest.param(("bloom_dir", 3000, 512, False), id="bloom-3000-512"),
    pytest.param(("bloom_dir", 1200, 256, True), id="bloom-1200-256-prefix", marks=pytest.mark.slow),
    pytest.param(("gemma_mqa_dir", 1500, 256, False), id="gemma-1500-256", marks=pytest.mark.slow),
    # the NPU path through the emulation: MIXED passes go to _npu_paged_attention_splitfuse
    pytest.param(("gemma_mqa_dir", 1000, 256, False, "npu-emulated", "bfloat16"),
                 id="gemma-npu-emulated-bf16", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model, n_long, max_prefill, prefix, *mode = request.param
    device, dtype = mode or ("cpu", "float32")
    model_dir = request.getfixturevalue(model)
    uds = f"{tempfile.gettempdir()}/tgi-test-{uuid.uuid4().hex[:8]}"
    proc = start_shard(model_dir, uds, extra_args=["--device", device, "--dtype", dtype],
                       env={"PREFIX_CACHING": "1" if prefix else "0"})
    tokenizer = AutoTokenizer.from_pretrained(model_dir, truncation_side="left")
    sim = RouterSim(f"{uds}-0", tokenizer, prefix_caching=prefix)
    info = sim.startup(max_input=n_long, max_total=n_long + 64, max_prefill=max_prefill)
    assert info.support_chunking and info.use_prefix_caching == prefix
    yield sim, n_long, max_prefill
    proc.terminate()
    assert proc.wait(30) == 0, proc.stderr.read()
    assert "reference (non-fused) path" not in proc.stdout.read()
    assert not os.path.exists(f"{uds}-0")


def close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol for x, y in zip(a, b)
    )


def test_long_prompt_arrives_while_streams_decode(case):
    sim, n_long, max_prefill = case
    streams = [dict(text=f"stream {i} " + " ".join(words(i, 8)), max_new_tokens=48, ignore_eos=True)
               for i in range(STREAMS)]
    # sampled and greedy streams: a seeded stream must draw exactly once per generated token
    streams[1].update(do_sample=True, seed=11, temperature=0.9, top_k=20)
    streams[2].update(prefill_logprobs=True, top_n=2)
    text = text_of_tokens(sim.tokenizer, 100, n_long)
    long = dict(text=text, max_new_tokens=6, prefill_logprobs=not sim.prefix_caching, top_n=3)

    def request(spec):
        spec = dict(spec)
        return sim.request(spec.pop("text"), **spec)

    if sim.prefix_caching:
        # the first 40% of the long prompt is cached: the chunked run reuses it (cache_len > 0)
        head = text_of_tokens(sim.tokenizer, 100, int(0.4 * n_long))
        assert text.startswith(head)
        warm = request(dict(text=head, max_new_tokens=1))
        sim.run({0: [warm]})

    stream_reqs = [request(s) for s in streams]
    long_req = request(long)
    if sim.prefix_caching:
        assert long_req.cache_len > 0
    assert sim.prompt_lens[long_req.id] - long_req.cache_len > 2 * max_prefill  # several chunks
    results, trace = sim.run_chunked({0: stream_reqs, 3: [long_req]}, max_prefill=max_prefill)

    # solo runs afterwards (with prefix caching the long prompt is then all cached: its solo
    # run computes one position, over the same KV)
    solo = {}
    for name, spec in [*((f"s{i}", s) for i, s in enumerate(streams)), ("long", long)]:
        req = request(spec)
        solo[name] = sim.run({0: [req]})[req.id]

    for i, r in enumerate(stream_reqs):
        got, want = results[r.id], solo[f"s{i}"]
        assert got.ids == want.ids, f"stream {i}"
        assert close(got.logprobs, want.logprobs), f"stream {i}"
        assert got.top_tokens == want.top_tokens and got.generated_text == want.generated_text
        if want.prefill is not None:
            assert close(list(got.prefill.logprobs), list(want.prefill.logprobs))
    got, want = results[long_req.id], solo["long"]
    assert got.ids == want.ids and close(got.logprobs, want.logprobs)
    assert got.top_tokens == want.top_tokens
    assert all(close(a, b) for a, b in zip(got.top_logprobs, want.top_logprobs))
    if want.prefill is not None:  # each prompt position's logprob exactly once, over the chunks
        assert list(got.prefill.ids) == list(want.prefill.ids)
        assert close(list(got.prefill.logprobs), list(want.prefill.logprobs))

    # The prompt took several passes, and every running stream got a token in each of them.
    arrival = next(i for i, (name, _) in enumerate(trace) if name == "prefill" and i > 0)
    first = next(i for i, (_, ids) in enumerate(trace) if long_req.id in ids)
    assert first - arrival >= 2
    running = {r.id for r in stream_reqs}
    for name, ids in trace[arrival : first + 1]:
        assert running <= ids, (name, running - ids)


def test_shard_cuts_the_next_chunks_itself(case):
    """Only the first chunk is cut by the router (chunk_len); Decode runs the next ones, each
    within the prefill budget, and the prompt's first token comes with its last chunk."""
    sim, n_long, max_prefill = case
    text = text_of_tokens(sim.tokenizer, 7, n_long)
    req = sim.request(text, max_new_tokens=3)
    results, trace = sim.run_chunked({0: [req]}, max_prefill=max_prefill)
    solo_req = sim.request(text, max_new_tokens=3)
    want = sim.run({0: [solo_req]})[solo_req.id]
    assert results[req.id].ids == want.ids and close(results[req.id].logprobs, want.logprobs)
    passes = next(i for i, (_, ids) in enumerate(trace) if req.id in ids) + 1
    assert passes >= -(-(sim.prompt_lens[req.id] - req.cache_len) // max_prefill)


def test_chunk_len_is_checked(case):
    sim, _, _ = case
    import grpc

    req = sim.request("a short prompt here", max_new_tokens=2)
    req.chunk_len = 10_000
    with pytest.raises(grpc.RpcError) as err:
        sim.prefill(sim.batch([req]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"request {req.id}: chunk_len=10000 must be in [1, " in err.value.details()
    sim.release(req.id)


def test_prefill_chunking_0_turns_it_off(bloom_dir):
    """PREFILL_CHUNKING=0: Info says no chunking, and chunk_len / cached_batch are refused with
    a message naming what to send instead."""
    from router_sim import batch_requests, plain

    from tgi_npu_backend.config import ServerConfig
    from tgi_npu_backend.errors import InvalidRequestError
    from tgi_npu_backend.load import build_generator

    assert ServerConfig.from_cli(model_id=str(bloom_dir), env={}).prefill_chunking
    config = ServerConfig.from_cli(
        model_id=str(bloom_dir), env={"PREFILL_CHUNKING": "0", "TGI_NPU_KV_CACHE_FRACTION": "0.01"}
    )
    gen = build_generator(config)
    assert not gen.info().support_chunking
    tokenizer = AutoTokenizer.from_pretrained(bloom_dir, truncation_side="left")
    sim = RouterSim("unused", tokenizer)
    warm = sim.warmup_request(None, None, 64, None)
    supported, sim.max_input, sim.max_total = gen.warmup(batch_requests(warm.batch), None, 64, None)
    assert sim.max_input <= 64  # without chunking a prompt must fit one prefill pass
    from tgi_npu_backend.launcher.allocator import BlockAllocator

    sim.allocator = BlockAllocator(supported, gen.block_size)
    first = sim.request("the first prompt", max_new_tokens=4)
    step = gen.prefill(*plain(sim.batch([first])))
    cut = sim.request("a prompt of a few tokens", max_new_tokens=2)
    cut.chunk_len = 2
    with pytest.raises(InvalidRequestError, match="PREFILL_CHUNKING=0"):
        gen.prefill(*plain(sim.batch([cut])))
    other = sim.request("another prompt", max_new_tokens=2)
    with pytest.raises(InvalidRequestError, match="cached_batch needs chunked prefill"):
        gen.prefill(*plain(sim.batch([other])), step.batch.id)
    assert gen.decode([step.batch.id]).generations  # the running batch is untouched
