"""The whole shard pipeline in-process (pb batch -> tokens) against HF transformers, plus the
generator semantics that need a controlled model config (EOS lists, ownership across ranks)."""

from __future__ import annotations

import dataclasses
import math
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from router_sim import RouterSim, batch_requests, plain
from tgi_npu_backend.launcher.allocator import BlockAllocator
from tgi_npu_backend.config import ServerConfig
from tgi_npu_backend.distributed import ParallelContext
from tgi_npu_backend.load import build_generator
from tgi_npu_backend.pb import generate_pb2 as pb

PROMPTS = ["The quick brown fox", "Hello 深度学习", "def add(a, b):\n    return"]
STEPS = 16


class InProcess:
    """RouterSim's request building and allocation, calling a Generator directly."""

    def __init__(self, model_dir, dtype: str | None = None, **env):
        env = {"TGI_NPU_KV_CACHE_FRACTION": "0.005", **env}
        cfg = ServerConfig.from_cli(model_id=str(model_dir), env=env, dtype=dtype)
        self.gen = build_generator(cfg)
        self.sim = RouterSim("unused", AutoTokenizer.from_pretrained(model_dir, truncation_side="left"))
        warm = self.sim.warmup_request(None, None, 128, None)
        supported, self.sim.max_input, self.sim.max_total = self.gen.warmup(batch_requests(warm.batch), None, 128, None)
        self.sim.allocator = BlockAllocator(supported, self.gen.block_size)

    def generate(self, requests: list[pb.Request]):
        """Prefill all together, decode until every request finished; tokens/logprobs per id."""
        out = {r.id: ([], [], None) for r in requests}
        step = self.gen.prefill(*plain(self.sim.batch(requests)))
        while True:
            for g in step.generations:
                ids, lps, _ = out[g.request_id]
                ids += g.tokens.ids
                lps += g.tokens.logprobs
                if g.prefill_tokens is not None:
                    out[g.request_id] = (ids, lps, g.prefill_tokens)
            if step.batch is None:
                break
            live = [g.request_id for g in step.generations if g.generated_text is None]
            if len(live) != step.batch.size:
                self.gen.filter(step.batch.id, live)
            step = self.gen.decode([step.batch.id])
        for r in requests:
            self.sim.release(r.id)
        return out


def hf_greedy(model_dir, prompt: str, steps: int):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    with torch.no_grad():
        logits = model(out).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    n = ids.shape[1]
    gen = out[0, n:].tolist()
    gen_lp = [float(logprobs[n - 1 + i, t]) for i, t in enumerate(gen)]
    prompt_lp = [float(logprobs[i - 1, ids[0, i]]) for i in range(1, n)]
    return gen, gen_lp, prompt_lp


@pytest.mark.parametrize("fixture", ["bloom_dir", "bloom_noprefix_dir", "gemma_mqa_dir", "gemma_gqa_dir"])
def test_batched_pipeline_matches_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    shard = InProcess(model_dir)
    reqs = [shard.sim.request(p, max_new_tokens=STEPS, ignore_eos=True, prefill_logprobs=True) for p in PROMPTS]
    got = shard.generate(reqs)
    for r, prompt in zip(reqs, PROMPTS):
        ids, lps, prefill = got[r.id]
        hf_ids, hf_lps, hf_prompt_lps = hf_greedy(model_dir, prompt, STEPS)
        assert ids == hf_ids
        assert max(abs(a - b) for a, b in zip(lps, hf_lps)) < 1e-4
        assert math.isnan(prefill.logprobs[0])
        assert max(abs(a - b) for a, b in zip(prefill.logprobs[1:], hf_prompt_lps)) < 1e-4


def test_eos_list_from_generation_config_stops(gemma_mqa_dir):
    shard = InProcess(gemma_mqa_dir)
    req = shard.sim.request("The quick brown fox", max_new_tokens=12, ignore_eos=True)
    ids, _, _ = shard.generate([req])[req.id]
    # pretend the 4th greedy token is <end_of_turn>-like: make it one of the EOS ids
    shard.gen.text = dataclasses.replace(shard.gen.text, eos_token_ids=frozenset({1, ids[3]}))
    req = shard.sim.request("The quick brown fox", max_new_tokens=12)
    step = shard.gen.prefill(*plain(shard.sim.batch([req])))
    finished = None
    while finished is None:
        finished = next((g.generated_text for g in step.generations if g.generated_text), None)
        if finished is None:
            step = shard.gen.decode([step.batch.id])
    assert finished.finish_reason == pb.FINISH_REASON_EOS_TOKEN and finished.generated_tokens == ids.index(ids[3]) + 1
    req = shard.sim.request("The quick brown fox", max_new_tokens=12, ignore_eos=True)
    assert len(shard.generate([req])[req.id][0]) == 12  # ignore_eos_token keeps going


def test_each_generation_comes_from_exactly_one_rank(bloom_dir):
    """Two generators that believe they are ranks 0 and 1 of 2 split the generations by id."""
    shard = InProcess(bloom_dir)
    reqs = [shard.sim.request(p, max_new_tokens=4) for p in PROMPTS]
    owners = {}
    for rank in (0, 1):
        shard.gen.parallel = ParallelContext(rank=rank, world_size=2)
        batch = pb.Batch(id=100 + rank, requests=reqs, size=len(reqs))
        step = shard.gen.prefill(*plain(batch))
        assert step.batch.request_ids == [r.id for r in reqs]  # every rank keeps every request
        for g in step.generations:
            assert g.request_id not in owners
            owners[g.request_id] = rank
        shard.gen.clear(batch.id)  # one process plays both ranks: request ids must not clash
    assert owners == {r.id: r.id % 2 for r in reqs}


@pytest.mark.parametrize("fixture", ["bloom_dir", "gemma_mqa_dir"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_serve_on_cpu(fixture, dtype, request):
    """--dtype bfloat16/float16 serve on CPU; Info reports the dtype used; greedy tokens agree with
    float32 HF wherever HF's top-2 logit margin is clear (> 0.5), the rule used for half dtypes."""
    model_dir = request.getfixturevalue(fixture)
    shard = InProcess(model_dir, dtype=dtype)
    assert shard.gen.info().dtype == f"torch.{dtype}"

    prompt = PROMPTS[0]
    req = shard.sim.request(prompt, max_new_tokens=8, ignore_eos=True)
    ids, _, _ = shard.generate([req])[req.id]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt_ids = tok(prompt)["input_ids"]
    with torch.no_grad():  # HF float32 logits along OUR sequence
        logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
    top2 = logits.topk(2, dim=-1)
    checked = 0
    for i, tok_id in enumerate(ids):
        if float(top2.values[i, 0] - top2.values[i, 1]) > 0.5:
            assert tok_id == int(top2.indices[i, 0]), f"step {i}"
            checked += 1
    assert checked >= 3, "too few clear-margin steps to say anything"


def test_lm_head_runs_only_where_logits_are_used(bloom_dir, monkeypatch):
    """Prefill applies the LM head to each request's last position, plus every prompt position
    only for requests that asked for prompt logprobs (in chunks of PROMPT_LOGPROB_CHUNK)."""
    import tgi_npu_backend.model_runner as runner

    shard = InProcess(bloom_dir)
    rows = []
    original = shard.gen.model.compute_logits
    monkeypatch.setattr(shard.gen.model, "compute_logits", lambda h: rows.append(h.shape[0]) or original(h))
    monkeypatch.setattr(runner, "PROMPT_LOGPROB_CHUNK", 4)
    long_text = "The quick brown fox jumps over the lazy dog"
    n_long = len(shard.sim.tokenizer(long_text)["input_ids"])
    reqs = [shard.sim.request(PROMPTS[0], max_new_tokens=2), shard.sim.request(PROMPTS[1], max_new_tokens=2),
            shard.sim.request(long_text, max_new_tokens=2, prefill_logprobs=True)]
    shard.gen.prefill(*plain(shard.sim.batch(reqs)))
    chunks = [min(4, n_long - 1 - s) for s in range(0, n_long - 1, 4)]
    assert rows == [3, *chunks]  # 3 last positions, then the logprob request's prompt in chunks
    rows.clear()
    shard.gen.decode([shard.sim.next_batch_id - 1])
    assert rows == [3]
