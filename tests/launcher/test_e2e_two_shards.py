"""``--num-shard 2`` (CPU/gloo) behind the launcher gives the same greedy answers as one shard."""

from __future__ import annotations

import shutil

import pytest
import requests
from processes import launch

pytestmark = pytest.mark.slow

if shutil.which("text-generation-server") is None:
    pytest.skip("text-generation-server is not installed", allow_module_level=True)

FLAGS = (
    "--max-input-tokens",
    "64",
    "--max-total-tokens",
    "96",
    "--max-batch-prefill-tokens",
    "128",
)
PROMPTS = ["The quick brown fox", "Pour déguster un ortolan", "def add(a, b):", "深度学习模型"]


def answers(model_dir, *extra: str) -> list[list[int]]:
    run = launch(model_dir, *FLAGS, *extra)
    try:
        run.wait_ready(120)
        out = []
        for p in PROMPTS:
            r = requests.post(
                run.url + "/generate",
                json={"inputs": p, "parameters": {"max_new_tokens": 6, "details": True}},
            )
            assert r.status_code == 200, r.text
            out.append([t["id"] for t in r.json()["details"]["tokens"]])
        return out
    finally:
        assert run.stop() == 0, run.output()[-3000:]


def test_two_shards_answer_like_one(bloom_dir):
    assert answers(bloom_dir, "--num-shard", "2") == answers(bloom_dir)
