"""Wire conformance of proto/generate.proto with TGI's v3 proto, and staleness of the stubs.

* ``proto/generate.proto`` is compiled freshly and its descriptor is compared, item by item,
  with ``tgi_v3_wire.json`` (a dump of upstream ``proto/v3/generate.proto``): package,
  service, methods, every message field (name, number, type, type_name, label, proto3
  ``optional``, oneof membership, declaration order), oneofs, enums. Anything present on our
  side but not upstream is reported too.
* The committed stubs in ``tgi_npu_backend/pb`` must match a fresh compile of the proto.
* Negative checks make sure the comparison can actually fail.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path

import pytest

import grpc_tools  # noqa: E402,F401  (a test dependency: never skip the conformance check)

from google.protobuf import descriptor_pb2, text_format  # noqa: E402

from tgi_npu_backend.pb import regenerate  # noqa: E402

# shared/ sits beside the checkout (locally and in CI); TGI_V3_WIRE_JSON overrides.
WIRE_JSON = Path(
    os.environ.get(
        "TGI_V3_WIRE_JSON",
        Path(__file__).resolve().parents[3] / "shared" / "tgi" / "tgi_v3_wire.json",
    )
)
# Keys of the wire json that describe where it came from, not the protocol.
_META_KEYS = {"source"}

_FDP = descriptor_pb2.FieldDescriptorProto


def _type_name(t: int) -> str:
    return _FDP.Type.Name(t)[len("TYPE_"):].lower()


def _label_name(label: int) -> str:
    return _FDP.Label.Name(label)[len("LABEL_"):].lower()


def _has_options(d) -> bool:
    """Options actually set (``rpc X(A) returns (B) {}`` leaves an empty options message)."""
    return d.HasField("options") and d.options.ByteSize() > 0


def _json_name(name: str) -> str:
    """protoc's default json_name: drop underscores, upper-case the following letter."""
    out, upper = [], False
    for ch in name:
        if ch == "_":
            upper = True
        elif upper:
            out.append(ch.upper())
            upper = False
        else:
            out.append(ch)
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Descriptor -> wire-json shaped dict
# --------------------------------------------------------------------------------------------


def describe(fdp: descriptor_pb2.FileDescriptorProto) -> tuple[dict, list[str]]:
    """Describe a compiled file in the shape of tgi_v3_wire.json.

    Returns (description, extras) where ``extras`` lists things the json format cannot express
    but which must not exist on our side (nested types, field options, imports, ...)."""
    pkg = fdp.package
    extras: list[str] = []

    def full(name: str) -> str:
        return f"{pkg}.{name}" if pkg else name

    if fdp.dependency:
        extras.append(f"file imports {list(fdp.dependency)}")
    if fdp.extension:
        extras.append(f"file declares extensions {[e.name for e in fdp.extension]}")
    if _has_options(fdp):
        opts = text_format.MessageToString(fdp.options, as_one_line=True)
        extras.append(f"file options set: {opts}")

    services = []
    for svc in fdp.service:
        if _has_options(svc):
            extras.append(f"service {svc.name} has options")
        methods = []
        for m in svc.method:
            if _has_options(m):
                extras.append(f"method {svc.name}.{m.name} has options")
            methods.append({
                "name": m.name,
                "full_path": f"/{full(svc.name)}/{m.name}",
                "input_type": m.input_type.lstrip("."),
                "output_type": m.output_type.lstrip("."),
                "client_streaming": m.client_streaming,
                "server_streaming": m.server_streaming,
            })
        services.append({"name": svc.name, "full_name": full(svc.name), "methods": methods})

    messages = []
    for msg in fdp.message_type:
        where = f"message {msg.name}"
        for kind in ("nested_type", "enum_type", "extension", "extension_range"):
            items = getattr(msg, kind)
            if items:
                extras.append(f"{where} has {kind}: {[getattr(i, 'name', str(i)) for i in items]}")
        if _has_options(msg):
            extras.append(f"{where} has options")
        oneof_members: dict[int, list] = {}
        fields = []
        for f in msg.field:
            if _has_options(f):
                # e.g. [packed = false] changes the encoding of repeated scalars.
                extras.append(
                    f"{where}.{f.name} has options: "
                    f"{text_format.MessageToString(f.options, as_one_line=True)}"
                )
            if f.HasField("default_value") or f.HasField("extendee"):
                extras.append(f"{where}.{f.name} has default_value/extendee")
            oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
            if oneof is not None:
                oneof_members.setdefault(f.oneof_index, []).append(f)
            repeated = f.label == _FDP.LABEL_REPEATED
            fields.append({
                "name": f.name,
                "json_name": f.json_name if f.HasField("json_name") else _json_name(f.name),
                "number": f.number,
                "type": _type_name(f.type),
                "label": _label_name(f.label),
                "type_name": f.type_name.lstrip(".") if f.type_name else None,
                "oneof": oneof,
                "proto3_optional": f.proto3_optional,
                "cardinality": "repeated" if repeated else "singular",
                "explicit_presence": (not repeated) and (
                    f.type in (_FDP.TYPE_MESSAGE, _FDP.TYPE_GROUP) or oneof is not None
                ),
            })
        oneofs = []
        for i, o in enumerate(msg.oneof_decl):
            members = oneof_members.get(i, [])
            oneofs.append({
                "name": o.name,
                "synthetic": bool(members) and all(m.proto3_optional for m in members),
            })
        messages.append({
            "name": msg.name,
            "full_name": full(msg.name),
            "fields": sorted(fields, key=lambda d: d["number"]),
            "declared_field_order": [f.name for f in msg.field],
            "oneofs": oneofs,
        })

    enums = []
    for e in fdp.enum_type:
        if _has_options(e):
            extras.append(f"enum {e.name} has options")
        enums.append({
            "name": e.name,
            "full_name": full(e.name),
            "values": [{"name": v.name, "number": v.number} for v in e.value],
        })

    return (
        {
            "file": fdp.name,
            "syntax": fdp.syntax or "proto2",
            "package": pkg,
            "services": services,
            "messages": messages,
            "enums": enums,
        },
        extras,
    )


# --------------------------------------------------------------------------------------------
# Generic structural diff
# --------------------------------------------------------------------------------------------


def _is_named_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) and "name" in x for x in v)


def diff(expected, actual, path: str = "") -> list[str]:
    """All differences between ``expected`` (upstream) and ``actual`` (ours), as lines.

    Dicts are compared key by key (missing and extra keys reported); lists of dicts that have a
    ``name`` are matched by name (missing, extra, reordered, then recursively); everything else
    must be equal."""
    where = path or "<root>"
    out: list[str] = []
    if isinstance(expected, dict) and isinstance(actual, dict):
        for k in expected:
            if k not in actual:
                out.append(f"{where}: missing key {k!r} (upstream {expected[k]!r})")
        for k in actual:
            if k not in expected:
                out.append(f"{where}: extra key {k!r} (ours {actual[k]!r})")
        for k in expected:
            if k in actual:
                out += diff(expected[k], actual[k], f"{path}.{k}" if path else k)
        return out
    if _is_named_list(expected) and _is_named_list(actual) and (expected or actual):
        exp = {x["name"]: x for x in expected}
        act = {x["name"]: x for x in actual}
        if len(exp) != len(expected) or len(act) != len(actual):
            out.append(f"{where}: duplicate names")
        for name in exp:
            if name not in act:
                out.append(f"{where}: missing {name!r} (upstream has it)")
        for name in act:
            if name not in exp:
                out.append(f"{where}: extra {name!r} (not upstream)")
        common_exp = [x["name"] for x in expected if x["name"] in act]
        common_act = [x["name"] for x in actual if x["name"] in exp]
        if common_exp != common_act:
            out.append(f"{where}: order differs: upstream {common_exp}, ours {common_act}")
        for name in exp:
            if name in act:
                out += diff(exp[name], act[name], f"{path}[{name}]")
        return out
    if type(expected) is not type(actual) or expected != actual:
        out.append(f"{where}: upstream {expected!r} != ours {actual!r}")
    return out


def compare(wire: dict, fdp: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Differences between the wire json and a compiled file (empty list = identical)."""
    ours, extras = describe(fdp)
    expected = {k: v for k, v in wire.items() if k not in _META_KEYS}
    return diff(expected, ours) + [f"extra: {e}" for e in extras]


def _compile(proto_file: Path) -> descriptor_pb2.FileDescriptorProto:
    fds = descriptor_pb2.FileDescriptorSet.FromString(regenerate.compile_descriptor_set(proto_file))
    assert len(fds.file) == 1, [f.name for f in fds.file]
    return fds.file[0]


def _report(problems: list[str]) -> str:
    return f"{len(problems)} difference(s):\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wire() -> dict:
    assert WIRE_JSON.is_file(), f"{WIRE_JSON} not found: set TGI_V3_WIRE_JSON to the upstream descriptor"
    return json.loads(WIRE_JSON.read_text())


@pytest.fixture(scope="module")
def fresh() -> descriptor_pb2.FileDescriptorProto:
    return _compile(regenerate.PROTO_FILE)


# --------------------------------------------------------------------------------------------
# Conformance
# --------------------------------------------------------------------------------------------


def test_proto_matches_tgi_v3_wire(wire, fresh):
    problems = compare(wire, fresh)
    assert not problems, _report(problems)


def test_wire_sanity(wire, fresh):
    """Spot checks independent of the generic diff (guards against a malformed json)."""
    assert fresh.package == "generate.v3"
    (svc,) = fresh.service
    assert svc.name == "TextGenerationService"
    assert [m.name for m in svc.method] == [
        "Info", "ServiceDiscovery", "ClearCache", "FilterBatch",
        "Warmup", "Prefill", "Decode", "Health",
    ]
    assert not any(m.client_streaming or m.server_streaming for m in svc.method)
    assert len(wire["messages"]) == len(fresh.message_type) == 27
    assert [e.name for e in fresh.enum_type] == ["GrammarType", "FinishReason"]


# --------------------------------------------------------------------------------------------
# Negative checks: the comparator must notice changes
# --------------------------------------------------------------------------------------------


def _field(doc: dict, message: str, field: str) -> dict:
    msg = next(m for m in doc["messages"] if m["name"] == message)
    return next(f for f in msg["fields"] if f["name"] == field)


def test_comparator_detects_field_number_change(wire, fresh):
    bad = copy.deepcopy(wire)
    _field(bad, "Request", "slots")["number"] = 15
    problems = compare(bad, fresh)
    assert any("Request" in p and "slots" in p and "number" in p for p in problems), problems


def test_comparator_detects_lost_optional_presence(wire, fresh):
    bad = copy.deepcopy(wire)
    f = _field(bad, "ClearCacheRequest", "id")
    f.update(oneof=None, proto3_optional=False, explicit_presence=False)
    msg = next(m for m in bad["messages"] if m["name"] == "ClearCacheRequest")
    msg["oneofs"] = []
    problems = compare(bad, fresh)
    assert any("proto3_optional" in p for p in problems), problems
    assert any("ClearCacheRequest" in p and "oneofs" in p for p in problems), problems


def test_comparator_detects_type_label_enum_and_streaming_changes(wire, fresh):
    bad = copy.deepcopy(wire)
    _field(bad, "Tokens", "logprobs")["type"] = "double"
    _field(bad, "Batch", "requests")["label"] = "optional"
    bad["enums"][1]["values"][2]["number"] = 3
    bad["services"][0]["methods"][6]["server_streaming"] = True
    problems = compare(bad, fresh)
    for needle in ("logprobs", "requests", "FINISH_REASON_STOP_SEQUENCE", "server_streaming"):
        assert any(needle in p for p in problems), (needle, problems)


def test_comparator_detects_extra_items_on_our_side(wire, fresh):
    bad = copy.deepcopy(wire)
    req = next(m for m in bad["messages"] if m["name"] == "Request")
    req["fields"] = [f for f in req["fields"] if f["name"] != "chunk_len"]
    req["declared_field_order"].remove("chunk_len")
    req["oneofs"] = [o for o in req["oneofs"] if o["name"] != "_chunk_len"]
    bad["messages"] = [m for m in bad["messages"] if m["name"] != "Image"]
    problems = compare(bad, fresh)
    assert any("extra 'chunk_len'" in p for p in problems), problems
    assert any("extra 'Image'" in p for p in problems), problems


def test_comparator_detects_edited_proto(wire, tmp_path):
    """End to end: a plausible mistake in the .proto text is caught after compiling."""
    text = regenerate.PROTO_FILE.read_text()
    edits = {
        "optional uint64 id = 1;": "uint64 id = 1;",  # ClearCacheRequest loses presence
        "repeated uint32 slots = 10;": "repeated uint32 slots = 10 [packed = false];",
        "uint32 block_size = 9;": "uint64 block_size = 9;",
    }
    for old, new in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    proto = tmp_path / "generate.proto"
    proto.write_text(text)
    problems = compare(wire, _compile(proto))
    assert any("ClearCacheRequest" in p and "proto3_optional" in p for p in problems), problems
    assert any("slots has options" in p for p in problems), problems
    assert any("block_size" in p and "uint64" in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# Staleness of the committed stubs
# --------------------------------------------------------------------------------------------


def _strip_for_compare(fdp: descriptor_pb2.FileDescriptorProto):
    fdp = copy.deepcopy(fdp)
    fdp.ClearField("source_code_info")
    for msg in fdp.message_type:
        for f in msg.field:
            f.ClearField("json_name")  # python gencode strips it; descriptor sets keep it
    return fdp


def test_committed_pb2_matches_proto(fresh):
    from tgi_npu_backend.pb import generate_pb2

    committed = descriptor_pb2.FileDescriptorProto.FromString(generate_pb2.DESCRIPTOR.serialized_pb)
    a, b = _strip_for_compare(committed), _strip_for_compare(fresh)
    if a != b:
        d = "\n".join(difflib.unified_diff(
            text_format.MessageToString(a).splitlines(),
            text_format.MessageToString(b).splitlines(),
            "committed generate_pb2", "fresh compile", lineterm="",
        ))
        pytest.fail(
            "tgi_npu_backend/pb/generate_pb2.py is stale; run "
            f"`python -m tgi_npu_backend.pb.regenerate`\n{d}"
        )


class _RecordingChannel:
    def __init__(self):
        self.unary_unary_paths: list[str] = []
        self.other: list[str] = []

    def unary_unary(self, path, *args, **kwargs):
        self.unary_unary_paths.append(path)
        return object()

    def _other(self, path, *args, **kwargs):
        self.other.append(path)
        return object()

    unary_stream = stream_unary = stream_stream = _other


def test_committed_grpc_module_exposes_the_service(fresh):
    from tgi_npu_backend.pb import generate_pb2_grpc

    (svc,) = fresh.service
    rpcs = [m.name for m in svc.method]
    servicer = generate_pb2_grpc.TextGenerationServiceServicer
    public = sorted(
        n for n in vars(servicer) if not n.startswith("_") and callable(getattr(servicer, n))
    )
    assert public == sorted(rpcs)

    channel = _RecordingChannel()
    stub = generate_pb2_grpc.TextGenerationServiceStub(channel)
    assert channel.other == []
    assert channel.unary_unary_paths == [f"/generate.v3.TextGenerationService/{r}" for r in rpcs]
    assert all(hasattr(stub, r) for r in rpcs)
    assert callable(generate_pb2_grpc.add_TextGenerationServiceServicer_to_server)

    source = Path(generate_pb2_grpc.__file__).read_text()
    assert "from . import generate_pb2 as generate__pb2" in source
    assert not re.search(r"^import generate_pb2", source, re.M)


_VERSION_PATTERNS = [
    # "# Protobuf Python Version: 7.35.1"
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    # _runtime_version.ValidateProtobufRuntimeVersion(domain, major, minor, patch, suffix, file)
    (
        re.compile(r"ValidateProtobufRuntimeVersion\((.*?)\)", re.S),
        "ValidateProtobufRuntimeVersion(X)",
    ),
    # GRPC_GENERATED_VERSION = '1.85.1'
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = X"),
]


def _normalize(text: str) -> str:
    for pattern, repl in _VERSION_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _generated_with(grpc_text: str) -> str | None:
    m = re.search(r"^GRPC_GENERATED_VERSION = '([^']*)'", grpc_text, re.M)
    return m.group(1) if m else None


def test_regenerate_reproduces_committed_files(tmp_path):
    written = regenerate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(regenerate.GENERATED_FILES)
    stale = []
    for name in regenerate.GENERATED_FILES:
        committed = (regenerate.PB_DIR / name).read_text(encoding="utf-8")
        fresh_text = (tmp_path / name).read_text(encoding="utf-8")
        if _normalize(committed) != _normalize(fresh_text):
            d = "\n".join(list(difflib.unified_diff(
                committed.splitlines(), fresh_text.splitlines(),
                f"committed {name}", f"regenerated {name}", lineterm="",
            ))[:60])
            stale.append(d)
    if stale:
        committed_ver = _generated_with((regenerate.PB_DIR / "generate_pb2_grpc.py").read_text())
        fresh_ver = _generated_with((tmp_path / "generate_pb2_grpc.py").read_text())
        if committed_ver != fresh_ver:
            # Template changes between grpcio-tools releases are not staleness; the descriptor
            # comparison above still guards the wire content.
            pytest.skip(
                f"stubs were generated with grpcio-tools {committed_ver}, installed is "
                f"{fresh_ver}; generated text differs:\n" + "\n".join(stale)
            )
        pytest.fail(
            "committed stubs differ from `python -m tgi_npu_backend.pb.regenerate` output:\n"
            + "\n".join(stale)
        )
