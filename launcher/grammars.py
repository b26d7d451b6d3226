"""A request's ``grammar`` / ``response_format``, checked before it can reach a Prefill.

TGI's router (``validation.rs``) refuses grammars when ``--disable-grammar-support`` is given
("grammar is not supported"), parses a JSON schema given as a string, checks it against the
JSON Schema 2020-12 meta-schema ("grammar is not valid: ..."), and the shard compiles it. Here
the launcher also compiles it with the shard's own checker (``tgi_npu_backend.grammar``), so a
grammar the shard cannot compile is a 422 for that request alone and never fails a Prefill that
other requests share.

Differences from TGI, on purpose: a JSON schema needs no top-level ``properties`` (TGI needs it
for outlines' regex conversion; llguidance compiles any schema it supports), ``json_object``
without a ``value`` means any JSON object (OpenAI's ``{"type": "json_object"}``), and the JSON
schema is sent to the shard as ``GRAMMAR_TYPE_JSON`` (TGI's v3 router sends a regex).
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from .entities import ValidGrammar
from .errors import ValidationError
from .schemas import JsonGrammar, JsonSchemaGrammar, RegexGrammar

ANY_OBJECT = {"type": "object"}


def _schema_of(grammar: JsonGrammar | JsonSchemaGrammar) -> Any:
    if isinstance(grammar, JsonSchemaGrammar):
        config = grammar.value or grammar.json_schema
        if config is None:
            raise ValidationError(
                "grammar is not valid: a `json_schema` grammar needs "
                '`value` (or `json_schema`): {"name": ..., "schema": {...}}'
            )
        return config.schema_
    value = grammar.value
    if value is None:
        return ANY_OBJECT
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValidationError(f"grammar is not valid: {err}") from None
    return value


def validate_grammar(
    grammar: JsonGrammar | RegexGrammar | JsonSchemaGrammar | None, disabled: bool
) -> ValidGrammar | None:
    """The grammar to send, or None; ``ValidationError`` (422) with TGI's wording otherwise."""
    if grammar is None:
        return None
    if disabled:
        raise ValidationError("grammar is not supported")
    if isinstance(grammar, RegexGrammar):
        valid = ValidGrammar("regex", grammar.value)
    else:
        schema = _schema_of(grammar)
        if not isinstance(schema, dict):
            raise ValidationError(
                "grammar is not valid: a JSON schema must be a JSON object (or a string holding "
                f"one), not {type(schema).__name__}"
            )
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as err:
            where = "/".join(str(p) for p in err.path)
            raise ValidationError(
                f"grammar is not valid: {err.message}" + (f" (at `{where}`)" if where else "")
            ) from None
        valid = ValidGrammar("json", json.dumps(schema, ensure_ascii=False))
    from tgi_npu_backend.grammar import GrammarError, check_grammar  # llguidance: load on use

    try:
        check_grammar(valid.kind, valid.value)
    except GrammarError as err:
        raise ValidationError(f"grammar is not valid: {err}") from None
    return valid
