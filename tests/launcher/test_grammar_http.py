"""Issue 9's HTTP part over fake shards: ``parameters.grammar``, ``response_format``, ``tools`` +
``tool_choice`` (TGI's tool grammar; answers as ``tool_calls``, streamed as deltas),
``--disable-grammar-support``. The fake shard answers a grammar request with a scripted text
(standing in for a model that follows the grammar), so the HTTP shapes are tested here; the
real shard's constrained decoding is tested in tests/shard."""

from __future__ import annotations

import json

import pytest
from harness import fake_router, run
from tgi_npu_backend.launcher.openai_schemas import ChatCompletionChunk, Tool
from tgi_npu_backend.launcher.tools import ToolStream, tool_schema

from tgi_npu_backend.grammar import check_grammar
from tgi_npu_backend.pb import generate_pb2 as pb

PROMPT = "The quick brown fox"
BIG = {
    "max_input_tokens": 1000,
    "max_total_tokens": 1100,
    "max_batch_prefill_tokens": 2048,
}  # room for the tools' prompt
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL = '{"function": {"_name": "get_weather", "location": "Paris, FR", "unit": "celsius"}}'


def script_for(text: str):
    """Answer ``text`` to requests with a grammar; the usual tokens to the others."""
    return lambda r: text if r.parameters.grammar else None


def sent_grammar(h) -> tuple[int, str]:
    r = h.calls("Prefill")[-1].requests[0]
    return r.parameters.grammar_type, r.parameters.grammar


def test_generate_grammar_reaches_the_shard_as_tgi_sends_it(hf_tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

    async def scenario():
        async with fake_router(hf_tokenizer, shard_kwargs={"script": script_for('{"a": 7}')}) as h:
            body = {
                "inputs": PROMPT,
                "parameters": {"max_new_tokens": 20, "grammar": {"type": "json", "value": schema}},
            }
            status, out = await h.post("/generate", body)
            assert status == 200 and json.loads(out["generated_text"]) == {"a": 7}
            kind, text = sent_grammar(h)
            assert kind == pb.GRAMMAR_TYPE_JSON and json.loads(text) == schema
            # a schema given as a string, json_object without a value, a regex, a stream
            body["parameters"]["grammar"] = {"type": "json", "value": json.dumps(schema)}
            assert (await h.post("/generate", body))[0] == 200
            assert json.loads(sent_grammar(h)[1]) == schema
            body["parameters"]["grammar"] = {"type": "json_object"}
            assert (await h.post("/generate", body))[0] == 200
            assert json.loads(sent_grammar(h)[1]) == {"type": "object"}
            body["parameters"]["grammar"] = {"type": "regex", "value": r"\{\"a\": \d+\}"}
            status, events = await h.sse("/generate_stream", body)
            assert status == 200 and events[-1]["generated_text"] == '{"a": 7}'
            assert sent_grammar(h) == (pb.GRAMMAR_TYPE_REGEX, r"\{\"a\": \d+\}")
            # without a grammar the request carries none
            status, _ = await h.post(
                "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
            )
            assert sent_grammar(h) == (pb.GRAMMAR_TYPE_NONE, "")

    run(scenario())


def test_bad_grammars_are_422_and_never_reach_a_prefill(hf_tokenizer):
    bad = [
        ({"type": "regex", "value": "(unclosed"}, "grammar is not valid"),
        ({"type": "json", "value": {"type": "object", "properties": 3}}, "grammar is not valid"),
        ({"type": "json", "value": {"$ref": "#/$defs/missing"}}, "grammar is not valid"),
        ({"type": "json", "value": "[1, 2"}, "grammar is not valid"),
        ({"type": "json", "value": 5}, "must be a JSON object"),
        ({"type": "json_schema"}, "needs `value`"),
    ]

    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            for grammar, needle in bad:
                body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "grammar": grammar}}
                for route in ("/generate", "/generate_stream"):
                    status, out = await h.post(route, body)
                    assert status == 422 and needle in out["error"], (grammar, out)
                    assert out["error_type"] == "validation"
            assert h.calls("Prefill") == []
            ok = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
            assert (await h.post("/generate", ok))[0] == 200

    run(scenario())


def test_disable_grammar_support(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer, disable_grammar_support=True) as h:
            body = {"inputs": PROMPT, "parameters": {"grammar": {"type": "regex", "value": "a+"}}}
            status, out = await h.post("/generate", body)
            assert (status, out["error"]) == (422, "grammar is not supported")
            chat = {"messages": MESSAGES, "response_format": {"type": "json_object"}}
            status, out = await h.post("/v1/chat/completions", chat)
            assert (status, out["error"]) == (422, "grammar is not supported")
            status, out = await h.post(
                "/v1/chat/completions", {"messages": MESSAGES, "tools": [WEATHER]}
            )
            assert (status, out["error"]) == (422, "grammar is not supported")

    run(scenario())


def test_response_format_with_the_openai_client(hf_tokenizer):
    openai = pytest.importorskip("openai")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    answer = '{"city": "Paris", "days": 3}'

    async def scenario():
        async with fake_router(hf_tokenizer, shard_kwargs={"script": script_for(answer)}) as h:
            client = openai.AsyncOpenAI(base_url=h.url + "/v1", api_key="-")
            out = await client.chat.completions.create(
                model="tgi",
                messages=MESSAGES,
                max_tokens=30,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "trip", "schema": schema, "strict": True},
                },
            )
            assert json.loads(out.choices[0].message.content) == {"city": "Paris", "days": 3}
            assert json.loads(sent_grammar(h)[1]) == schema
            # TGI's own shape: value instead of json_schema; json_object with a value
            for fmt in (
                {"type": "json_schema", "value": {"name": "trip", "schema": schema}},
                {"type": "json_object", "value": schema},
                {"type": "json", "value": schema},
            ):
                status, body = await h.post(
                    "/v1/chat/completions",
                    {"messages": MESSAGES, "max_tokens": 30, "response_format": fmt},
                )
                assert status == 200 and body["choices"][0]["message"]["content"] == answer
                assert json.loads(sent_grammar(h)[1]) == schema
            await client.close()

    run(scenario())


def test_tool_grammar_has_tgis_shape_and_compiles():
    tools = [Tool.model_validate(WEATHER), Tool.model_validate(TIME)]
    schema = tool_schema(tools)
    weather = schema["$functions"]["get_weather"]
    assert weather["properties"]["_name"] == {"type": "string", "const": "get_weather"}
    assert weather["required"] == ["_name", "location"]
    assert weather["additionalProperties"] is False and weather["type"] == "object"
    # an object that must name its function (TGI's schema says neither; JSON Schema then
    # allows a bare number or {}, which llguidance, unlike outlines' regexes, would follow)
    assert schema["type"] == "object" and schema["required"] == ["function"]
    assert schema["properties"]["function"]["anyOf"] == [
        {"$ref": "#/$functions/get_weather"},
        {"$ref": "#/$functions/get_time"},
    ]
    check_grammar("json", json.dumps(schema))  # the shard's own compiler takes it


def test_tool_calls_with_the_openai_client_stream_and_not(hf_tokenizer):
    openai = pytest.importorskip("openai")

    async def scenario():
        async with fake_router(hf_tokenizer, **BIG, shard_kwargs={"script": script_for(CALL)}) as h:
            client = openai.AsyncOpenAI(base_url=h.url + "/v1", api_key="-")
            out = await client.chat.completions.create(
                model="tgi",
                messages=MESSAGES,
                tools=[WEATHER, TIME],
                tool_choice="required",
                max_tokens=200,
            )
            calls = out.choices[0].message.tool_calls
            assert len(calls) == 1 and calls[0].function.name == "get_weather"
            assert json.loads(calls[0].function.arguments) == {
                "location": "Paris, FR",
                "unit": "celsius",
            }
            assert out.choices[0].message.content is None
            grammar = json.loads(sent_grammar(h)[1])
            assert set(grammar["$functions"]) == {"get_weather", "get_time"}  # required: no no_tool
            prompt = h.calls("Prefill")[-1].requests[0].inputs
            assert "get_weather" in prompt and "Given the functions available" in prompt

            stream = await client.chat.completions.create(
                model="tgi",
                messages=MESSAGES,
                tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                max_tokens=200,
                stream=True,
            )
            chunks = [c async for c in stream]
            deltas = [
                c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls
            ]
            assert len(deltas) > 3  # streamed piece by piece
            assert [d.function.name for d in deltas if d.function.name] == ["get_weather"]
            arguments = "".join(d.function.arguments for d in deltas)
            assert json.loads(arguments) == {"location": "Paris, FR", "unit": "celsius"}
            assert chunks[-1].choices[0].finish_reason == "stop"
            assert set(json.loads(sent_grammar(h)[1])["$functions"]) == {"get_weather"}
            # the raw chunks are the documented ChatCompletionChunk (tool-call deltas included)
            body = {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required",
                    "max_tokens": 200, "stream": True}  # fmt: skip
            status, events = await h.sse("/v1/chat/completions", body)
            assert status == 200 and events[-1] == "[DONE]"
            for event in events[:-1]:
                ChatCompletionChunk.model_validate(event, strict=True)
            await client.close()

    run(scenario())


def test_tool_choice_auto_no_tool_answers_in_text_and_none_sends_no_grammar(hf_tokenizer):
    no_tool = '{"function": {"_name": "no_tool"}}'

    async def scenario():
        async with fake_router(
            hf_tokenizer, **BIG, shard_kwargs={"script": script_for(no_tool)}
        ) as h:
            body = {"messages": MESSAGES, "tools": [WEATHER], "max_tokens": 40, "temperature": 0}
            status, out = await h.post("/v1/chat/completions", body)
            assert status == 200
            with_tools, again = h.calls("Prefill")[-2:]
            assert "no_tool" in json.loads(with_tools.requests[0].parameters.grammar)["$functions"]
            plain = again.requests[0]
            assert plain.parameters.grammar == "" and "get_weather" not in plain.inputs
            want = h.shards[0].expected(plain.inputs, 40, add_special_tokens=False)
            assert out["choices"][0]["message"] == {
                "role": "assistant",
                "content": hf_tokenizer.decode(want, skip_special_tokens=True),
            }
            # streaming: the text answer follows in the same stream
            status, events = await h.sse("/v1/chat/completions", {**body, "stream": True})
            assert status == 200 and events[-1] == "[DONE]"
            texts = [e["choices"][0]["delta"]["content"] for e in events[:-1]]
            # (the fake shard's token texts are each token decoded alone)
            assert texts == [hf_tokenizer.decode([t]) for t in want]
            assert events[-2]["choices"][0]["finish_reason"] == "length"
            # tool_choice none: a plain chat request
            status, out = await h.post("/v1/chat/completions", {**body, "tool_choice": "none"})
            assert status == 200 and sent_grammar(h) == (pb.GRAMMAR_TYPE_NONE, "")
            assert "get_weather" not in h.calls("Prefill")[-1].requests[0].inputs

    run(scenario())


def test_tool_output_that_is_not_a_call_is_a_tool_error(hf_tokenizer):
    async def scenario():
        async with fake_router(
            hf_tokenizer, **BIG, shard_kwargs={"script": script_for('{"function": {"_na')}
        ) as h:
            body = {
                "messages": MESSAGES,
                "tools": [WEATHER],
                "tool_choice": "required",
                "max_tokens": 200,
            }
            status, out = await h.post("/v1/chat/completions", body)
            assert status == 422 and out["error_type"] == "tool_error"
            assert out["error"].startswith("Tool error: Failed to parse generated text")

    run(scenario())


def test_tool_stream_deltas_join_into_the_arguments():
    text = '{"function": {"_name": "f", "a": [1, {"b": "x}y"}], "c": null}}'
    for cut in (1, 3, 7):
        stream, deltas = ToolStream(), []
        for i in range(0, len(text), cut):
            deltas += stream.push(text[i : i + cut])
        assert [n for n, _ in deltas if n] == ["f"]
        assert json.loads("".join(a for _, a in deltas)) == {"a": [1, {"b": "x}y"}], "c": None}
    assert ToolStream().push('{"function": {"_name": "no_tool", "x": 1}}') == ("no_tool", None)
