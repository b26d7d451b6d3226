"""Request bodies are refused in serde's words, with serde_path_to_error's paths (wire.parse)."""

from __future__ import annotations

import pytest
from tgi_npu_backend.launcher.errors import ValidationError
from tgi_npu_backend.launcher.openai_schemas import ChatRequest, CompletionRequest
from tgi_npu_backend.launcher.schemas import GenerateRequest
from tgi_npu_backend.launcher.wire import PREFIX, parse

CASES = [
    (GenerateRequest, [1], "body: invalid type: sequence, expected a JSON object"),
    (GenerateRequest, {}, "missing field `inputs`"),
    (GenerateRequest, {"inputs": 1}, "inputs: invalid type: integer `1`, expected a string"),
    (GenerateRequest, {"inputs": "a", "parameters": {"top_k": 2**31}},
     "parameters.top_k: invalid value: integer `2147483648`, expected i32"),
    (GenerateRequest, {"inputs": "a", "parameters": {"do_sample": 1}},
     "parameters.do_sample: invalid type: integer `1`, expected a boolean"),
    (GenerateRequest, {"inputs": "a", "parameters": {"max_new_tokens": 2.0}},
     "parameters.max_new_tokens: invalid type: floating point `2.0`, expected u32"),
    (GenerateRequest, {"inputs": "a", "parameters": {"top_p": 1e39}},
     "parameters.top_p: invalid value: floating point `1e+39`, expected a finite f32"),
    (GenerateRequest, {"inputs": "a", "parameters": {"grammar": {"type": "regex", "value": 3}}},
     "parameters.grammar.value: invalid type: integer `3`, expected a string"),
    (GenerateRequest, {"inputs": "a", "parameters": {"grammar": {"type": "yaml"}}},
     "parameters.grammar: unknown variant `yaml`"),
    (GenerateRequest, {"inputs": "a", "parameters": {"grammar": {"value": "x"}}},
     "parameters.grammar: missing field `type`"),
    (ChatRequest, {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0]: missing field `text`"),
    (ChatRequest, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url: missing field `url`"),
    (ChatRequest, {"messages": [], "tool_choice": {"type": "function", "function": {}}},
     "tool_choice.function: missing field `name`"),
    (ChatRequest, {"messages": [], "tool_choice": 3}, "tool_choice: invalid type: integer `3`"),
    (ChatRequest, {"messages": [], "tools": [{"type": "function"}]}, "tools[0]: missing field `function`"),
    (CompletionRequest, {"prompt": [1]}, "prompt: invalid type: sequence, expected a sequence of strings"),
]  # fmt: skip


@pytest.mark.parametrize("model,body,message", CASES)
def test_serde_wording(model, body, message):
    with pytest.raises(ValidationError) as err:
        parse(model, body)
    assert str(err.value).startswith(PREFIX + ": ")
    assert message in str(err.value)
    assert err.value.status == 422


def test_what_parses():
    r = parse(GenerateRequest, {"inputs": "a", "parameters": {"stop": "x", "details": None, "temperature": 0.1}})
    assert r.parameters.stop == ["x"] and r.parameters.details is False
    assert r.parameters.temperature == pytest.approx(0.1) and r.parameters.temperature != 0.1  # as f32
    chat = parse(ChatRequest, {"messages": [], "max_completion_tokens": 5, "tool_choice": "get_x"})
    assert chat.max_tokens == 5 and chat.tool_choice.name == "get_x"
    assert parse(ChatRequest, {"messages": [], "tool_choice": None}).tool_choice == "auto"
