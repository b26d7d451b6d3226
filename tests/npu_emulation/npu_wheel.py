"""Reading operator schemas out of the pinned torch-npu wheel without importing it.

The wheel is never installed (without CANN it breaks ``import torch``); its files are read as bytes
and text from the zip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from functools import cached_property
from pathlib import Path

import torch

from tgi_npu_backend.npu_emulation.schemas import (
    ATB_DOCS, ATB_HEADER, ATB_SO, NPU_SO, OP_DOCS, TORCH_NPU_VERSION, WHEEL,
)

CACHE = Path(os.environ.get("TGI_NPU_WHEEL_CACHE", Path.home() / ".cache/tgi-npu-backend/wheels"))
YAML = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"


def fetch_wheel() -> tuple[Path | None, str]:
    """The cached wheel, downloading it once (``pip download --no-deps``); (None, why) if not."""
    path = CACHE / WHEEL
    if path.exists():
        return path, ""
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"torch-npu=={TORCH_NPU_VERSION}",
           "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
           "--retries", "1", "--timeout", "30", "-d", str(CACHE)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"pip download failed: {e}"
    if proc.returncode != 0 or not path.exists():
        return None, f"pip download torch-npu=={TORCH_NPU_VERSION} failed: {proc.stderr[-400:]}"
    return path, ""


class Wheel:
    def __init__(self, path: Path) -> None:
        self.zip = zipfile.ZipFile(path)

    def read(self, member: str) -> bytes:
        return self.zip.read(member)

    @cached_property
    def atb_so(self) -> bytes:
        return self.read(ATB_SO)

    @cached_property
    def npu_so(self) -> bytes:
        return self.read(NPU_SO)

    @cached_property
    def header(self) -> str:
        return self.read(ATB_HEADER).decode()

    def docstring_schema(self, name: str) -> str | None:
        """The signature line ``torch_npu[.atb].NAME(...) -> ...`` of a docstring, if any."""
        for member in (ATB_DOCS, OP_DOCS):
            text = self.read(member).decode()
            m = re.search(rf"^torch_npu\.(?:atb\.)?{re.escape(name)}\((.*)\) -> (.*)$", text, re.M)
            if m:
                return f"{name}({m.group(1)}) -> {m.group(2).strip()}"
        return None

    def yaml_schema(self, name: str) -> str | None:
        m = re.search(rf"func: ({re.escape(name)}\(.*\) -> .*)$", self.read(YAML).decode(), re.M)
        return m.group(1).strip() if m else None

    def header_declaration(self, cpp_name: str) -> tuple[str, list[tuple[str, str]]] | None:
        """(return type, [(C++ type, name)]) of ``TORCH_NPU_API <ret> <cpp_name>(...)``."""
        m = re.search(rf"TORCH_NPU_API (.+?)\s*\b{re.escape(cpp_name)}\((.*?)\);", self.header)
        if not m:
            return None
        params = []
        for p in m.group(2).split(","):
            p = p.strip()
            pm = re.match(r"(.*?[&\s>])\s*(\w+)$", p)
            params.append((" ".join(pm.group(1).split()), pm.group(2)))
        return m.group(1).strip(), params


def in_binary(schema: str, binary: bytes) -> list[str]:
    """Problems locating ``schema`` in a shared library ([] = found).

    A whole string must appear NUL-terminated. GCC emits long literals that it builds inline as
    16-byte .rodata pieces: every aligned 16-byte piece must then appear, and the last 16 bytes
    when the tail was stored that way (otherwise the tail, < 16 bytes, came from immediates and is
    covered by the header comparison).
    """
    data = schema.encode()
    if data + b"\0" in binary:
        return []
    missing = [f"bytes {i}..{i + 15} {data[i:i + 16]!r}"
               for i in range(0, len(data) - 15, 16) if data[i:i + 16] not in binary]
    return missing


# --- schema comparison ---------------------------------------------------------------------------


def parse(schema: str, ns: str | None = None) -> torch._C.FunctionSchema:
    if ns and "::" not in schema.split("(", 1)[0]:
        schema = f"{ns}::{schema}"
    return torch._C.parse_schema(schema)


def _arg_texts(schema: torch._C.FunctionSchema) -> list[str]:
    """The printed arguments of a schema, ``*`` removed: ``['Tensor query', 'SymInt[] lens']``."""
    text = str(schema)
    start = text.index("(") + 1
    depth, parts, cur = 0, [], ""
    for ch in text[start:]:
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return [p for p in parts if p != "*"]


def _type_text(arg_text: str) -> str:
    """'Tensor(b!) value_cache' -> 'Tensor(!)'; 'SymInt[] seq_len' -> 'SymInt[]'."""
    declared = arg_text.split("=", 1)[0].rsplit(" ", 1)[0].strip()
    return re.sub(r"\([a-z]!\)", "(!)", declared)


def _args(schema: torch._C.FunctionSchema) -> list[tuple]:
    return [(a.name, _type_text(text), a.has_default_value(), repr(a.default_value), a.kwarg_only)
            for a, text in zip(schema.arguments, _arg_texts(schema))]


def _returns(schema: torch._C.FunctionSchema) -> str:
    ret = str(schema).rsplit(" -> ", 1)[1]
    return re.sub(r"\([a-z]!\)", "(!)", ret)


def schema_diff(expected: str | torch._C.FunctionSchema, actual: str | torch._C.FunctionSchema,
                ns: str | None = None) -> list[str]:
    """Every difference between two schemas ([] = identical): name, overload, each argument's
    name, type, default, keyword-only flag and mutability, and the returns."""
    e = parse(expected, ns) if isinstance(expected, str) else expected
    a = parse(actual, ns) if isinstance(actual, str) else actual
    out = []
    if (e.name, e.overload_name) != (a.name, a.overload_name):
        out.append(f"name {e.name}.{e.overload_name} != {a.name}.{a.overload_name}")
    ea, aa = _args(e), _args(a)
    for i in range(max(len(ea), len(aa))):
        x = ea[i] if i < len(ea) else None
        y = aa[i] if i < len(aa) else None
        if x != y:
            out.append(f"argument {i}: expected {x}, registered {y}")
    er, ar = _returns(e), _returns(a)
    if er != ar:
        out.append(f"returns: expected {er}, registered {ar}")
    return out


CPP_TO_SCHEMA = [
    (r"^const at::Tensor ?&$", "Tensor"),
    (r"^at::Tensor ?&$", "Tensor(!)"),
    (r"^const c10::optional<at::Tensor> ?&$", "Tensor?"),
    (r"^(const )?int64_t$", "int"),
    (r"^(const )?double$", "float"),
    (r"^c10::SymIntArrayRef$", "SymInt[]"),
    (r"^bool$", "bool"),
]


def translate(cpp_type: str) -> str:
    """Mechanical C++ -> schema type translation (AtbOpsInterface.h conventions)."""
    for pattern, schema_type in CPP_TO_SCHEMA:
        if re.match(pattern, cpp_type):
            return schema_type
    raise ValueError(f"no translation for C++ type {cpp_type!r}")


def header_diff(decl: tuple[str, list[tuple[str, str]]], registered: torch._C.FunctionSchema) -> list[str]:
    """Names, order, types and mutability of the header's parameters vs the registered schema
    (the header cannot say which are keyword-only or their defaults)."""
    ret, params = decl
    expected = [(name, translate(t)) for t, name in params]
    actual = [(arg[0], arg[1]) for arg in _args(registered)]
    out = [f"parameter {i}: header {x}, registered {y}"
           for i, (x, y) in enumerate(zip(expected, actual)) if x != y]
    if len(expected) != len(actual):
        out.append(f"{len(expected)} parameters in the header, {len(actual)} registered")
    returns_void = ret == "void"
    if returns_void != (len(registered.returns) == 0):
        out.append(f"header returns {ret}, registered returns {len(registered.returns)} values")
    return out
