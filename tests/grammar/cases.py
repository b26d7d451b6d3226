"""50 JSON schemas and 50 regexes, assorted and deterministic, for the end-to-end grammar tests.

Every language here is finite or nearly so (strings have ``maxLength`` or an anchored pattern,
integers have bounds, arrays ``maxItems``): a random-weight model, greedy or sampled, must reach
the end within the tests' ``max_new_tokens`` for every output to be checked whole.
"""

from __future__ import annotations

import json
import random

# Regexes as the stock v3 router sends them for {"type": "json"} (outlines-core's
# build_regex_from_schema on these schemas, GRAMMAR_TYPE_REGEX): the output must match the
# regex and parse as JSON. NOTE: outlines-core drops "minimum"/"maximum" (an integer becomes
# -?(0|[1-9][0-9]*), which a greedy random model fills with 666... until max_new_tokens), so
# these schemas have no integer.
ROUTER_SCHEMA_REGEXES = [
    (
        {"type": "object", "properties": {"id": {"enum": [1, 2, 3]}, "ok": {"type": "boolean"}, "tag": {"type": "string", "maxLength": 6}}, "required": ["id", "ok", "tag"]},
        r'\{[ ]?"id"[ ]?:[ ]?(1|2|3)[ ]?,[ ]?"ok"[ ]?:[ ]?(true|false)[ ]?,[ ]?"tag"[ ]?:[ ]?"([^"\\\x00-\x1F\x7F-\x9F]|\\["\\/bfnrt]){0,6}"[ ]?\}',
    ),
    (
        {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}, "required": ["color"]},
        r'\{[ ]?"color"[ ]?:[ ]?("red"|"green"|"blue")([ ]?,[ ]?"items"[ ]?:[ ]?\[[ ]?(((true|false))(,[ ]?((true|false))){0,2})?[ ]?\])?[ ]?\}',
    ),
]

_NAMES = ["id", "name", "age", "city", "tags", "score", "ok", "kind", "count", "meta", "user", "zip", "level", "items", "note"]
_WORDS = ["red", "green", "blue", "small", "large", "cat", "dog", "on", "off", "alpha", "beta"]


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["string", "pattern", "integer", "number", "boolean", "null", "enum", "const", "anyof"])
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice([
            "^[a-z]{2,5}$", "^[A-Z][a-z]{1,4}$", "^[0-9]{3}-[0-9]{4}$", "^(x|y|z)[0-9]$",
        ])}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.choice([5, 100, 5000])}
    if kind == "number":
        # NOTE: without multipleOf a fraction has no end (a greedy random model writes
        # 0.6666... until max_new_tokens); binary fractions keep jsonschema's float check exact
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000]),
                "multipleOf": rng.choice([0.5, 0.25, 0.125])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        return {"enum": rng.sample(_WORDS, rng.randint(2, 4)) + rng.sample([1, 2, 3, None, True], 1)}
    if kind == "const":
        return {"const": rng.choice(_WORDS)}
    return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}]}


def _value(rng: random.Random, depth: int) -> dict:
    roll = rng.random()
    if depth > 0 and roll < 0.2:
        return _object(rng, depth - 1)
    if roll < 0.4:
        items = _object(rng, 0) if depth > 0 and rng.random() < 0.3 else _leaf(rng)
        return {"type": "array", "items": items, "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    return _leaf(rng)


def _object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(_NAMES, rng.randint(1, 4))
    properties = {n: _value(rng, depth) for n in names}
    required = rng.sample(names, rng.randint(1, len(names)))
    return {"type": "object", "properties": properties, "required": required}


def json_schemas(n: int = 50, seed: int = 0) -> list[dict]:
    """Objects nested up to two levels, arrays (of objects too), enums, consts, anyOf, bounded
    integers and numbers, strings with lengths or patterns, booleans, nulls, required fields."""
    rng = random.Random(seed)
    return [_object(rng, 2) for _ in range(n)]


_REGEX_TEMPLATES = [
    lambda r: f"[a-z]{{{r.randint(1, 3)},{r.randint(4, 8)}}}",
    lambda r: f"[0-9]{{{r.randint(2, 4)}}}-[0-9]{{{r.randint(2, 4)}}}",
    lambda r: r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    lambda r: r"([01][0-9]|2[0-3]):[0-5][0-9]",
    lambda r: r"[a-z]{1,6}@[a-z]{1,6}\.(com|net|org)",
    lambda r: r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
    lambda r: r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}",
    lambda r: "#[0-9a-f]{6}",
    lambda r: "(" + "|".join(r.sample(_WORDS, r.randint(2, 5))) + ")",
    lambda r: "[0-9a-f]{8}-[0-9a-f]{4}",
    lambda r: r"[0-9]{1,2}\.[0-9]{1,2}\.[0-9]{1,2}",
    lambda r: "[A-Z][a-z]{2,6}( [A-Z][a-z]{2,6}){0,2}",
    lambda r: r"-?[0-9]{1,4}(\.[0-9]{1,2})?",
    lambda r: "[a-z]{1,5}=[0-9]{1,3}(;[a-z]{1,5}=[0-9]{1,3}){0,2}",
    lambda r: "(yes|no)",
    lambda r: f"{r.choice(['Answer', 'Result'])}: (A|B|C|D)",
    lambda r: r"\[[0-9]{1,2}(, [0-9]{1,2}){0,3}\]",
    lambda r: "[ACGT]{4,10}",
]


def regexes(n: int = 50, seed: int = 0) -> list[str]:
    """Dates, times, e-mails, IPv4, phone numbers, colours, choices, ids, versions, names,
    decimals, key=value lists, lists of numbers; plus the router's schema regexes."""
    rng = random.Random(seed)
    out = [regex for _, regex in ROUTER_SCHEMA_REGEXES]
    while len(out) < n:
        out.append(_REGEX_TEMPLATES[(len(out) - 2) % len(_REGEX_TEMPLATES)](rng))
    return out


if __name__ == "__main__":  # print the cases
    for s in json_schemas():
        print(json.dumps(s))
    for x in regexes():
        print(x)
