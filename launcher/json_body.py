"""Request bodies parsed as strictly as TGI's router parses them (axum's ``Json`` on serde_json):
syntax errors are 400 ``Failed to parse the request body as JSON: ...``.

Python's ``json`` is laxer than serde_json in four ways, each closed here:
* ``NaN``, ``Infinity``, ``-Infinity`` are accepted by Python; serde_json refuses them;
* ``1e400`` becomes ``inf`` in Python; serde_json says "number out of range";
* ``"\\ud800"`` (a lone surrogate escape) is accepted by Python; serde_json refuses it, and such a
  string cannot be sent to the shard (protobuf strings are UTF-8);
* nesting is limited by Python's recursion limit (a RecursionError, i.e. a plain-text 500);
  serde_json stops at depth 128 ("recursion limit exceeded").
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import BadRequestError

MAX_DEPTH = 128  # serde_json's recursion limit
_SURROGATE = re.compile("[\ud800-\udfff]")
_PREFIX = "Failed to parse the request body as JSON"


def _constant(name: str) -> float:
    raise ValueError(f"`{name}` is not a JSON number (JSON has no NaN or Infinity)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")  # strict: invalid UTF-8 and encoded surrogates fail
    except UnicodeDecodeError as err:
        raise BadRequestError(
            f"{_PREFIX}: invalid UTF-8 at byte {err.start}; send the body as UTF-8"
        ) from None
    try:
        body = json.loads(text, parse_constant=_constant, parse_float=_finite)
    except RecursionError:
        raise BadRequestError(f"{_PREFIX}: recursion limit exceeded") from None
    except ValueError as err:
        raise BadRequestError(f"{_PREFIX}: {err}") from None
    _check(body)
    return body


def _check(body: Any) -> None:
    """Depth <= MAX_DEPTH and no lone surrogate in any string or key (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(body, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise BadRequestError(f"{_PREFIX}: recursion limit exceeded")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def _check_text(text: str) -> None:
    match = _SURROGATE.search(text)
    if match is not None:
        raise BadRequestError(
            f"{_PREFIX}: lone surrogate \\u{ord(match.group()):04x} in a string at character "
            f"{match.start()}; text must be valid Unicode (pair surrogates or send UTF-8)"
        )
