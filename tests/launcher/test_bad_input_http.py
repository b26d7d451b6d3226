"""Hostile and careless HTTP input against the router (fake shards, in process): every probe gets a
clear 4xx JSON error naming what to change, the next normal request succeeds, a sentinel request
streaming through the whole battery keeps its exact tokens, and nothing reaches a shard that the
real shard would refuse. Also: a bug in batching fails one request only, 424 messages name no
other request, --api-key, --cors-allow-origin, the SIGTERM drain, and hypothesis-fuzzed bodies."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import pytest
import requests
from harness import fake_router, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tgi_npu_backend.launcher import batch_queue, scheduler
from tgi_npu_backend.launcher.errors import ValidationError
from tgi_npu_backend.launcher.tokenizer import Tokenizer
from tgi_npu_backend.launcher.validation import ValidationLimits, Validator

from tgi_npu_backend.request import sampling_params
from tgi_npu_backend.wire import request_spec

PROMPT = "The quick brown fox jumps over the lazy dog."
SENTINEL = "Sentinel"  # the fake shard's token sequence from it meets no EOS for 1000 tokens
NORMAL = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}


def gen(**params) -> dict:
    params.setdefault("max_new_tokens", 3)
    return {"inputs": PROMPT, "parameters": params}


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **fields}


def raw_params(fragment: str) -> bytes:
    """A body Python's json.dumps cannot write (NaN, Infinity, 1e400, ...)."""
    return f'{{"inputs": "hi", "parameters": {{"max_new_tokens": 2, {fragment}}}}}'.encode()


SURROGATE = '"\\ud800"'  # a lone surrogate, as a JSON escape

# (name, path, body: dict | bytes, status, substring of "error")
PROBES = [
    ("invalid JSON", "/generate", b"{not json", 400, "Failed to parse the request body as JSON"),
    ("body not an object", "/generate", b"[1, 2]", 422, "expected a JSON object"),
    ("missing inputs", "/generate", {"parameters": {}}, 422, "missing field `inputs`"),
    ("wrong type", "/generate", gen(temperature="hot"), 422, 'invalid type: string "hot"'),
    ("int as float", "/generate", gen(max_new_tokens=2.5), 422, "expected u32"),
    ("top_k > i32", "/generate", gen(top_k=2**40), 422, "parameters.top_k: invalid value"),
    ("top_k < 1", "/generate", gen(top_k=-3), 422, "`top_k` must be strictly positive"),
    ("top_n > u32", "/generate", gen(top_n_tokens=2**32), 422, "expected u32"),
    ("max_new > u32", "/generate", gen(max_new_tokens=2**32), 422, "expected u32"),
    ("seed > u64", "/generate", gen(seed=2**64), 422, "expected u64"),
    ("seed < 0", "/generate", gen(seed=-1), 422, "expected u64"),
    ("truncate > usize", "/generate", gen(truncate=2**64), 422, "expected usize"),
    ("huge int", "/generate", raw_params('"seed": ' + "9" * 5000), 400, "Failed to parse"),
    ("chat seed > u64", "/v1/chat/completions", chat(seed=2**64), 422, "expected u64"),
    ("completion seed > u64", "/v1/completions", {"prompt": "hi", "seed": 2**64}, 422, "u64"),
    ("top_logprobs > u32", "/v1/chat/completions", chat(top_logprobs=2**32), 422, "u32"),
    ("chat max_tokens < 0", "/v1/chat/completions", chat(max_tokens=-1), 422, "expected u32"),
    ("temperature 1e300", "/generate", gen(temperature=1e300), 422, "expected a finite f32"),
    ("temperature -> f32 0", "/generate", gen(temperature=1e-50), 422, "`temperature` must be"),
    ("top_p -> f32 1", "/generate", gen(top_p=0.99999999), 422, "`top_p` must be > 0.0"),
    ("1e400", "/generate", raw_params('"temperature": 1e400'), 400, "number out of range"),
    *[
        (f"{value} {name}", "/generate", raw_params(f'"{name}": {value}'), 400, value)
        for name in ("temperature", "top_p", "typical_p", "repetition_penalty")
        for value in ("NaN", "Infinity", "-Infinity")
    ],
    ("NaN chat", "/v1/chat/completions", b'{"messages": [], "temperature": NaN}', 400, "NaN"),
    ("presence_penalty", "/v1/chat/completions", chat(presence_penalty=-3), 422, "`presence_penalty` must be > -2.0"),
    ("1000 stops", "/generate", gen(stop=["x"] * 1000), 422, "`stop` supports up to 4 stop sequences. Given: 1000"),
    ("stop not strings", "/generate", gen(stop=[1]), 422, "expected a sequence of strings"),
    ("surrogate in stop", "/generate", raw_params(f'"stop": [{SURROGATE}]'), 400, "lone surrogate"),
    ("surrogate in inputs", "/generate", b'{"inputs": "a\\udfffb"}', 400, "lone surrogate"),
    ("surrogate in chat", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', 400, "lone surrogate"),
    ("surrogate in key", "/generate", b'{"inputs": "a", "\\ud800": 1}', 400, "lone surrogate"),
    ("surrogate in /tokenize", "/tokenize", b'{"inputs": "\\ud800"}', 400, "lone surrogate"),
    ("encoded surrogate", "/generate", b'{"inputs": "\xed\xa0\x80"}', 400, "invalid UTF-8"),
    ("invalid UTF-8", "/generate", b'{"inputs": "\xff\xfe"}', 400, "invalid UTF-8"),
    ("100k-deep JSON", "/generate", b"[" * 100_000 + b"]" * 100_000, 400, "recursion limit"),
    ("200-deep JSON", "/generate", b'{"inputs": "a", "x": ' + b"[" * 200 + b"]" * 200 + b"}",
     400, "recursion limit"),
    ("100k-deep /tokenize", "/tokenize", b"[" * 100_000, 400, "recursion limit"),
    ("empty inputs", "/generate", {"inputs": ""}, 422, "`inputs` cannot be empty"),
    ("empty chat", "/v1/chat/completions", {"messages": []}, 422, "Template error"),
    ("role not a string", "/v1/chat/completions", {"messages": [{"role": 5, "content": "x"}]},
     422, "messages[0].role"),
    ("no role", "/v1/chat/completions", {"messages": [{"content": "x"}]}, 422, "missing field `role`"),
    ("content part type", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 422, "must be `text`"),
    ("content part text", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 422, "expected a string"),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, 422, "messages: invalid type: string \"hi\", expected a sequence"),
    ("no messages", "/v1/chat/completions", {"max_tokens": 3}, 422, "missing field `messages`"),
    ("too many prompts", "/v1/completions", {"prompt": ["a"] * 5}, 422, "maximum allowed batch size"),
    ("best_of", "/generate", gen(best_of=2, do_sample=True), 422, "best_of"),
    ("bad regex", "/generate", gen(grammar={"type": "regex", "value": "(a"}), 422, "grammar is not valid"),
    ("bad schema", "/generate", gen(grammar={"type": "json", "value": {"type": "nonsense"}}), 422,
     "grammar is not valid"),
    ("schema not JSON", "/generate", gen(grammar={"type": "json", "value": "{"}), 422, "grammar is not valid"),
    ("grammar type", "/generate", gen(grammar={"type": "xml", "value": "a"}), 422, "unknown variant `xml`"),
    ("bad response_format", "/v1/chat/completions",
     chat(response_format={"type": "json_schema", "value": {"schema": {"type": 5}}}), 422, "grammar is not valid"),
    ("tools + response_format", "/v1/chat/completions",
     chat(response_format={"type": "json_object"}, tools=[{"type": "function", "function": {"name": "f"}}]),
     422, "Grammar and tools are mutually exclusive"),
    ("unknown tool_choice", "/v1/chat/completions",
     chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="g"), 422, "Tool with name g not found"),
    ("tool without name", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {}}]), 422,
     "tools[0].function: missing field `name`"),
    ("invocations shape", "/invocations", {"nothing": 1}, 422, "did not match any variant"),
    ("truncate too big", "/generate", gen(truncate=10_000), 422, "`truncate` must be strictly positive"),
    ("too long", "/generate", {"inputs": "word " * 200}, 422, "must have less than 64 tokens"),
    ("50 MB body", "/generate", b'{"inputs": "' + b"a" * 50_000_000 + b'"}', 413, ""),
]


def refused_by_shard(batch_requests) -> list[str]:
    """What the real shard's per-request checks say about requests the router sent."""
    refused = []
    for r in batch_requests:
        try:
            sampling_params(request_spec(r))
        except ValueError as err:  # InvalidRequestError
            refused.append(str(err))
    return refused


def assert_nothing_refusable(h) -> None:
    prefills = h.calls("Prefill")
    assert prefills, "no Prefill reached the shard"
    for batch in prefills:
        assert refused_by_shard(batch.requests) == []


async def post_raw(h, path: str, body) -> tuple[int, object, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with h.session.post(
        h.url + path, data=data, headers={"Content-Type": "application/json"}
    ) as resp:
        text = await resp.text()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return resp.status, payload, dict(resp.headers)


async def collect_stream(h, body, into: list[int], started: asyncio.Event) -> None:
    async with h.session.post(h.url + "/generate_stream", json=body) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                into.append(json.loads(line[5:])["token"]["id"])
                started.set()


def test_battery_each_probe_gets_a_clear_error_and_the_server_keeps_serving(hf_tokenizer):
    async def scenario():
        async with fake_router(
            hf_tokenizer,
            max_total_tokens=1100,
            max_input_tokens=64,
            max_batch_prefill_tokens=2048,
            shard_kwargs={"step_delay": 0.01},
        ) as h:
            # The sentinel streams through the whole battery; it must keep its exact tokens.
            sentinel: list[int] = []
            started = asyncio.Event()
            task = asyncio.create_task(
                collect_stream(
                    h, {"inputs": SENTINEL, "parameters": {"max_new_tokens": 1000}}, sentinel, started
                )
            )
            await started.wait()
            failures = []
            for name, path, body, status, needle in PROBES:
                got, payload, _ = await post_raw(h, path, body)
                if got != status:
                    failures.append(f"{name}: status {got} != {status}: {str(payload)[:300]}")
                    continue
                if status != 413 and (
                    not isinstance(payload, dict)
                    or needle not in payload.get("error", "")
                    or not payload.get("error_type")
                ):
                    failures.append(f"{name}: {str(payload)[:300]} lacks {needle!r}")
                ok, answer, _ = await post_raw(h, "/generate", NORMAL)
                if ok != 200:
                    failures.append(f"after {name}: a normal request got {ok}: {answer}")
            assert failures == []
            assert not task.done(), "the sentinel ended during the battery"
            seen = len(sentinel)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            want = h.shards[0].expected(SENTINEL, 1000)
            assert seen > 10 and sentinel == want[: len(sentinel)]
            assert_nothing_refusable(h)
            await h.idle()
            assert h.router.scheduler.crashed is None
            assert h.router.allocator.free_blocks == h.router.allocator.capacity

    run(scenario())


def test_a_request_that_breaks_batching_fails_alone(hf_tokenizer, monkeypatch):
    real = batch_queue.request_to_pb

    def flaky(request_id, req, allocation, *rest):
        if "BOOM" in req.inputs:
            raise ValueError("Value out of range")
        return real(request_id, req, allocation, *rest)

    monkeypatch.setattr(batch_queue, "request_to_pb", flaky)

    async def scenario():
        async with fake_router(hf_tokenizer, shard_kwargs={"step_delay": 0.01}) as h:
            results = await asyncio.gather(
                h.post("/generate", {"inputs": "BOOM", "parameters": {"max_new_tokens": 3}}),
                *(h.post("/generate", gen(max_new_tokens=4)) for _ in range(3)),
            )
            (bad_status, bad), *good = results
            assert bad_status == 422 and "cannot be sent to the shard" in bad["error"]
            assert [s for s, _ in good] == [200, 200, 200]
            assert h.router.scheduler.crashed is None
            await h.idle()
            assert h.router.allocator.free_blocks == h.router.allocator.capacity

    run(scenario())


def test_an_unexpected_batching_error_fails_the_batch_and_the_task_serves_on(
    hf_tokenizer, monkeypatch
):
    real = scheduler.generation_events
    calls = {"n": 0}

    def broken_once(gen_pb, queued, start):
        calls["n"] += 1
        if calls["n"] == 1:
            raise IndexError("finish reason 7 out of range")
        return real(gen_pb, queued, start)

    monkeypatch.setattr(scheduler, "generation_events", broken_once)

    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            status, body = await h.post("/generate", gen())
            assert status == 424 and "unexpected router error" in body["error"]
            assert h.calls("ClearCache")[-1] is None  # the shard's batches are dropped
            assert (await h.post("/generate", gen()))[0] == 200
            assert h.router.scheduler.crashed is None
            await h.idle()
            assert h.router.allocator.free_blocks == h.router.allocator.capacity

    run(scenario())


def test_424_messages_name_no_other_request(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer, shard_kwargs={"step_delay": 0.05}) as h:
            first = asyncio.create_task(h.post("/generate", gen(max_new_tokens=4)))
            await asyncio.sleep(0.02)  # the next three wait and are prefilled together
            h.shards[0].fail_next["Prefill"] = "request 1: top_p=nan; request(s) [1, 2, 3] refused"
            others = await asyncio.gather(*(h.post("/generate", gen()) for _ in range(3)))
            assert (await first)[0] == 200
            messages = [body["error"] for status, body in others if status == 424]
            assert len(messages) == 3
            assert all("request 1" not in m and "[1, 2, 3]" not in m for m in messages)
            assert all("this request" in m for m in messages)
            assert sum("another request of the batch: top_p" in m for m in messages) == 2

    run(scenario())


def test_public_message():
    msg = "request 7: slot 3 is bad; batch 2 has no request(s) [7, 9]; request id(s) [9]"
    assert scheduler.public_message(msg, 7) == (
        "this request: slot 3 is bad; batch 2 has no this request; another request of the batch"
    )
    assert "7" not in scheduler.public_message(msg, 9).replace("slot 3", "")


def test_api_key_on_generation_routes_only(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer, api_key="Secret-Key") as h:
            for path, body in (("/generate", NORMAL), ("/tokenize", {"inputs": "hi"}),
                               ("/v1/chat/completions", chat()), ("/", NORMAL)):
                async with h.session.post(h.url + path, json=body) as resp:
                    assert resp.status == 401, path
                    assert "Authorization: Bearer" in (await resp.json())["error"]
                async with h.session.post(
                    h.url + path, json=body, headers={"Authorization": "Bearer wrong"}
                ) as resp:
                    assert resp.status == 401, path
            # case-insensitive, as TGI compares lowercased strings
            for header in ("Bearer Secret-Key", "bearer secret-key"):
                async with h.session.post(
                    h.url + "/generate", json=NORMAL, headers={"Authorization": header}
                ) as resp:
                    assert resp.status == 200
            for path in ("/health", "/info", "/metrics", "/v1/models", "/", "/ping"):
                async with h.session.get(h.url + path) as resp:
                    assert resp.status == 200, path

    run(scenario())


def test_cors(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:  # TGI's default: any origin
            resp = await h.session.get(h.url + "/info", headers={"Origin": "http://x"})
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            resp.release()
        async with fake_router(
            hf_tokenizer, cors_allow_origin=("http://ok.example",), api_key="k"
        ) as h:
            async with h.session.get(
                h.url + "/info", headers={"Origin": "http://ok.example"}
            ) as resp:
                assert resp.headers["Access-Control-Allow-Origin"] == "http://ok.example"
            async with h.session.get(h.url + "/info", headers={"Origin": "http://evil"}) as resp:
                assert "Access-Control-Allow-Origin" not in resp.headers
            # preflight: answered before the API key is checked
            async with h.session.options(
                h.url + "/generate",
                headers={"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"},
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Methods"] == "GET,POST"
                assert "authorization" in resp.headers["Access-Control-Allow-Headers"]
                assert resp.headers["Access-Control-Allow-Origin"] == "http://ok.example"
            # streams carry the header too
            async with h.session.post(
                h.url + "/generate_stream",
                json=NORMAL,
                headers={"Origin": "http://ok.example", "Authorization": "Bearer k"},
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == "http://ok.example"
                await resp.read()

    run(scenario())


def test_stop_drains_in_flight_requests_then_cancels_the_rest(hf_tokenizer):
    async def scenario():
        async with fake_router(
            hf_tokenizer, shutdown_timeout=10.0, shard_kwargs={"step_delay": 0.02}
        ) as h:
            running = asyncio.create_task(h.post("/generate", gen(max_new_tokens=20)))
            await asyncio.sleep(0.1)
            t = time.monotonic()
            await h.router.stop(drain=True)
            status, body = await running
            assert status == 200 and body["generated_text"]  # finished, not cancelled
            assert time.monotonic() - t < 5
            with pytest.raises(aiohttp.ClientError):  # no longer listening
                await h.post("/generate", gen())
        async with fake_router(
            hf_tokenizer, shutdown_timeout=0.3, shard_kwargs={"step_delay": 0.02}
        ) as h:
            running = asyncio.create_task(h.post("/generate", gen(max_new_tokens=120)))
            await asyncio.sleep(0.1)
            t = time.monotonic()
            await h.router.stop(drain=True)  # the grace period ends first: cancelled
            assert time.monotonic() - t < 3
            result = await asyncio.gather(running, return_exceptions=True)
            assert isinstance(result[0], Exception) or result[0][0] != 200
            assert h.router.allocator.free_blocks == h.router.allocator.capacity

    run(scenario())


def test_truncate_bounds_tokenization_of_a_huge_prompt(hf_tokenizer):
    """A 2 MB prompt with truncate=10 is counted from a tail, in milliseconds, and without
    holding the event loop; without truncate it is refused just as fast."""
    validator = Validator(
        Tokenizer(hf_tokenizer), ValidationLimits(max_input_tokens=64, max_total_tokens=128)
    )
    text = ("The quick brown fox jumps over the lazy dog. 深度学习 " * 40_000)[:2_000_000]

    async def scenario():
        t = time.monotonic()
        length, ids = await validator.count(text, True, 10)
        assert (length, ids) == (10, None)
        with pytest.raises(ValidationError, match="must have less than 64 tokens. Given: more than"):
            await validator.count(text, True, None)
        return time.monotonic() - t

    assert run(scenario()) < 0.3
    short = "word " * 20  # short prompts are counted exactly, ids kept for prefix caching
    length, ids = run(validator.count(short, True, None))
    assert ids == hf_tokenizer(short)["input_ids"] and length == len(ids)


# ---------------------------------------------------------------------------------- fuzzing
class LiveRouter:
    """A fake-shard router on its own event loop thread, for synchronous hypothesis examples."""

    def __init__(self, hf_tokenizer) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.done: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, args=(hf_tokenizer,), daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    def _run(self, hf_tokenizer) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            self.done = asyncio.Event()
            async with fake_router(hf_tokenizer) as h:
                self.h = h
                self.url = h.url
                self.ready.set()
                await self.done.wait()

        self.loop.run_until_complete(main())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.done.set)
        self.thread.join(30)


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """``one_of`` with weights (one_of drops repeated strategies)."""
    return st.sampled_from([i for i, (w, _) in enumerate(choices) for _ in range(w)]).flatmap(
        lambda i: choices[i][1]
    )


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
numbers = st.one_of(
    st.integers(min_value=-(2**66), max_value=2**66),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, 2, 4, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64,
                     0.5, 1e-45, 1e-50, 3.5e38, 1e300, -2.0, 2.0, 0.9999999]),
)
adversarial = st.one_of(numbers, json_value, st.lists(st.text(max_size=5), max_size=6))
# Mostly values the router accepts, so that requests also reach the shards and run.
PLAUSIBLE = {
    "temperature": st.floats(0.05, 3.0),
    "top_k": st.integers(1, 100),
    "top_p": st.floats(0.05, 0.95),
    "typical_p": st.floats(0.05, 0.95),
    "repetition_penalty": st.floats(0.5, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "presence_penalty": st.floats(-1.5, 2.0),
    "max_new_tokens": st.integers(1, 20),
    "max_tokens": st.integers(1, 20),
    "seed": st.integers(0, 2**64 - 1),
    "top_n_tokens": st.integers(0, 5),
    "top_logprobs": st.integers(0, 5),
    "truncate": st.integers(1, 64),
    "stop": st.lists(st.text(max_size=4), max_size=4),
    "do_sample": st.booleans(),
    "details": st.booleans(),
    "decoder_input_details": st.booleans(),
    "watermark": st.booleans(),
    "return_full_text": st.booleans(),
    "logprobs": st.booleans(),
    "stream": st.booleans(),
    "best_of": st.just(1),
    "adapter_id": st.text(max_size=8),
}


def field_values(names: list[str]):
    """name -> value, each value plausible 4 times out of 5."""
    return st.lists(
        st.sampled_from(names).flatmap(
            lambda n: st.tuples(st.just(n), weighted((4, PLAUSIBLE[n]), (1, adversarial)))
        ),
        max_size=6,
    ).map(dict)


PARAMS = ["temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "frequency_penalty",
          "max_new_tokens", "seed", "top_n_tokens", "truncate", "stop", "do_sample", "details",
          "decoder_input_details", "best_of", "watermark", "return_full_text", "adapter_id"]
generate_body = st.fixed_dictionaries(
    {"inputs": weighted((4, st.text(min_size=1, max_size=60)), (1, st.text(max_size=2)),
                        (1, json_value))},
    optional={"parameters": weighted((4, field_values(PARAMS)), (1, json_value)),
              "add_special_tokens": st.one_of(st.booleans(), json_value)},
)
chat_body = st.fixed_dictionaries(
    {"messages": weighted(
        (4, st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["user", "system", "assistant", "x"]),
            "content": weighted((4, st.text(max_size=30)), (1, json_value))}),
            min_size=1, max_size=3)),
        (1, json_value))},
).flatmap(lambda body: field_values(
    ["temperature", "top_p", "max_tokens", "seed", "presence_penalty", "frequency_penalty",
     "top_logprobs", "logprobs", "stop", "stream"]).map(lambda extra: {**body, **extra}))
completion_body = st.fixed_dictionaries(
    {"prompt": weighted((2, st.text(min_size=1, max_size=40)),
                        (1, st.lists(st.text(min_size=1, max_size=10), max_size=5)), (1, json_value))},
).flatmap(lambda body: field_values(
    ["temperature", "top_p", "max_tokens", "seed", "stream", "repetition_penalty", "stop"]
).map(lambda extra: {**body, **extra}))
# Strings Python's json writes but serde_json refuses: NaN/Infinity, lone surrogates.
raw_mutation = weighted(
    (3, st.just("")),
    (1, st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", '"\\ud800"', "1" * 30])),
)
bodies = st.tuples(
    weighted(
        (3, st.tuples(st.sampled_from(["/generate", "/generate_stream", "/", "/tokenize"]),
                      generate_body)),
        (3, st.tuples(st.just("/v1/chat/completions"), chat_body)),
        (3, st.tuples(st.just("/v1/completions"), completion_body)),
        (1, st.tuples(st.sampled_from(["/generate", "/v1/chat/completions"]), json_value)),
    ),
    raw_mutation,
).map(lambda t: (t[0][0], t[0][1], t[1]))


@pytest.fixture(scope="module")
def live_router(hf_tokenizer):
    router = LiveRouter(hf_tokenizer)
    yield router
    router.close()


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bodies)
def test_fuzzed_http_bodies_get_clear_answers(live_router, case):
    path, body, mutation = case
    data = json.dumps(body)
    if mutation and isinstance(body, dict) and body:
        key = next(iter(body))
        data = data.replace(json.dumps(key) + ": ", json.dumps(key) + ": " + mutation + ", \"_\": ", 1)
    resp = requests.post(live_router.url + path, data=data.encode(), timeout=30,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code in (200, 400, 413, 422), (resp.status_code, resp.text[:300])
    if resp.status_code != 200:
        error = resp.json()
        assert error["error"] and error["error_type"], error
    assert live_router.h.router.scheduler.crashed is None
    for batch in live_router.h.calls("Prefill"):
        assert refused_by_shard(batch.requests) == [], data
    assert requests.post(live_router.url + "/generate", json=NORMAL, timeout=30).status_code == 200
