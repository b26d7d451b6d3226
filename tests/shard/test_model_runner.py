"""ModelRunner's incremental decode steps against inputs rebuilt from the requests.

A decode step advances the last step's tensors (``DecodeInputs``) instead of rebuilding them from
the requests' Python lists; every field the model and the kernels see must equal what a rebuild
gives, through batch changes (a second batch joining, a request leaving), and the tokens must be
those of a run that rebuilds every step.
"""

from __future__ import annotations

import pytest
import torch
from router_sim import RouterSim, batch_requests, plain
from transformers import AutoTokenizer

from tgi_npu_backend.config import ServerConfig
from tgi_npu_backend.launcher.allocator import BlockAllocator
from tgi_npu_backend.load import build_generator
from tgi_npu_backend.kernels import Phase
from tgi_npu_backend.model_runner import DecodeInputs

META_TENSORS = ("slot_mapping", "block_tables", "seq_lens", "context_lens", "cu_seqlens_q")
META_VALUES = ("phase", "max_seqlen_q", "max_seqlen_k", "block_size", "seq_lens_list",
               "context_lens_list", "query_lens_list")


class Shard:
    def __init__(self, model_dir):
        env = {"TGI_NPU_KV_CACHE_FRACTION": "0.005"}
        self.gen = build_generator(ServerConfig.from_cli(model_id=str(model_dir), env=env))
        self.sim = RouterSim("unused", AutoTokenizer.from_pretrained(model_dir, truncation_side="left"))
        warm = self.sim.warmup_request(None, None, 128, None)
        supported, self.sim.max_input, self.sim.max_total = self.gen.warmup(batch_requests(warm.batch), None, 128, None)
        self.sim.allocator = BlockAllocator(supported, self.gen.block_size)
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}

    def take(self, step) -> list[int]:
        """Record a step's generations; the ids still running."""
        for g in step.generations:
            self.tokens.setdefault(g.request_id, []).extend(g.tokens.ids)
            self.logprobs.setdefault(g.request_id, []).extend(g.tokens.logprobs)
        return [g.request_id for g in step.generations if g.generated_text is None]

    def scenario(self):
        """Batch A (3 requests) decodes 3 steps, batch B joins (concatenate), the shortest request
        of A leaves (filter), then everyone decodes to the end."""
        a = [self.sim.request(p, max_new_tokens=n, ignore_eos=True)
             for p, n in (("The quick brown fox", 6), ("Hello 深度学习", 20), ("def add(a, b):", 20))]
        step = self.gen.prefill(*plain(self.sim.batch(a)))
        self.take(step)
        current = step.batch
        for _ in range(3):
            self.take(step := self.gen.decode([current.id]))
            current = step.batch
        b = [self.sim.request("numbers 0 1 2 3 4 5 6 7 8 9 10 100", max_new_tokens=12, ignore_eos=True)]
        step_b = self.gen.prefill(*plain(self.sim.batch(b)))
        self.take(step_b)
        step = self.gen.decode([current.id, step_b.batch.id])
        live = self.take(step)
        current = step.batch
        while current is not None:
            if len(live) != current.size:
                current = self.gen.filter(current.id, live)
            step = self.gen.decode([current.id])
            live = self.take(step)
            current = step.batch


@pytest.mark.parametrize("fixture", ["bloom_dir", "gemma_gqa_dir"])
def test_incremental_decode_inputs_equal_rebuilt_ones(fixture, request, monkeypatch):
    shard = Shard(request.getfixturevalue(fixture))
    runner = shard.gen.runner
    seen = {"steps": 0, "advanced": 0, "host_lens": 0}
    expected = {}

    forward = runner.forward

    def checked_forward(batch, kv_cache):
        if not batch.prefilling:
            expected["inputs"] = runner.build_inputs(batch, kv_cache.block_size)
        return forward(batch, kv_cache)

    def check(module, args):
        input_ids, positions, _, meta = args
        if meta.phase is not Phase.DECODE:
            return
        seen["steps"] += 1
        ids, pos, rebuilt = expected.pop("inputs")
        assert input_ids.tolist() == ids.tolist() and positions.tolist() == pos.tolist()
        for name in META_TENSORS:
            mine, theirs = getattr(meta, name), getattr(rebuilt, name)
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
        for name in META_VALUES:
            assert getattr(meta, name) == getattr(rebuilt, name), name
        if meta.seq_lens_host is not None:  # an advanced step's host lengths (the NPU ops' input)
            seen["host_lens"] += 1
            assert meta.seq_lens_host.device.type == "cpu" and meta.seq_lens_host.dtype == torch.int32
            assert meta.seq_lens_host.tolist() == rebuilt.seq_lens_list

    advanced = DecodeInputs.advanced

    def counted(self):
        seen["advanced"] += 1
        return advanced(self)

    monkeypatch.setattr(runner, "forward", checked_forward)
    monkeypatch.setattr(DecodeInputs, "advanced", counted)
    handle = runner.model.register_forward_pre_hook(check)
    try:
        shard.scenario()
    finally:
        handle.remove()
    # 19 decode steps; rebuilt: the first, the one after the concatenation, and the one after
    # each filter (request 0 ends at step 5, batch B's request at step 14)
    assert seen["steps"] == 19 and seen["advanced"] == 15 and seen["host_lens"] == 15


def test_tokens_equal_a_run_that_rebuilds_every_step(bloom_dir, monkeypatch):
    incremental = Shard(bloom_dir)
    incremental.scenario()
    rebuilt = Shard(bloom_dir)
    monkeypatch.setattr(DecodeInputs, "advanced", lambda self: pytest.fail("not rebuilt"))
    rebuilt.gen.runner.choose = lambda batch, rows, logits: batch.chooser(
        logits, [r.tokens for r in batch.requests]
    )  # no ids recorded: every decode step rebuilds its inputs
    rebuilt.scenario()
    assert incremental.tokens == rebuilt.tokens
    assert incremental.logprobs == rebuilt.logprobs
