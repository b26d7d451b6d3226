"""TGI's native JSON shapes: parsing ``/generate`` bodies (serde-like type checks, 422 on a
wrong type) and building ``details`` / stream events."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

from .entities import GeneratedText, PrefillToken, Token
from .errors import ValidationError

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
# serde's integer types: (min, max). usize is 64-bit on the router's platforms.
INT_RANGES = {
    "u32": (0, U32_MAX),
    "i32": (-(2**31), 2**31 - 1),
    "u64": (0, U64_MAX),
    "usize": (0, U64_MAX),
}


def deserialize_error(path: str, message: str) -> ValidationError:
    return ValidationError(
        f"Failed to deserialize the JSON body into the target type: {path}: {message}"
    )


def _unexpected(value: Any) -> str:
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


def to_f32(value: float) -> float | None:
    """``value as f32`` (what serde gives TGI and what the shard receives), or None when it does
    not fit a finite f32 (serde would give TGI infinity; here that is refused)."""
    try:
        rounded = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return None
    return rounded if math.isfinite(rounded) else None


class Fields:
    """Typed reads from a JSON object, with serde-style error messages. Kinds: ``bool``, ``str``,
    ``str_list``, ``f32`` (finite), and the integer types of ``INT_RANGES``."""

    def __init__(self, obj: Any, path: str) -> None:
        if not isinstance(obj, dict):
            raise deserialize_error(
                path or "body", f"invalid type: {_unexpected(obj)}, expected a JSON object"
            )
        self.obj = obj
        self.path = path

    def _where(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: str, default: Any = None) -> Any:
        value = self.obj.get(name)
        if value is None:
            return default
        where = self._where(name)
        if kind == "bool":
            if not isinstance(value, bool):
                raise deserialize_error(
                    where, f"invalid type: {_unexpected(value)}, expected a boolean"
                )
        elif kind in INT_RANGES:
            if isinstance(value, bool) or not isinstance(value, int):
                raise deserialize_error(
                    where, f"invalid type: {_unexpected(value)}, expected {kind}"
                )
            low, high = INT_RANGES[kind]
            if not low <= value <= high:
                raise deserialize_error(where, f"invalid value: integer `{value}`, expected {kind}")
        elif kind == "f32":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise deserialize_error(where, f"invalid type: {_unexpected(value)}, expected f32")
            rounded = to_f32(float(value)) if abs(value) < 1e39 else None
            if rounded is None:
                raise deserialize_error(
                    where, f"invalid value: {_unexpected(value)}, expected a finite f32"
                )
            value = rounded
        elif kind == "str":
            if not isinstance(value, str):
                raise deserialize_error(
                    where, f"invalid type: {_unexpected(value)}, expected a string"
                )
        elif kind == "str_list":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise deserialize_error(
                    where, f"invalid type: {_unexpected(value)}, expected a sequence of strings"
                )
        else:
            raise AssertionError(f"unknown field kind {kind!r}")
        return value

    def require(self, name: str, kind: str) -> Any:
        if name not in self.obj:
            raise deserialize_error(self.path or "body", f"missing field `{name}`")
        if self.obj[name] is None:
            raise deserialize_error(self._where(name), f"invalid type: null, expected {kind}")
        return self.get(name, kind)


@dataclass
class GenerateParameters:
    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: list[str] = field(default_factory=list)
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: Any = None
    adapter_id: str | None = None

    @classmethod
    def parse(cls, obj: Any, path: str = "parameters") -> GenerateParameters:
        if obj is None:
            return cls()
        f = Fields(obj, path)
        return cls(
            best_of=f.get("best_of", "usize"),
            temperature=f.get("temperature", "f32"),
            repetition_penalty=f.get("repetition_penalty", "f32"),
            frequency_penalty=f.get("frequency_penalty", "f32"),
            top_k=f.get("top_k", "i32"),
            top_p=f.get("top_p", "f32"),
            typical_p=f.get("typical_p", "f32"),
            do_sample=f.get("do_sample", "bool", False),
            max_new_tokens=f.get("max_new_tokens", "u32"),
            return_full_text=f.get("return_full_text", "bool"),
            stop=f.get("stop", "str_list", []),
            truncate=f.get("truncate", "usize"),
            watermark=f.get("watermark", "bool", False),
            details=f.get("details", "bool", False),
            decoder_input_details=f.get("decoder_input_details", "bool", False),
            seed=f.get("seed", "u64"),
            top_n_tokens=f.get("top_n_tokens", "u32"),
            grammar=obj.get("grammar"),
            adapter_id=f.get("adapter_id", "str"),
        )


@dataclass
class GenerateRequest:
    inputs: str
    parameters: GenerateParameters = field(default_factory=GenerateParameters)
    add_special_tokens: bool = True
    stream: bool = False  # only read by the compat route ``POST /``

    @classmethod
    def parse(cls, body: Any) -> GenerateRequest:
        f = Fields(body, "")
        return cls(
            inputs=f.require("inputs", "str"),
            parameters=GenerateParameters.parse(body.get("parameters")),
            add_special_tokens=f.get("add_special_tokens", "bool", True),
            stream=f.get("stream", "bool", False),
        )


def details_json(
    generated: GeneratedText,
    prefill: list[PrefillToken],
    tokens: list[Token],
    top_tokens: list[list[Token]],
) -> dict:
    details: dict[str, Any] = {
        "finish_reason": generated.finish_reason,
        "generated_tokens": generated.generated_tokens,
        "seed": generated.seed,
        "prefill": [t.to_json() for t in prefill],
        "tokens": [t.to_json() for t in tokens],
    }
    if any(top_tokens):
        details["top_tokens"] = [[t.to_json() for t in step] for step in top_tokens]
    return details


def stream_event_json(
    index: int,
    token: Token,
    top_tokens: list[Token],
    generated_text: str | None = None,
    details: dict | None = None,
) -> dict:
    event: dict[str, Any] = {"index": index, "token": token.to_json()}
    if top_tokens:
        event["top_tokens"] = [t.to_json() for t in top_tokens]
    event["generated_text"] = generated_text
    event["details"] = details
    return event
