"""check_grammar: the launcher's pre-Prefill check; accepts what the shard compiles and refuses
the rest with a message that says what to change."""

from __future__ import annotations

import json

import pytest

from tgi_npu_backend.grammar import GrammarError, check_grammar

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "[0-9]{5}"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age"],
}
# The shape of regex the stock v3 router derives from a schema (outlines-core's
# json_schema_to_regex) and sends as GRAMMAR_TYPE_REGEX.
ROUTER_REGEX = (
    r'\{[ ]?"name"[ ]?:[ ]?"([^"\\\x00-\x1F\x7F-\x9F]|\\["\\/bfnrt]){0,10}"[ ]?,[ ]?"age"[ ]?:'
    r'[ ]?(-)?(0|[1-9][0-9]*)([ ]?,[ ]?"tags"[ ]?:[ ]?\[[ ]?((("a"|"b"))(,[ ]?(("a"|"b"))){0,})?'
    r"[ ]?\])?[ ]?\}"
)


@pytest.mark.parametrize(
    "grammar_type, value",
    [
        ("json", json.dumps(PERSON)),
        ("json", json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}})),
        ("json", json.dumps({"$defs": {"p": {"type": "number"}}, "type": "array", "items": {"$ref": "#/$defs/p"}})),
        ("json", "{}"),
        ("regex", r"[0-9]{3}-[a-z]+"),
        ("regex", r"(yes|no)"),
        ("regex", ROUTER_REGEX),
        ("regex", ""),  # an empty grammar is no grammar
    ],
)
def test_accepts(grammar_type, value):
    check_grammar(grammar_type, value)


@pytest.mark.parametrize(
    "grammar_type, value, says",
    [
        ("json", "", "not valid JSON"),
        ("json", "{'type': 'object'}", "not valid JSON"),
        ("json", "[1, 2]", "must be a JSON object, got list"),
        ("json", "true", "must be a JSON object, got bool"),
        ("json", '{"type": "strng"}', "Invalid type: strng"),
        ("json", '{"type": "object", "properties": {"a": {"$ref": "#/defs/x"}}}', "/defs/x"),
        ("json", '{"type": "array", "contains": {"type": "integer"}}', "contains"),
        ("json", '{"type": "string", "pattern": "(?<=a)b"}', "look-around"),
        ("regex", "(a", "unclosed group"),
        ("regex", "a{3,1}", "repetition count range"),
        ("regex", r"(a)\1", "backreferences are not supported"),
        ("xml", "<a/>", "use 'json' (a JSON schema) or 'regex'"),
    ],
)
def test_refuses_with_a_message_to_act_on(grammar_type, value, says):
    with pytest.raises(GrammarError) as info:
        check_grammar(grammar_type, value)
    message = str(info.value)
    assert says in message
    # llguidance's own grammar excerpt ("   1 | start: /.../") is not the user's input
    assert " | start:" not in message and not message.startswith("at ")


def test_grammar_error_is_a_value_error():
    # The shard maps ValueError to INVALID_ARGUMENT; the launcher to a 422.
    assert issubclass(GrammarError, ValueError)


def test_objects_close_as_in_tgi():
    from tgi_npu_backend.grammar.spec import close_objects

    schema = {
        "type": "object",
        "properties": {
            # a property *named* "properties": its map is not an object schema
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "list": {"type": "array", "items": {"properties": {"y": {"type": "string"}}}},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
        },
        "allOf": [{"properties": {"a": {"type": "integer"}}}],
        "$defs": {"d": {"properties": {"z": {"type": "null"}}}},
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert set(closed["properties"]) == {"properties", "list", "open"}
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert closed["properties"]["list"]["items"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True  # said explicitly
    assert "additionalProperties" not in closed["allOf"][0]  # an intersection's parts stay open
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is not changed
