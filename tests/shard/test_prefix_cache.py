"""Prefix caching: the shard started through its CLI with PREFIX_CACHING=1, driven like TGI's v3
router with the radix allocator (Request.cache_len > 0 for prompts whose block-aligned prefix is
still in the KV pool).

Oracle: every request gives the same tokens (and logprobs within 1e-4) as the same request on a
shard started with PREFIX_CACHING=0, served by the simple allocator (cache_len always 0).
"""

from __future__ import annotations

import math
import tempfile
import uuid

import pytest
from transformers import AutoTokenizer

from router_sim import RouterSim, start_shard
from tgi_npu_backend.launcher.radix import RadixAllocator

SYSTEM = (
    "You are a careful assistant for an airline. Answer in one short sentence, cite the fare "
    "rules when they apply, never invent flight numbers, and ask for the booking reference "
    "before you change anything. "
)
QUESTIONS = [
    "Can I bring a bicycle?",
    "How late can I check in?",
    "My flight was cancelled, what now?",
    "Is there wifi on board?",
]


# The CPU path, and the NPU path through the torch_npu emulation (block size 16 so that these
# ~60-token prefixes fill whole blocks; the NPU ops take any multiple of 16 up to 128).
PARAMS = [
    ("gemma_mqa_dir", []),
    ("bloom_dir", []),
    ("gemma_mqa_dir", ["--device", "npu-emulated", "--dtype", "bfloat16", "--block-size", "16"]),
    ("bloom_dir", ["--device", "npu-emulated", "--dtype", "float16", "--block-size", "16"]),
]


@pytest.fixture(
    scope="module", params=PARAMS, ids=[m[:-4] + ("-npu-emulated" if a else "") for m, a in PARAMS]
)
def sims(request):
    model, extra = request.param
    model_dir = request.getfixturevalue(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, truncation_side="left")
    procs, out = [], []
    for on in (True, False):
        uds = f"{tempfile.gettempdir()}/tgi-pc-{uuid.uuid4().hex[:8]}"
        procs.append(start_shard(
            model_dir, uds, extra_args=extra, env={"PREFIX_CACHING": "1" if on else "0"}
        ))
        sim = RouterSim(f"{uds}-0", tokenizer, prefix_caching=on)
        sim.startup(max_input=512, max_prefill=512)
        out.append(sim)
    cached, plain = out
    assert cached.info.use_prefix_caching and not plain.info.use_prefix_caching
    assert cached.info.support_chunking  # PREFILL_CHUNKING unset: on, as TGI
    assert len(tokenizer(SYSTEM)["input_ids"]) >= 60
    yield cached, plain
    for p in procs:
        p.terminate()
        assert p.wait(30) == 0, p.stderr.read()


def fresh(sim: RouterSim, tokens: int | None = None) -> RadixAllocator:
    """An empty trie (optionally a smaller pool than the shard's: the router may use fewer)."""
    sim.allocator = RadixAllocator(tokens or sim.max_supported, sim.info.block_size)
    return sim.allocator


def serve(sim: RouterSim, plan: dict[int, list[dict]]):
    """Run ``plan`` (step -> request specs); results and cache_lens in spec order."""
    reqs = {step: [sim.request(**spec) for spec in specs] for step, specs in plan.items()}
    res = sim.run(reqs)
    ordered = [r for step in sorted(reqs) for r in reqs[step]]
    return [res[r.id] for r in ordered], [sim.cache_lens[r.id] for r in ordered]


def same(x, y) -> None:
    assert x.ids == y.ids and x.generated_text == y.generated_text
    assert max(abs(a - b) for a, b in zip(x.logprobs, y.logprobs)) < 1e-4
    assert (x.prefill is None) == (y.prefill is None)


def spec(text: str, **kw) -> dict:
    return dict(text=text, max_new_tokens=kw.pop("max_new_tokens", 8), ignore_eos=True, **kw)


def test_shared_system_prompt_sequential_then_concurrent(sims):
    cached, plain = sims
    bs = cached.info.block_size
    fresh(cached)
    system_len = len(cached.tokenizer(SYSTEM)["input_ids"])
    lens = []
    for q in QUESTIONS[:2]:  # one at a time: the second finds the first's prompt blocks
        (got,), (cl,) = serve(cached, {0: [spec(SYSTEM + q)]})
        (want,), _ = serve(plain, {0: [spec(SYSTEM + q)]})
        same(got, want)
        lens.append(cl)
    assert lens[0] == 0 and lens[1] >= (system_len - 1) // bs * bs > 0
    # several at once, one joining mid-stream, each reusing the cached system prompt
    plan = {0: [spec(SYSTEM + q) for q in QUESTIONS[1:]], 2: [spec(SYSTEM + QUESTIONS[0])]}
    got, cls = serve(cached, plan)
    want, _ = serve(plain, plan)
    for g, w in zip(got, want):
        same(g, w)
    assert all(cl > 0 and cl % bs == 0 for cl in cls)


def test_exact_repeat_runs_only_the_last_prompt_token(sims):
    cached, plain = sims
    bs = cached.info.block_size
    fresh(cached)
    # truncation (by both tokenizers) makes the prompt exactly three blocks long
    text = SYSTEM + QUESTIONS[2]
    first, _ = serve(cached, {0: [spec(text, truncate=3 * bs)]})
    # the repeat twice in one batch: both reuse all three blocks and recompute position 3*bs-1
    got, cls = serve(cached, {0: [spec(text, truncate=3 * bs), spec(text, truncate=3 * bs)]})
    (want,), _ = serve(plain, {0: [spec(text, truncate=3 * bs)]})
    # the oracle of the pair is the same pair without a cache: a 16-bit matmul over two rows may
    # round differently from one over a single row (oneDNN's AVX512-FP16 kernels do), so batch 2
    # is compared with batch 2
    pair, _ = serve(plain, {0: [spec(text, truncate=3 * bs), spec(text, truncate=3 * bs)]})
    assert cls == [3 * bs - 1, 3 * bs - 1]
    same(first[0], want)
    for g, w in zip(got, pair):
        same(g, w)
    # the untruncated prompt (another start: left truncation) repeated: its full blocks reused
    n = len(cached.tokenizer(text)["input_ids"])
    serve(cached, {0: [spec(text)]})
    (again,), (cl,) = serve(cached, {0: [spec(text)]})
    (want,), _ = serve(plain, {0: [spec(text)]})
    assert cl == (n // bs * bs if n % bs else n - 1) > 0
    same(again, want)


def test_prompt_logprobs(sims):
    cached, plain = sims
    fresh(cached)
    text = SYSTEM + QUESTIONS[3]
    serve(cached, {0: [spec(text)]})  # cache the prompt
    # the router gives no prefix to a request that asks for prompt logprobs
    (got,), (cl,) = serve(cached, {0: [spec(text, prefill_logprobs=True)]})
    (want,), _ = serve(plain, {0: [spec(text, prefill_logprobs=True)]})
    assert cl == 0
    same(got, want)
    assert list(got.prefill.ids) == list(want.prefill.ids)
    assert math.isnan(got.prefill.logprobs[0])
    assert max(abs(a - b) for a, b in zip(got.prefill.logprobs[1:], want.prefill.logprobs[1:])) < 1e-4
    # a shard given both anyway: cached positions get NaN, the computed ones the true logprob
    req = cached.request(text, max_new_tokens=8, ignore_eos=True)
    req.prefill_logprobs = True
    n = req.cache_len
    assert n > 0
    res = cached.run({0: [req]})[req.id]
    lps = list(res.prefill.logprobs)
    assert all(math.isnan(x) for x in lps[: n + 1]) and len(lps) == len(want.prefill.logprobs)
    assert max(abs(a - b) for a, b in zip(lps[n + 1 :], want.prefill.logprobs[n + 1 :])) < 1e-4
    assert res.ids == want.ids


def test_eviction_under_a_small_pool(sims):
    cached, plain = sims
    bs = cached.info.block_size
    alloc = fresh(cached, tokens=bs * 13)  # 12 usable blocks
    prompts = [f"Topic {i}: " + SYSTEM[:100] for i in range(5)]  # distinct from the first block
    order = [0, 1, 0, 2, 3, 4, 0, 1, 4]
    hits, evicted, seen, expected = 0, 0, set(), {}
    for i in order:
        (got,), (cl,) = serve(cached, {0: [spec(prompts[i], max_new_tokens=6)]})
        if i not in expected:
            expected[i], _ = serve(plain, {0: [spec(prompts[i], max_new_tokens=6)]})
        same(got, expected[i][0])
        full = len(cached.tokenizer(prompts[i])["input_ids"]) // bs * bs
        hits += cl > 0
        evicted += i in seen and cl < full  # it was cached whole once, then (partly) evicted
        seen.add(i)
        assert alloc.free_blocks + alloc.cached_blocks == alloc.capacity
    assert hits >= 2 and evicted >= 1
