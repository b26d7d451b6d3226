"""Chunked prefill end to end: ``tgi-npu-launcher`` + the real shard, driven by TGI's
``text_generation`` client. A long prompt arrives while short streams decode, with a prefill
budget far below the prompt; every answer (tokens and logprobs) equals the same workload on a
launcher whose shard runs without chunking (PREFILL_CHUNKING=0, whole prompts), for BLOOM and
Gemma, with prefix caching off and on, and at world size 2."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import requests
from processes import launch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

if shutil.which("text-generation-server") is None:
    pytest.skip("text-generation-server is not installed", allow_module_level=True)
text_generation = pytest.importorskip("text_generation")

LIMITS = ("--max-input-tokens", "700", "--max-total-tokens", "760", "--max-concurrent-requests", "16")
SHORT = [f"Stream {i}: the quick brown fox number {i} jumps over" for i in range(4)]
LONG = " ".join(f"word{i % 97} block{i % 13}" for i in range(400))  # well over 128 tokens


async def workload(url: str) -> list[tuple[list[int], list[float]]]:
    client = text_generation.AsyncClient(url, timeout=300)

    async def one(prompt: str, n: int, delay: float):
        await asyncio.sleep(delay)
        r = await client.generate(prompt, max_new_tokens=n, truncate=690, decoder_input_details=False)
        return [t.id for t in r.details.tokens], [t.logprob for t in r.details.tokens]

    jobs = [one(p, 40, 0.0) for p in SHORT] + [one(LONG, 8, 0.5)]
    return await asyncio.gather(*jobs)


def answers(model_dir, *flags: str, env: dict[str, str]) -> tuple[list, dict]:
    run = launch(model_dir, *LIMITS, *flags, env=env)
    try:
        run.wait_ready(180)
        info = requests.get(run.url + "/info", timeout=10).json()
        return asyncio.run(workload(run.url)), info
    finally:
        assert run.stop() == 0, run.output()[-3000:]


def same(got, want) -> None:
    for (ids, lps), (want_ids, want_lps) in zip(got, want, strict=True):
        assert ids == want_ids
        assert max(abs(a - b) for a, b in zip(lps, want_lps)) < 1e-4


@pytest.mark.parametrize("model", ["bloom_dir", "gemma_mqa_dir"])
def test_chunked_answers_equal_unchunked(model, request):
    model_dir = request.getfixturevalue(model)
    baseline, info = answers(
        model_dir, "--max-batch-prefill-tokens", "1024", env={"PREFILL_CHUNKING": "0"}
    )
    assert info["prefill_chunking"] is False
    configs = [({"PREFIX_CACHING": "0"}, ()), ({"PREFIX_CACHING": "1"}, ())]
    if model == "bloom_dir":
        configs.append(({"PREFIX_CACHING": "0"}, ("--num-shard", "2")))
    for env, extra in configs:
        # a prompt of ~690 tokens under a 128-token prefill budget is only admitted in chunks
        got, info = answers(model_dir, "--max-batch-prefill-tokens", "128", *extra, env=env)
        assert info["prefill_chunking"] is True and info["max_input_tokens"] == 700
        same(got, baseline)
