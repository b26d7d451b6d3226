"""TGI's native JSON shapes: parsing ``/generate`` bodies (serde-like type checks, 422 on a
wrong type) and building ``details`` / stream events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .entities import GeneratedText, PrefillToken, Token
from .errors import ValidationError

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


def deserialize_error(path: str, message: str) -> ValidationError:
    return ValidationError(
        f"Failed to deserialize the JSON body into the target type: {path}: {message}"
    )


class Fields:
    """Typed reads from a JSON object, with serde-style error messages."""

    def __init__(self, obj: Any, path: str) -> None:
        if not isinstance(obj, dict):
            raise deserialize_error(
                path or "body", f"invalid type: {type(obj).__name__}, expected a JSON object"
            )
        self.obj = obj
        self.path = path

    def _where(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: str, default: Any = None, *, maximum: int | None = None) -> Any:
        value = self.obj.get(name)
        if value is None:
            return default
        where = self._where(name)
        if kind == "bool":
            if not isinstance(value, bool):
                raise deserialize_error(where, f"invalid type: {value!r}, expected a boolean")
        elif kind in ("uint", "int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise deserialize_error(where, f"invalid type: {value!r}, expected an integer")
            if kind == "uint" and value < 0:
                raise deserialize_error(
                    where, f"invalid value: integer `{value}`, expected an unsigned integer"
                )
            if maximum is not None and value > maximum:
                raise deserialize_error(
                    where, f"invalid value: integer `{value}`, expected at most {maximum}"
                )
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise deserialize_error(where, f"invalid type: {value!r}, expected a number")
            value = float(value)
        elif kind == "str":
            if not isinstance(value, str):
                raise deserialize_error(where, f"invalid type: {value!r}, expected a string")
        elif kind == "str_list":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise deserialize_error(
                    where, f"invalid type: {value!r}, expected a list of strings"
                )
        return value

    def require(self, name: str, kind: str, **kw: Any) -> Any:
        if name not in self.obj:
            raise deserialize_error(self.path or "body", f"missing field `{name}`")
        if self.obj[name] is None:
            raise deserialize_error(self._where(name), f"invalid type: null, expected a {kind}")
        return self.get(name, kind, **kw)


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
            best_of=f.get("best_of", "uint"),
            temperature=f.get("temperature", "float"),
            repetition_penalty=f.get("repetition_penalty", "float"),
            frequency_penalty=f.get("frequency_penalty", "float"),
            top_k=f.get("top_k", "int"),
            top_p=f.get("top_p", "float"),
            typical_p=f.get("typical_p", "float"),
            do_sample=f.get("do_sample", "bool", False),
            max_new_tokens=f.get("max_new_tokens", "uint", maximum=U32_MAX),
            return_full_text=f.get("return_full_text", "bool"),
            stop=f.get("stop", "str_list", []),
            truncate=f.get("truncate", "uint"),
            watermark=f.get("watermark", "bool", False),
            details=f.get("details", "bool", False),
            decoder_input_details=f.get("decoder_input_details", "bool", False),
            seed=f.get("seed", "uint", maximum=U64_MAX),
            top_n_tokens=f.get("top_n_tokens", "uint", maximum=U32_MAX),
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
