"""The router (HTTP + batching task) against in-process fake shards: protocol call sequences,
block accounting, cancellation, errors. Fast: no model, no subprocess."""

from __future__ import annotations

import asyncio

import pytest
from harness import fake_router, run
from tgi_npu_backend.launcher.protocol import U64_MAX

PROMPT = "The quick brown fox jumps over the lazy dog."


def gen_body(inputs=PROMPT, **params):
    params.setdefault("max_new_tokens", 5)
    return {"inputs": inputs, "parameters": params}


def assert_clean(h):
    """No protocol violation seen by the shard, every KV slot and block back."""
    assert h.shards[0].violations == []
    assert h.shards[0].live_slots() == 0
    assert h.router.allocator.free_blocks == h.router.allocator.capacity


def test_startup_sequence_and_warmup_batch(hf_tokenizer):
    async def scenario():
        async with fake_router(
            hf_tokenizer, max_input_tokens=40, max_total_tokens=100, max_batch_prefill_tokens=100
        ) as h:
            names = [n for n, _ in h.shards[0].calls]
            assert names[:4] == ["ServiceDiscovery", "ClearCache", "Info", "Warmup"]
            assert h.calls("ClearCache")[0] is None  # "clear all"
            warm = h.calls("Warmup")[0]
            assert warm.max_input_tokens == 40 and warm.max_total_tokens == 100
            assert warm.max_prefill_tokens == 100
            reqs = warm.batch.requests
            assert [r.truncate for r in reqs] == [40, 40, 20]
            assert all(r.id == 0 and not r.blocks and not r.slots for r in reqs)
            assert [r.stopping_parameters.max_new_tokens for r in reqs] == [60, 60, 80]
            assert reqs[0].input_chunks.chunks[1].image.mimetype == "image/jpeg;base64"
            assert all(len(r.input_chunks.chunks) == 1 for r in reqs[1:])
            assert reqs[1].input_chunks.chunks[0].text == "_test " * 40
            assert warm.batch.id == 0 and warm.batch.max_tokens == 40 and warm.batch.max_blocks == 0
            assert (
                reqs[0].parameters.watermark
                and reqs[0].top_n_tokens == 20
                and reqs[0].prefill_logprobs
            )
            # block pool from max_supported_total_tokens (fake: 4096) / block_size 16
            assert h.router.allocator.capacity == 4096 // 16 - 1

    run(scenario())


def test_generate_matches_oracle_and_frees_blocks(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            status, body = await h.post(
                "/generate", gen_body(details=True, decoder_input_details=True)
            )
            assert status == 200
            want = h.shards[0].expected(PROMPT, 5)
            d = body["details"]
            assert [t["id"] for t in d["tokens"]] == want
            assert body["generated_text"] == hf_tokenizer.decode(want, skip_special_tokens=True)
            assert d["finish_reason"] == "length" and d["generated_tokens"] == 5
            assert d["prefill"][0]["logprob"] is None  # NaN on the wire -> null
            assert len(d["prefill"]) == len(hf_tokenizer(PROMPT)["input_ids"])
            prefill = h.calls("Prefill")[0].requests[0]
            n_prompt = len(hf_tokenizer(PROMPT)["input_ids"])
            assert len(prefill.slots) == n_prompt + 5 - 1
            assert prefill.truncate == 64  # max_input_tokens when the user gave no truncate
            await h.idle()
            assert_clean(h)

    run(scenario())


def test_requests_joining_and_finishing_filter_the_batch(hf_tokenizer):
    async def scenario():
        async with fake_router(
            hf_tokenizer, waiting_served_ratio=0.0, shard_kwargs={"step_delay": 0.01}
        ) as h:
            long = asyncio.create_task(
                h.post("/generate", gen_body(max_new_tokens=12, details=True))
            )
            await asyncio.sleep(0.05)  # `long` is decoding now
            short = await h.post(
                "/generate", gen_body("Once upon a time", max_new_tokens=3, details=True)
            )
            status, body = await long
            assert status == 200 and short[0] == 200
            assert [t["id"] for t in body["details"]["tokens"]] == h.shards[0].expected(PROMPT, 12)
            # the short request joined: a second Prefill, then Decode of both batches together
            prefills = h.calls("Prefill")
            assert len(prefills) == 2
            assert any(len(ids) == 2 for ids in h.calls("Decode"))
            # when it finished, the router filtered it out of the merged batch
            filters = h.calls("FilterBatch")
            assert filters and filters[0][1] == [prefills[0].requests[0].id]
            await h.idle()
            assert_clean(h)

    run(scenario())


def test_client_dropped_mid_stream_is_filtered_and_frees_blocks(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer, shard_kwargs={"step_delay": 0.01}) as h:
            keep = asyncio.create_task(h.post("/generate", gen_body(max_new_tokens=40)))
            async with h.session.post(
                h.url + "/generate_stream", json=gen_body(max_new_tokens=40)
            ) as resp:
                seen = 0
                async for raw in resp.content:
                    seen += raw.startswith(b"data:")
                    if seen == 3:
                        break  # leaving the block closes the connection mid-stream
            status, _ = await keep
            assert status == 200
            await h.idle()
            dropped = [ids for _, ids in h.calls("FilterBatch")]
            assert dropped and all(len(ids) == 1 for ids in dropped)
            assert h.router.metrics.counter_value("tgi_request_failure", err="dropped") == 1
            assert_clean(h)
            # capacity is back: a request needing most of the pool still runs
            status, _ = await h.post("/generate", gen_body(max_new_tokens=20))
            assert status == 200

    run(scenario())


def test_lone_cancelled_request_clears_its_batch(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer, shard_kwargs={"step_delay": 0.01}) as h:
            task = asyncio.create_task(h.post("/generate", gen_body(max_new_tokens=60)))
            await asyncio.sleep(0.1)
            task.cancel()  # aiohttp closes the connection; the handler is cancelled server-side
            await asyncio.gather(task, return_exceptions=True)
            await h.idle()
            assert h.calls("ClearCache")[-1] == h.calls("Prefill")[0].id
            assert_clean(h)

    run(scenario())


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (gen_body(inputs=""), 422, "`inputs` cannot be empty"),
        (gen_body(max_new_tokens=0), 422, "`max_new_tokens` must be strictly positive"),
        (gen_body(temperature=-0.5), 422, "`temperature` must be strictly positive"),
        (gen_body(top_p=1.0), 422, "`top_p` must be > 0.0 and < 1.0"),
        (gen_body(top_k=0), 422, "`top_k` must be strictly positive"),
        (gen_body(typical_p=0.0), 422, "`typical_p`"),
        (gen_body(repetition_penalty=0.0), 422, "`repetition_penalty`"),
        (gen_body(frequency_penalty=2.5), 422, "`frequency_penalty`"),
        (
            gen_body(stop=["a", "b", "c", "d", "e"]),
            422,
            "`stop` supports up to 4 stop sequences. Given: 5",
        ),
        (gen_body(top_n_tokens=6), 422, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        (gen_body(inputs="word " * 100), 422, "must be <= 128"),
        (
            gen_body(inputs="word " * 25, max_new_tokens=1),
            422,
            "`inputs` must have less than 64 tokens",
        ),
        (gen_body(truncate=100), 422, "`truncate` must be strictly positive and less than 64"),
        (gen_body(max_new_tokens=-1), 422, "Failed to deserialize"),
        (gen_body(best_of=2, do_sample=True), 422, "best_of"),
        ({"parameters": {}}, 422, "missing field `inputs`"),
        ("not json at all", 400, "Failed to parse the request body as JSON"),
    ],
)
def test_bad_requests_get_tgi_errors_and_server_keeps_serving(hf_tokenizer, body, status, needle):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            if isinstance(body, str):
                async with h.session.post(h.url + "/generate", data=body) as resp:
                    got_status, got = resp.status, await resp.json()
            else:
                got_status, got = await h.post("/generate", body)
            assert got_status == status, got
            assert needle in got["error"] and got["error_type"] == "validation"
            ok, _ = await h.post("/generate", gen_body())
            assert ok == 200

    run(scenario())


def test_truncate_keeps_a_long_prompt_valid(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            status, _ = await h.post(
                "/generate", gen_body(inputs="word " * 100, truncate=10, details=True)
            )
            assert status == 200
            req = h.calls("Prefill")[0].requests[0]
            assert req.truncate == 10 and len(req.slots) == 10 + 5 - 1
            assert h.shards[0].violations == []

    run(scenario())


def test_generation_error_is_424_then_model_health_probe(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            h.shards[0].fail_next["Prefill"] = "CUDA out of memory (fake)"
            status, body = await h.post("/generate", gen_body())
            assert status == 424 and body["error_type"] == "generation"
            assert (
                body["error"]
                == "Request failed during generation: Server error: CUDA out of memory (fake)"
            )
            prefill_id = h.calls("Prefill")[0].id
            assert h.calls("ClearCache")[-1] == prefill_id
            assert h.router.scheduler.healthy is False
            async with h.session.get(h.url + "/health") as resp:
                assert resp.status == 200
            probe = h.calls("Prefill")[-1]
            assert (
                probe.id == U64_MAX
                and probe.size == 1
                and probe.max_tokens == 2
                and probe.max_blocks == 1
            )
            r = probe.requests[0]
            assert (r.id, list(r.blocks), list(r.slots), r.truncate, r.add_special_tokens) == (
                U64_MAX,
                [0],
                [0],
                1,
                False,
            )
            assert r.input_chunks.chunks[0].text == "liveness"
            n_prefill = len(h.calls("Prefill"))
            async with h.session.get(h.url + "/health") as resp:  # healthy again: Health RPC only
                assert resp.status == 200
            assert len(h.calls("Prefill")) == n_prefill and h.calls("Health")
            assert (await h.post("/generate", gen_body()))[0] == 200
            assert_clean(h)

    run(scenario())


def test_health_reports_503_when_the_shard_fails(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            h.shards[0].fail_next["Health"] = "device lost"
            async with h.session.get(h.url + "/health") as resp:
                assert resp.status == 503
                assert await resp.json() == {"error": "unhealthy", "error_type": "healthcheck"}

    run(scenario())


def test_decode_error_clears_every_batch_and_fails_its_requests(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer, shard_kwargs={"step_delay": 0.01}) as h:
            h.shards[0].fail_next["Decode"] = "boom"
            results = await asyncio.gather(
                *(h.post("/generate", gen_body(max_new_tokens=8)) for _ in range(3))
            )
            assert {s for s, _ in results} == {424}
            await h.idle()
            assert (await h.post("/generate", gen_body()))[0] == 200
            assert_clean(h)

    run(scenario())


def test_overloaded_is_429(hf_tokenizer):
    async def scenario():
        async with fake_router(
            hf_tokenizer, max_concurrent_requests=1, shard_kwargs={"step_delay": 0.02}
        ) as h:
            first = asyncio.create_task(h.post("/generate", gen_body(max_new_tokens=10)))
            await asyncio.sleep(0.05)
            status, body = await h.post("/generate", gen_body())
            assert status == 429 and body == {
                "error": "Model is overloaded",
                "error_type": "overloaded",
            }
            assert (await first)[0] == 200

    run(scenario())


def test_stream_events_and_final_details(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            status, events = await h.sse(
                "/generate_stream", gen_body(max_new_tokens=4, details=True, top_n_tokens=2)
            )
            assert status == 200 and len(events) == 4
            assert [e["index"] for e in events] == [1, 2, 3, 4]
            assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
            last = events[-1]
            want = h.shards[0].expected(PROMPT, 4)
            assert [e["token"]["id"] for e in events] == want
            assert last["generated_text"] == hf_tokenizer.decode(want, skip_special_tokens=True)
            assert (
                last["details"]["finish_reason"] == "length" and last["details"]["input_length"] > 0
            )
            assert all(len(e["top_tokens"]) == 2 for e in events)
            status, body = await h.post("/generate_stream", gen_body(decoder_input_details=True))
            assert status == 422 and "not supported when streaming" in body["error"]

    run(scenario())


def test_compat_route_and_misc_endpoints(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            status, body = await h.post("/", {**gen_body(return_full_text=True), "stream": False})
            assert (
                status == 200
                and isinstance(body, list)
                and body[0]["generated_text"].startswith(PROMPT)
            )
            status, events = await h.sse("/", {**gen_body(max_new_tokens=2), "stream": True})
            assert status == 200 and len(events) == 2
            async with h.session.get(h.url + "/info") as resp:
                info = await resp.json()
            assert info["max_input_tokens"] == 64 and info["max_total_tokens"] == 128
            assert info["model_id"] == "fake/bloom" and info["max_stop_sequences"] == 4
            status, toks = await h.post("/tokenize", {"inputs": "hello world"})
            ids = hf_tokenizer("hello world")["input_ids"]
            assert [t["id"] for t in toks] == ids and "".join(
                t["text"] for t in toks
            ) == "hello world"
            async with h.session.get(h.url + "/v1/models") as resp:
                assert (await resp.json())["data"][0]["id"] == "fake/bloom"
            async with h.session.get(h.url + "/metrics") as resp:
                text = await resp.text()
            for name in (
                "tgi_request_count",
                "tgi_request_success",
                "tgi_request_duration_bucket",
                "tgi_queue_size",
                "tgi_batch_current_size",
                "tgi_request_mean_time_per_token_duration_sum",
                "tgi_batch_forward_duration_count",
                "tgi_request_input_length_bucket",
            ):
                assert name in text, name

    run(scenario())


def test_max_batch_size_and_prefill_budget_split_batches(hf_tokenizer):
    async def scenario():
        async with fake_router(
            hf_tokenizer,
            max_batch_size=2,
            max_batch_prefill_tokens=64,
            shard_kwargs={"step_delay": 0.01},
        ) as h:
            results = await asyncio.gather(
                *(h.post("/generate", gen_body(max_new_tokens=4)) for _ in range(5))
            )
            assert all(s == 200 for s, _ in results)
            assert all(b.size <= 2 for b in h.calls("Prefill"))
            assert max(b.size for b in h.calls("Prefill")) == 2
            await h.idle()
            assert_clean(h)

    run(scenario())


def test_two_shards_merge_generations(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer, world_size=2) as h:
            assert len(h.router.client.clients) == 2
            results = await asyncio.gather(
                *(h.post("/generate", gen_body(f"prompt {i}", details=True)) for i in range(4))
            )
            for i, (status, body) in enumerate(results):
                assert status == 200
                assert [t["id"] for t in body["details"]["tokens"]] == h.shards[0].expected(
                    f"prompt {i}", 5
                )
            await h.idle()
            assert all(s.violations == [] and s.live_slots() == 0 for s in h.shards)

    run(scenario())


def test_concurrent_greedy_requests_equal_alone(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer, waiting_served_ratio=0.3) as h:
            prompts = [f"request number {i} " * (1 + i % 4) for i in range(32)]
            alone = [
                await h.post("/generate", gen_body(p, max_new_tokens=3 + i % 7))
                for i, p in enumerate(prompts)
            ]
            together = await asyncio.gather(
                *(
                    h.post("/generate", gen_body(p, max_new_tokens=3 + i % 7))
                    for i, p in enumerate(prompts)
                )
            )
            assert together == alone
            await h.idle()
            assert_clean(h)

    run(scenario())
