"""End to end: ``tgi-npu-launcher`` with the REAL shard on a tiny Gemma checkpoint. With
PREFIX_CACHING=1 the shard reports prefix caching, the launcher allocates with the radix
allocator (cache_len > 0 for a shared system prompt), and every answer equals the one the same
launcher gives with PREFIX_CACHING=0."""

from __future__ import annotations

import re
import shutil

import pytest
import requests
from processes import launch

pytestmark = pytest.mark.slow

if shutil.which("text-generation-server") is None:
    pytest.skip("text-generation-server is not installed", allow_module_level=True)

SYSTEM = (
    "You are a careful assistant for an airline. Answer in one short sentence and never invent "
    "flight numbers. Question: "
)
QUESTIONS = ["Can I bring a bicycle?", "How late can I check in?", "Is there wifi?"]
FLAGS = ("--max-input-tokens", "200", "--max-total-tokens", "256",
         "--max-batch-prefill-tokens", "512")


def metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def answers(model_dir, prefix_caching: str) -> tuple[list[dict], str, float]:
    run = launch(model_dir, *FLAGS, env={"PREFIX_CACHING": prefix_caching})
    try:
        run.wait_ready(120)
        out = []
        # sequential, and the first prompt again at the end (a whole-prompt repeat)
        for q in [*QUESTIONS, QUESTIONS[0]]:
            body = {"inputs": SYSTEM + q,
                    "parameters": {"max_new_tokens": 8, "details": True, "stop": []}}
            resp = requests.post(run.url + "/generate", json=body, timeout=60)
            assert resp.status_code == 200, resp.text
            out.append(resp.json())
        # blocks the radix trie keeps (the prompts' full blocks) are not on the free list
        kept = metric(run.url, "tgi_kv_blocks_total") - metric(run.url, "tgi_kv_blocks_free")
    finally:
        code = run.stop()
    assert code == 0, run.output()[-3000:]
    return out, run.output(), kept


def test_launcher_uses_radix_allocator_and_answers_match(gemma_mqa_dir):
    cached, log_on, kept_on = answers(gemma_mqa_dir, "1")
    plain, log_off, kept_off = answers(gemma_mqa_dir, "0")
    assert kept_on > 0 and kept_off == 0
    assert "prefix_caching=True" in log_on and "radix block allocator" in log_on
    assert "prefix_caching=False" in log_off and "radix block allocator" not in log_off
    for a, b in zip(cached, plain):
        assert a["generated_text"] == b["generated_text"]
        ta, tb = a["details"]["tokens"], b["details"]["tokens"]
        assert [t["id"] for t in ta] == [t["id"] for t in tb]
        assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(ta, tb)) < 1e-4
