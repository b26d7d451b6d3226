"""End to end: ``tgi-npu-launcher`` starting the REAL ``text-generation-server`` on tiny BLOOM and
Gemma checkpoints, driven by clients nobody here wrote: ``text_generation`` (TGI's Python client)
and ``openai``. One launcher per model for the whole module (startup ~10 s each)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil

import pytest
import requests
from processes import launch

# text_generation 0.7 calls pydantic's deprecated .dict(); not our warning to fix.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

if shutil.which("text-generation-server") is None:
    pytest.skip("text-generation-server is not installed", allow_module_level=True)
pytest.importorskip("openai")


def text_generation_client():
    # NOTE: text-generation 0.7 pins huggingface-hub<1.0, which transformers 5 refuses, so it is
    # not in the `test` extra: `pip install --no-deps text-generation` (needs aiohttp, pydantic).
    return pytest.importorskip("text_generation")


FLAGS = (
    "--max-input-tokens",
    "96",
    "--max-total-tokens",
    "160",
    "--max-batch-prefill-tokens",
    "384",
    "--max-concurrent-requests",
    "64",
)
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module", params=["bloom", "gemma"])
def server(request):
    model_dir = request.getfixturevalue(
        "bloom_dir" if request.param == "bloom" else "gemma_mqa_dir"
    )
    run = launch(model_dir, *FLAGS)
    try:
        run.wait_ready(120)
        yield run
    finally:
        code = run.stop()
        assert code == 0, run.output()[-3000:]


def metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_text_generation_client_details_and_stream(server):
    client = text_generation_client().Client(server.url, timeout=60)
    resp = client.generate(PROMPT, max_new_tokens=8, decoder_input_details=True, top_n_tokens=3)
    d = resp.details
    assert d.generated_tokens == len(d.tokens) and 1 <= d.generated_tokens <= 8
    prompt_ids = [
        t["id"] for t in requests.post(server.url + "/tokenize", json={"inputs": PROMPT}).json()
    ]
    assert [t.id for t in d.prefill] == prompt_ids and d.prefill[0].logprob is None
    assert all(t.logprob is not None for t in d.prefill[1:])
    assert d.top_tokens is not None and all(len(top) >= 3 for top in d.top_tokens)
    assert all(top[0].logprob >= t.logprob - 1e-4 for top, t in zip(d.top_tokens, d.tokens))

    streamed = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert [s.token.id for s in streamed] == [t.id for t in d.tokens]
    assert streamed[-1].generated_text == resp.generated_text
    assert streamed[-1].details.finish_reason == d.finish_reason
    assert all(s.generated_text is None for s in streamed[:-1])


def test_openai_chat_completions(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="-")
    messages = [{"role": "user", "content": "Say something about foxes."}]
    full = client.chat.completions.create(
        model="tgi", messages=messages, max_tokens=10, temperature=0
    )
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert full.usage.completion_tokens == 10 or choice.finish_reason == "stop"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="tgi",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    # the chat template came from the tokenizer and was sent without extra special tokens
    templated = client.chat.completions.create(
        model="some-adapter", messages=messages, max_tokens=2, temperature=0
    )
    assert (
        templated.model == "some-adapter"
        and templated.usage.prompt_tokens == full.usage.prompt_tokens
    )


def test_32_concurrent_greedy_requests_equal_alone(server):
    import aiohttp

    prompts = [f"{PROMPT} number {i}" * (1 + i % 3) for i in range(32)]
    lengths = [4 + i % 9 for i in range(32)]

    async def one(session, prompt, n):
        body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}}
        async with session.post(server.url + "/generate", json=body) as resp:
            assert resp.status == 200
            out = await resp.json()
            return out["generated_text"], [t["id"] for t in out["details"]["tokens"]]

    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            alone = [await one(session, p, n) for p, n in zip(prompts, lengths)]
            together = await asyncio.gather(*(one(session, p, n) for p, n in zip(prompts, lengths)))
            return alone, together

    alone, together = asyncio.run(go())
    assert together == alone
    assert any(len(ids) > 1 for _, ids in alone)


def test_dropped_stream_frees_its_blocks(server):
    total = metric(server.url, "tgi_kv_blocks_total")
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 60}}
    with requests.post(server.url + "/generate_stream", json=body, stream=True, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith(b"data:")
            if got == 2:
                break
    for _ in range(100):
        if (
            metric(server.url, "tgi_kv_blocks_free") == total
            and metric(server.url, "tgi_batch_current_size") == 0
        ):
            break
        asyncio.run(asyncio.sleep(0.05))
    assert metric(server.url, "tgi_kv_blocks_free") == total
    assert metric(server.url, 'tgi_request_failure{err="dropped"}') >= 1
    r = requests.post(
        server.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    "payload, status",
    [
        ({"inputs": "", "parameters": {"max_new_tokens": 3}}, 422),
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}, 422),
        ({"inputs": PROMPT, "parameters": {"temperature": -1.0}}, 422),
        ({"inputs": "fox " * 200, "parameters": {"max_new_tokens": 3}}, 422),
        ({"inputs": PROMPT, "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, 422),
        ("{not json", 400),
    ],
)
def test_bad_requests_then_still_serving(server, payload, status):
    data = payload if isinstance(payload, str) else json.dumps(payload)
    r = requests.post(
        server.url + "/generate", data=data, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status
    assert r.json()["error_type"] == "validation" and r.json()["error"]
    ok = requests.post(
        server.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    )
    assert ok.status_code == 200
    assert requests.get(server.url + "/health").status_code == 200


def test_truncated_long_prompt_and_info(server):
    r = requests.post(
        server.url + "/generate",
        json={
            "inputs": "fox " * 200,
            "parameters": {"max_new_tokens": 3, "truncate": 20, "decoder_input_details": True},
        },
    )
    assert r.status_code == 200 and len(r.json()["details"]["prefill"]) == 20
    info = requests.get(server.url + "/info").json()
    assert info["max_input_tokens"] == 96 and info["max_total_tokens"] == 160
