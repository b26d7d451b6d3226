"""Issue 15's HTTP surface over fake shards: /api-doc/openapi.json built from the request models,
/docs offline, /invocations, /chat_tokenize, SSE keep-alive comments, and TGI's metric names,
labels and buckets."""

from __future__ import annotations

import json
import re

from harness import fake_router, run
from tgi_npu_backend.launcher import docs, metrics, openapi
from tgi_npu_backend.launcher.openai_schemas import ChatRequest
from tgi_npu_backend.launcher.schemas import GenerateParameters

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "hello"}]


def test_openapi_document_is_the_request_models(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            async with h.session.get(h.url + "/api-doc/openapi.json") as resp:
                assert resp.status == 200
                doc = await resp.json()
            assert doc["openapi"] == "3.0.3"
            # TGI's routes, each documented
            for path in (
                "/",
                "/generate",
                "/generate_stream",
                "/v1/chat/completions",
                "/v1/completions",
                "/invocations",
                "/tokenize",
                "/chat_tokenize",
                "/info",
                "/health",
                "/metrics",
                "/v1/models",
            ):
                assert path in doc["paths"], path
            schemas = doc["components"]["schemas"]
            assert set(schemas["GenerateParameters"]["properties"]) == set(
                GenerateParameters.model_fields
            )
            chat_fields = {f.alias or n for n, f in ChatRequest.model_fields.items()}
            assert set(schemas["ChatRequest"]["properties"]) == chat_fields
            top_k = schemas["GenerateParameters"]["properties"]["top_k"]
            assert top_k["type"] == "integer" and top_k["maximum"] == 2**31 - 1
            assert top_k["nullable"] is True
            grammar = schemas["GenerateParameters"]["properties"]["grammar"]
            assert grammar["discriminator"]["propertyName"] == "type"
            # every $ref resolves
            text = json.dumps(doc)
            for name in set(re.findall(r'"#/components/schemas/([^"]+)"', text)):
                assert name in schemas, name
            # no JSON Schema 2020-12 construct OpenAPI 3.0 lacks
            assert '{"type": "null"}' not in text and '"const"' not in text

    run(scenario())


def test_docs_page_works_offline_and_degrades_without_swagger_ui(hf_tokenizer, monkeypatch):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            async with h.session.get(h.url + "/docs") as resp:
                page = await resp.text()
                assert resp.status == 200 and resp.content_type == "text/html"
            if docs.swagger_ui_dir() is not None:
                assert "/api-doc/openapi.json" in page and "http" not in page.split("<body>")[1]
                for asset in re.findall(r'(?:src|href)="([^"]+)"', page):
                    async with h.session.get(h.url + asset) as resp:
                        assert resp.status == 200, asset
        monkeypatch.setattr(docs, "swagger_ui_dir", lambda: None)
        async with fake_router(hf_tokenizer) as h:
            async with h.session.get(h.url + "/docs") as resp:
                page = await resp.text()
            assert "pip install swagger-ui-bundle" in page
            assert "<code>POST /v1/chat/completions</code>" in page

    run(scenario())


def test_invocations_dispatches_on_the_body_shape(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            status, body = await h.post(
                "/invocations", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
            )
            want = hf_tokenizer.decode(h.shards[0].expected(PROMPT, 3), skip_special_tokens=True)
            assert status == 200 and body == [{"generated_text": want}]
            status, body = await h.post(
                "/invocations", {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}
            )
            assert status == 200 and body["object"] == "chat.completion"
            status, body = await h.post(
                "/invocations", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
            )
            assert status == 200 and body["object"] == "text_completion"
            status, events = await h.sse(
                "/invocations",
                {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}, "stream": True},
            )
            assert status == 200 and [e["index"] for e in events] == [1, 2, 3]
            assert events[-1]["generated_text"] == want
            status, err = await h.post("/invocations", {"inputs": 5})
            assert status == 422 and "inputs: invalid type: integer `5`" in err["error"]

    run(scenario())


def test_chat_tokenize_matches_the_template_and_tokenizer(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            status, body = await h.post("/chat_tokenize", {"messages": MESSAGES})
            assert status == 200 and set(body) == {"tokenize_response", "templated_text"}
            text = hf_tokenizer.apply_chat_template(
                MESSAGES, tokenize=False, add_generation_prompt=True
            )
            assert body["templated_text"] == text
            ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert [t["id"] for t in body["tokenize_response"]] == ids
            for t in body["tokenize_response"]:
                assert text[t["start"] : t["stop"]] == t["text"]
            status, err = await h.post("/chat_tokenize", {"messages": 3})
            assert status == 422 and err["error_type"] == "validation"

    run(scenario())


def test_long_streams_get_keep_alive_comments(hf_tokenizer):
    async def scenario():
        async with fake_router(
            hf_tokenizer, keep_alive_s=0.05, shard_kwargs={"step_delay": 0.2}
        ) as h:
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
            async with h.session.post(h.url + "/generate_stream", json=body) as resp:
                raw = (await resp.read()).decode()
            events = [json.loads(x[5:]) for x in raw.split("\n\n") if x.startswith("data:")]
            assert raw.split("\n\n").count(":") >= 3  # comment lines: ~4 per 0.2 s step
            assert [e["token"]["id"] for e in events] == h.shards[0].expected(PROMPT, 3)

    run(scenario())


def test_metrics_names_labels_and_buckets_as_tgi(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer, max_input_tokens=50, max_total_tokens=100) as h:
            status, _ = await h.post(
                "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
            )
            assert status == 200
            async with h.session.get(h.url + "/metrics") as resp:
                text = await resp.text()
        lines = text.splitlines()
        assert re.search(r"^tgi_batch_max_total_tokens \d+$", text, re.MULTILINE)
        assert "# HELP tgi_request_count Total number of requests" in lines
        assert "# TYPE tgi_batch_current_max_tokens gauge" in lines
        bounds = [
            float(m)
            for m in re.findall(
                r'^tgi_request_input_length_bucket\{le="([^"+]+)"\}', text, re.MULTILINE
            )
        ]
        assert bounds == [0.5 * (k + 1) for k in range(100)]  # max_input_tokens / 100 steps
        gen = re.findall(
            r'^tgi_request_generated_tokens_bucket\{le="([^"+]+)"\}', text, re.MULTILINE
        )
        assert [float(b) for b in gen] == [1.0 * (k + 1) for k in range(100)]
        duration = re.findall(r'^tgi_request_duration_bucket\{le="([^"+]+)"\}', text, re.MULTILINE)
        assert len(duration) == 35 and float(duration[0]) == 0.0001 * 1.5
        assert float(duration[-1]) == metrics.DURATION_BUCKETS[-1]
        assert 'tgi_batch_inference_count{method="prefill"} 1' in lines
        next_size = re.findall(r'^tgi_batch_next_size_bucket\{le="([^"+]+)"\}', text, re.MULTILINE)
        assert len(next_size) == 1024

    run(scenario())


def test_openapi_module_has_every_model_it_references():
    doc = openapi.openapi_document("test")
    assert doc["info"]["version"] == "test"
    schemas = doc["components"]["schemas"]
    assert {"TextChunk", "ImageUrlChunk", "TypedChoice", "Token", "Chunk"} <= set(schemas)


def test_api_key_guards_invocations_not_the_docs_or_chat_tokenize(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer, api_key="sekret") as h:
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
            status, _ = await h.post("/invocations", body)
            assert status == 401
            auth = {"Authorization": "Bearer sekret"}
            async with h.session.post(h.url + "/invocations", json=body, headers=auth) as resp:
                assert resp.status == 200
            status, _ = await h.post("/chat_tokenize", {"messages": MESSAGES})
            assert status == 200
            for path in ("/docs", "/api-doc/openapi.json"):
                async with h.session.get(h.url + path) as resp:
                    assert resp.status == 200, path

    run(scenario())


def _event_models(doc: dict, path: str) -> list:
    """The models a route's stream events are documented as (``x-data-schema``)."""
    from tgi_npu_backend.launcher import openai_schemas, schemas

    event = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
    names = [ref["$ref"].rsplit("/", 1)[1] for ref in event["schema"]["x-data-schema"]["anyOf"]]
    return [getattr(schemas, n, None) or getattr(openai_schemas, n) for n in names]


def _conforms(event, models) -> bool:
    from pydantic import ValidationError

    for model in models:
        try:
            model.model_validate(event, strict=True)
            return True
        except ValidationError:
            continue
    return False


def test_stream_events_are_what_the_document_says(hf_tokenizer):
    """Every `data:` event of every streaming route validates against a model its
    `x-data-schema` names (schemathesis checks the JSON answers; OpenAPI 3.0 cannot describe
    an event's JSON, so this test does)."""
    openapi_spec_validator = __import__("pytest").importorskip("openapi_spec_validator")
    doc = openapi.openapi_document("test")
    openapi_spec_validator.validate(doc)  # a valid OpenAPI 3.0 document
    gen = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True, "top_n_tokens": 2}}
    chat = {"messages": MESSAGES, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    cases = [
        ("/generate_stream", gen),
        ("/", {**gen, "stream": True}),
        ("/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2, "stream": True}),
        ("/v1/completions", {"prompt": "a", "max_tokens": 2, "stream": True}),
        ("/invocations", {"messages": MESSAGES, "max_tokens": 2, "stream": True}),
    ]

    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            for path, body in cases:
                status, events = await h.sse(path, body)
                assert status == 200 and events, path
                models = _event_models(doc, path)
                for event in events:
                    if event == "[DONE]":
                        continue
                    assert _conforms(event, models), (path, event)

    run(scenario())
