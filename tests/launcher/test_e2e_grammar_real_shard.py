"""End to end with the REAL shard (tiny random-weight BLOOM) behind ``tgi-npu-launcher``:
structured output through the ``openai`` client, parsed by its own types. A random model never
writes valid JSON by chance, so every parse below is the grammar at work."""

from __future__ import annotations

import asyncio
import json
import re
import shutil

import jsonschema
import pytest
import requests
from processes import launch

pytestmark = pytest.mark.slow

if shutil.which("text-generation-server") is None:
    pytest.skip("text-generation-server is not installed", allow_module_level=True)
openai = pytest.importorskip("openai")

FLAGS = (
    "--max-input-tokens", "1024",
    "--max-total-tokens", "1200",
    "--max-batch-prefill-tokens", "2048",
)  # fmt: skip
MESSAGES = [{"role": "user", "content": "Plan a short trip."}]
# Finite languages: a random model reaches the end of each within max_tokens.
TRIP = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "by_train": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["art", "food"]}, "maxItems": 2},
    },
    "required": ["city", "days", "by_train"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "hourly": {"type": "boolean"},
    },
    "required": ["city", "unit"],
}
TIDE = {
    "type": "object",
    "properties": {"port": {"type": "string", "pattern": "^[A-Z][a-z]{1,5}$"}},
    "required": ["port"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_tide", "parameters": TIDE}},
]
PARAMETERS = {"get_weather": WEATHER, "get_tide": TIDE}


@pytest.fixture(scope="module")
def server(bloom_dir):
    run = launch(bloom_dir, *FLAGS)
    try:
        run.wait_ready(120)
        yield run
    finally:
        code = run.stop()
        assert code == 0, run.output()[-3000:]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)


def test_response_format_json_schema(server):
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": TRIP, "strict": True}}
    for temperature in (0, 1.0):
        out = c.chat.completions.create(
            model="tgi", messages=MESSAGES, response_format=fmt, max_tokens=80,
            temperature=temperature, seed=3,
        )
        jsonschema.validate(json.loads(out.choices[0].message.content), TRIP)
    # /generate with a regex: the whole text matches
    body = {"inputs": "Code:", "parameters": {"max_new_tokens": 20, "grammar": {"type": "regex", "value": "[A-Z]{2}-[0-9]{3}"}}}
    answer = requests.post(server.url + "/generate", json=body, timeout=60).json()
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", answer["generated_text"]), answer


def test_tool_calls_not_streamed(server):
    out = client(server).chat.completions.create(
        model="tgi", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=100,
        temperature=0,
    )
    (call,) = out.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name in PARAMETERS
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_tool_calls_streamed_as_deltas(server):
    stream = client(server).chat.completions.create(
        model="tgi", messages=MESSAGES, tools=TOOLS, max_tokens=100, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_tide"}}, stream=True,
    )
    deltas = [d for chunk in stream for d in (chunk.choices[0].delta.tool_calls or [])]
    assert len(deltas) > 2
    assert [d.function.name for d in deltas if d.function.name] == ["get_tide"]
    jsonschema.validate(json.loads("".join(d.function.arguments for d in deltas)), TIDE)


def test_auto_answers_with_a_call_or_in_text(server):
    out = client(server).chat.completions.create(
        model="tgi", messages=MESSAGES, tools=TOOLS, max_tokens=100, temperature=0
    )
    message = out.choices[0].message
    if message.tool_calls:
        call = message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    else:  # the model chose no_tool: the request ran again without tools
        assert message.content is not None


def test_bad_schema_is_422_and_requests_in_flight_continue(server):
    async def scenario():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": TRIP}}
        running = asyncio.create_task(
            aclient.chat.completions.create(
                model="tgi", messages=MESSAGES, response_format=fmt, max_tokens=80, temperature=0
            )
        )
        await asyncio.sleep(0.05)
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}
        with pytest.raises(openai.UnprocessableEntityError) as err:
            await aclient.chat.completions.create(
                model="tgi", messages=MESSAGES, response_format=bad, max_tokens=5
            )
        assert "grammar is not valid" in err.value.response.json()["error"]
        out = await running
        jsonschema.validate(json.loads(out.choices[0].message.content), TRIP)
        await aclient.close()

    asyncio.run(scenario())
