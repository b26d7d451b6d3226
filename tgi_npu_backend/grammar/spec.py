"""What a grammar request says, turned into an llguidance grammar, and checked.

TGI's ``NextTokenChooserParameters`` carry ``grammar`` (text) and ``grammar_type``:

- ``GRAMMAR_TYPE_JSON``: ``grammar`` is a JSON schema (what TGI routers before v3 sent, and what
  tgi-npu-launcher sends). NOTE: the stock v3 router turns a JSON schema into a regex itself
  (outlines-core's ``json_schema_to_regex``) and sends that as ``GRAMMAR_TYPE_REGEX``.
- ``GRAMMAR_TYPE_REGEX``: ``grammar`` is a regex the whole generated text must match (Rust
  ``regex`` syntax, which outlines-core's schema regexes are written in; no look-around or
  back-references).

An empty ``grammar`` means no constraint, whatever the type (TGI: "applied if not empty").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from llguidance import LLMatcher

JSON = "json"
REGEX = "regex"
GRAMMAR_TYPES = (JSON, REGEX)

# llguidance's JSON-schema options. NOTE: no free whitespace between JSON tokens: with the
# default (any run of whitespace allowed) a model can pad the object until max_new_tokens runs
# out and the text never closes; TGI's schema regex allows one optional space instead. Keys
# and items are separated by ", " and ": " as Python's json.dumps writes them.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar that cannot be compiled; the message says what to change."""


@dataclass(frozen=True)
class GrammarSpec:
    """One request's grammar: ``kind`` is ``"json"`` (``value`` = a JSON schema as text) or
    ``"regex"``. Hashable: the compiled-grammar cache is keyed on it."""

    kind: str
    value: str

    def llguidance_grammar(self) -> str:
        """The grammar as llguidance's serialized form, validated without a tokenizer.

        Raises :class:`GrammarError` naming the problem (bad JSON, not an object, an unknown
        ``type``, a dangling ``$ref``, an unsupported keyword or regex feature)."""
        if self.kind == JSON:
            grammar = _json_grammar(self.value)
        elif self.kind == REGEX:
            grammar = LLMatcher.grammar_from_regex(self.value)
        else:
            raise GrammarError(
                f"unknown grammar type {self.kind!r}: use 'json' (a JSON schema) or 'regex'"
            )
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            what = "JSON schema" if self.kind == JSON else "regex"
            raise GrammarError(f"invalid {what} grammar: {_first_lines(messages[0])}")
        return grammar


def _json_grammar(value: str) -> str:
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as e:
        raise GrammarError(f"the JSON schema grammar is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(
            f"a JSON schema grammar must be a JSON object, got {type(schema).__name__} "
            f"{value[:80]!r}"
        )
    try:
        return LLMatcher.grammar_from_json_schema(close_objects(schema), defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema grammar: {e}") from None


# Keywords whose value is a schema, a list of schemas, or a name -> schema map.
_SCHEMA = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames")
_SCHEMA_LIST = ("prefixItems", "anyOf", "oneOf")
_SCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def close_objects(schema):
    """A copy of ``schema`` in which every object schema that lists ``properties`` and says
    nothing about ``additionalProperties`` gets ``"additionalProperties": false``.

    NOTE: TGI's grammars (outlines-core's schema regex) only ever generate the listed
    properties; llguidance follows JSON Schema's default (any other key allowed), which lets a
    model write unlisted keys with unbounded names until max_new_tokens runs out. Every text
    the closed schema allows is valid against the original. Schemas directly under ``allOf``
    stay open: closing each part of an intersection would forbid the other parts' keys.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA:
        if key in out:
            out[key] = close_objects(out[key])
    for key in _SCHEMA_LIST:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(s) for s in out[key]]
    for key in _SCHEMA_MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(s) for name, s in out[key].items()}
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_close_below(s) for s in out["allOf"]]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _close_below(schema):
    """``close_objects`` for everything under ``schema`` but not ``schema`` itself."""
    if not isinstance(schema, dict):
        return schema
    closed = close_objects(schema)
    if "additionalProperties" not in schema and "properties" in schema:
        closed.pop("additionalProperties", None)
    return closed


def _first_lines(message: str) -> str:
    """llguidance's regex messages start with a position in its internal grammar ("at 1(8): ")
    and end with an excerpt of it ("   1 | start: /.../"); keep the part about the user's input."""
    message = re.sub(r"^at \d+\(\d+\): ", "", message.strip())
    lines = []
    for line in message.splitlines():
        if re.match(r"^\s*\d+ \| ", line):
            break
        lines.append(line.rstrip())
    return "\n".join(lines).strip()


def check_grammar(grammar_type: str, value: str) -> None:
    """Raise :class:`GrammarError` unless the shard can compile this grammar.

    ``grammar_type`` is ``"json"`` (``value`` = a JSON schema as text) or ``"regex"``. The
    shard compiles with the same library and options, so what passes here passes Prefill. An
    empty regex is accepted (the shard treats an empty grammar as none); an empty JSON schema
    is not JSON and is refused.
    """
    if grammar_type == REGEX and value == "":
        return
    GrammarSpec(grammar_type, value).llguidance_grammar()
