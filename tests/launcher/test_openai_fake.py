"""OpenAI routes over fake shards, with the real ``openai`` client where it fits."""

from __future__ import annotations

import pytest
from harness import fake_router, run


def test_chat_with_openai_client_stream_and_not(hf_tokenizer):
    openai = pytest.importorskip("openai")

    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            client = openai.AsyncOpenAI(base_url=h.url + "/v1", api_key="-")
            messages = [{"role": "user", "content": "hello"}]
            full = await client.chat.completions.create(
                model="tgi",
                messages=messages,
                max_tokens=4,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
            )
            prompt = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            want = h.shards[0].expected(prompt, 4, add_special_tokens=False)
            req = h.calls("Prefill")[-1].requests[0]
            assert (
                not req.add_special_tokens
                and not req.parameters.do_sample
                and req.top_n_tokens == 2
            )
            assert not req.HasField("adapter_id")
            assert full.model == "fake/bloom" and full.choices[0].finish_reason == "length"
            assert full.choices[0].message.content == hf_tokenizer.decode(
                want, skip_special_tokens=True
            )
            assert len(full.choices[0].logprobs.content) == 4
            assert len(full.choices[0].logprobs.content[0].top_logprobs) == 2
            assert full.usage.prompt_tokens == len(
                hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            )
            stream = await client.chat.completions.create(
                model="my-lora", messages=messages, max_tokens=4, temperature=0, stream=True
            )
            chunks = [c async for c in stream]
            assert h.calls("Prefill")[-1].requests[0].adapter_id == "my-lora"
            assert [c.choices[0].delta.role for c in chunks] == ["assistant"] * 4
            assert chunks[-1].choices[0].finish_reason == "length" and chunks[0].model == "my-lora"
            sampled = await client.chat.completions.create(
                model="tgi", messages=messages, max_tokens=2
            )
            assert sampled.choices[0].message.content is not None
            assert (
                h.calls("Prefill")[-1].requests[0].parameters.do_sample
            )  # TGI: no temperature = sample
            await client.close()

    run(scenario())


def test_chat_stream_raw_ends_with_done_and_usage(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            body = {
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "max_tokens": 3,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            status, events = await h.sse("/v1/chat/completions", body)
            assert status == 200 and events[-1] == "[DONE]"
            usage = events[-2]
            assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
            assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
            bad = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}
            status, err = await h.post("/v1/chat/completions", bad)
            assert status == 422 and err["error_type"] == "validation"

    run(scenario())


def test_completions_single_multi_and_stream(hf_tokenizer):
    openai = pytest.importorskip("openai")

    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            client = openai.AsyncOpenAI(base_url=h.url + "/v1", api_key="-")
            one = await client.completions.create(
                model="tgi", prompt="abc", max_tokens=3, temperature=0
            )
            want = hf_tokenizer.decode(h.shards[0].expected("abc", 3), skip_special_tokens=True)
            assert one.choices[0].text == want and one.usage.completion_tokens == 3
            many = await client.completions.create(
                model="tgi", prompt=["abc", "xyz"], max_tokens=2, temperature=0
            )
            assert [c.index for c in many.choices] == [0, 1] and many.usage.completion_tokens == 4
            chunks = [
                c
                async for c in await client.completions.create(
                    model="tgi", prompt="abc", max_tokens=3, temperature=0, stream=True
                )
            ]
            assert "".join(c.choices[0].text for c in chunks) == want
            status, events = await h.sse(
                "/v1/completions",
                {"prompt": ["a", "b"], "max_tokens": 2, "temperature": 0, "stream": True},
            )
            assert status == 200 and events[-1] == "[DONE]"
            assert sorted(e["choices"][0]["index"] for e in events[:-1]) == [0, 0, 1, 1]
            status, err = await h.post("/v1/completions", {"prompt": ["a"] * 5, "max_tokens": 2})
            assert status == 422 and "maximum allowed batch size of 4" in err["error"]
            status, err = await h.post("/v1/completions", {"prompt": "a", "suffix": "b"})
            assert status == 422
            await client.close()
            await h.idle()
            assert h.shards[0].live_slots() == 0

    run(scenario())
