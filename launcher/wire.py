"""serde's field types as pydantic v2 annotated types, and pydantic errors as serde words them.

Every request schema (``schemas``, ``openai_schemas``) is built from these types, so one pydantic
model both validates a body and describes it in the OpenAPI document (``openapi``). The checks are
serde_json's, not pydantic's coercions: ``"1"`` is not an integer, ``2.5`` is not a ``u32``, ``1``
is not a boolean; integers are range-checked for their Rust type and floats must round to a finite
f32 (what TGI's router and the shard receive). Errors read like axum's ``Json`` rejection:
``Failed to deserialize the JSON body into the target type: parameters.top_k: invalid value: ...``.
"""

from __future__ import annotations

import math
import struct
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, PlainValidator, WithJsonSchema
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from .errors import ValidationError

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
# serde's integer types: (min, max, OpenAPI format). usize is 64-bit on the router's platforms.
INT_RANGES = {
    "u32": (0, U32_MAX, "int32"),
    "i32": (-(2**31), 2**31 - 1, "int32"),
    "u64": (0, U64_MAX, "int64"),
    "usize": (0, U64_MAX, "int64"),
}
PREFIX = "Failed to deserialize the JSON body into the target type"


def deserialize_error(path: str, message: str) -> ValidationError:
    return ValidationError(f"{PREFIX}: {path}: {message}" if path else f"{PREFIX}: {message}")


def unexpected(value: Any) -> str:
    """serde's name for what it found instead."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value[:64]}{"..." if len(value) > 64 else ""}"'
    return "sequence" if isinstance(value, list) else "map"


def serde_error(message: str, subpath: str = "") -> PydanticCustomError:
    """A serde-worded error; ``subpath`` (``[1].text``) locates it inside the field's value."""
    # The message goes in the context, never in the template: user text may contain braces.
    return PydanticCustomError("serde", "{message}", {"message": message, "subpath": subpath})


def nested(model: type[BaseModel], value: Any, subpath: str) -> Any:
    """Validate ``value`` as ``model`` inside a custom validator, keeping serde's wording and the
    path to the error (``subpath`` + the path inside ``model``)."""
    try:
        return model.model_validate(value)
    except PydanticValidationError as err:
        where, message = _parts(err.errors(include_url=False)[0])
        raise serde_error(
            message, subpath + ("." + where if where and where[0] != "[" else where)
        ) from None


def to_f32(value: float) -> float | None:
    """``value as f32`` (what serde gives TGI and what the shard receives), or None when it does
    not fit a finite f32 (serde would give TGI infinity; here that is refused)."""
    try:
        rounded = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return None
    return rounded if math.isfinite(rounded) else None


def _int_validator(kind: str):
    low, high, _ = INT_RANGES[kind]

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise serde_error(f"invalid type: {unexpected(value)}, expected {kind}")
        if not low <= value <= high:
            raise serde_error(f"invalid value: integer `{value}`, expected {kind}")
        return value

    return check


def _int_type(kind: str) -> Any:
    low, high, fmt = INT_RANGES[kind]
    schema = {"type": "integer", "format": fmt, "minimum": low, "maximum": high}
    return Annotated[int, PlainValidator(_int_validator(kind)), WithJsonSchema(schema)]


def _f32(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise serde_error(f"invalid type: {unexpected(value)}, expected f32")
    rounded = to_f32(float(value)) if abs(value) < 1e39 else None
    if rounded is None:
        raise serde_error(f"invalid value: {unexpected(value)}, expected a finite f32")
    return rounded


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise serde_error(f"invalid type: {unexpected(value)}, expected a boolean")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise serde_error(f"invalid type: {unexpected(value)}, expected a string")
    return value


def _str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise serde_error(f"invalid type: {unexpected(value)}, expected a sequence of strings")
    return value


U32 = _int_type("u32")
I32 = _int_type("i32")
U64 = _int_type("u64")
Usize = _int_type("usize")
F32 = Annotated[float, PlainValidator(_f32), WithJsonSchema({"type": "number", "format": "float"})]
Bool = Annotated[bool, PlainValidator(_bool), WithJsonSchema({"type": "boolean"})]
Str = Annotated[str, PlainValidator(_str), WithJsonSchema({"type": "string"})]
# A string or a list of strings (``stop``, ``prompt``): one string counts as a list of one.
StrList = Annotated[
    list[str],
    PlainValidator(_str_list),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
]
JsonValue = Annotated[Any, WithJsonSchema({})]  # any JSON value (a JSON schema, tool arguments)


# Tags of the tagged unions (``GrammarType``): pydantic puts the tag in an error's location,
# serde does not.
UNION_TAGS = frozenset(("json", "json_object", "regex", "json_schema"))


def path_of(loc: tuple) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role`` (serde_path_to_error's form)."""
    out = ""
    for i, part in enumerate(loc):
        if part in UNION_TAGS and i > 0 and loc[i - 1] in ("grammar", "response_format"):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _parts(error: dict) -> tuple[str, str]:
    """(path, serde-worded message) of one pydantic error."""
    loc, kind = tuple(error["loc"]), error["type"]
    value = error.get("input")
    if kind == "serde":
        return path_of(loc) + error["ctx"].get("subpath", ""), error["ctx"]["message"]
    if kind == "missing":
        return path_of(loc[:-1]), f"missing field `{loc[-1]}`"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path_of(loc) or "body", f"invalid type: {unexpected(value)}, expected a JSON object"
    if kind == "list_type":
        return path_of(loc), f"invalid type: {unexpected(value)}, expected a sequence"
    if kind == "union_tag_invalid":
        ctx = error["ctx"]
        return path_of(
            loc
        ), f"unknown variant `{ctx['tag']}`, expected one of {ctx['expected_tags']}"
    if kind == "union_tag_not_found":
        return path_of(loc), f"missing field `{error['ctx']['discriminator'].strip(chr(39))}`"
    return path_of(loc), error["msg"]


def _message(error: dict) -> str:
    return str(deserialize_error(*_parts(error)))


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], body: Any) -> M:
    """``body`` as ``model``, or a 422 ``ValidationError`` worded as serde's first error."""
    try:
        return model.model_validate(body)
    except PydanticValidationError as err:
        raise ValidationError(_message(err.errors(include_url=False)[0])) from None
