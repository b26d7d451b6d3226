"""The emulation's dispatcher schemas equal those of the pinned torch-npu wheel (no drift).

Sources, most authoritative first: the registration strings in the wheel's shared libraries, then
the C++ declarations of AtbOpsInterface.h (translated mechanically), then the docstrings and the
codegen yaml, whose known disagreements with the binary are listed in ``schemas.DOC_DIFFERENCES``.
"""

from __future__ import annotations

import re

import pytest
import torch
from npu_wheel import header_diff, in_binary, parse, schema_diff

from tgi_npu_backend.npu_emulation import library
from tgi_npu_backend.npu_emulation.schemas import DOC_DIFFERENCES, OPERATORS

OPS = sorted(OPERATORS)


@pytest.fixture(scope="module", autouse=True)
def _register_ops():
    library.register()


def _registered(name: str) -> list[torch._C.FunctionSchema]:
    op = OPERATORS[name]
    packet = getattr(getattr(torch.ops, op.namespace), name)
    return [getattr(packet, ov)._schema for ov in packet.overloads()]


@pytest.mark.parametrize("name", OPS)
def test_pinned_schemas_are_in_the_wheel_binary(wheel, name):
    op = OPERATORS[name]
    binary = wheel.atb_so if op.namespace == "atb" else wheel.npu_so
    for schema in op.schemas:
        if op.how == "whole string":
            assert schema.encode() + b"\0" in binary, f"{schema!r} is not in {op.source}"
        assert in_binary(schema, binary) == [], f"{name}: drift against {op.source}"


@pytest.mark.parametrize("name", OPS)
def test_registered_schemas_equal_the_pinned_ones(name):
    op = OPERATORS[name]
    registered = _registered(name)
    assert len(registered) == len(op.schemas), "every overload the wheel registers, and no other"
    by_overload = {s.overload_name: s for s in registered}
    for schema in op.schemas:
        expected = parse(schema, op.namespace)
        assert schema_diff(expected, by_overload[expected.overload_name]) == []


@pytest.mark.parametrize("name", [n for n in OPS if OPERATORS[n].namespace == "atb"])
def test_registered_schemas_match_the_cpp_declarations(wheel, name):
    decl = wheel.header_declaration(name)
    assert decl is not None, f"{name} is not declared in AtbOpsInterface.h"
    for schema in _registered(name):
        assert header_diff(decl, schema) == []


def _doc_form(name: str, registered: str) -> str:
    """The registered schema rewritten with the documented differences (DOC_DIFFERENCES)."""
    if name == "_npu_flash_attention_prefix_v2":
        registered = registered.replace("SymInt[] seq_len", "Tensor seq_len")
        registered = registered.replace("SymInt[] context_lens", "Tensor context_lens")
    if name == "_npu_paged_attention_v2":
        registered = registered.replace(" Tensor? workspace=None,", "")
    if name == "npu_rms_norm":
        registered = registered.replace("Tensor input", "Tensor self")
    if name == "npu_dynamic_quant":
        registered = registered.replace("Tensor input", "Tensor x")
        registered = registered.replace(', str quant_mode="pertoken", float dst_type_max=0.0', "")
    if name == "npu_quant_matmul":
        registered = registered.split("int? output_dtype=None")[0] + (
            "ScalarType? output_dtype=None) -> Tensor")
    if name == "npu_weight_quant_batchmatmul":
        registered = registered.replace(", int? weight_dtype=None", "")
    return registered


@pytest.mark.parametrize("name", OPS)
def test_docstrings_differ_from_the_binary_only_where_recorded(wheel, name):
    doc = wheel.docstring_schema(name)
    if doc is None:
        pytest.skip(f"the wheel has no docstring signature for {name}")
    (registered,) = _registered(name)
    overload = f".{registered.overload_name}" if registered.overload_name else ""
    doc = f"{name}{overload}{doc[len(name):]}"
    reg_text = str(registered).split("::", 1)[1]
    if name not in DOC_DIFFERENCES:
        assert schema_diff(parse(doc, OPERATORS[name].namespace), registered) == []
    else:
        assert schema_diff(doc, _doc_form(name, reg_text), OPERATORS[name].namespace) == []
        assert schema_diff(doc, reg_text, OPERATORS[name].namespace) != []  # still a real difference


@pytest.mark.parametrize("name", [n for n in OPS if OPERATORS[n].namespace == "npu"])
def test_codegen_yaml_agrees_after_the_self_to_input_rename(wheel, name):
    """torchnpugen RegisterCustomSchema renames ``self`` to ``input`` when registering."""
    yaml = wheel.yaml_schema(name)
    assert yaml is not None
    renamed = re.sub(r"\bself\b(?=[,\)])", "input", yaml)
    (registered,) = _registered(name)
    assert schema_diff(parse(renamed, "npu"), registered) == []


# --- the comparators themselves detect drift ------------------------------------------------------

MUTATIONS = [
    ("_npu_paged_attention_v2", "float scale_value", "float scale"),  # renamed argument
    ("_npu_paged_attention_v2", "int mask_type=0", "int mask_type=2"),  # changed default
    ("_npu_paged_attention_v2", "Tensor? value_cache=None", "Tensor? value_cache"),  # lost default
    ("_npu_paged_attention_v2", "Tensor(a!) out) -> Tensor(a!)", "Tensor out) -> Tensor"),  # lost !
    ("_npu_paged_attention", "out, *,Tensor? workspace", "out, Tensor? workspace"),  # positional
    ("_npu_paged_attention", "Tensor context_lens", "SymInt[] context_lens"),  # type
    ("_npu_flash_attention_prefix_v2", "SymInt[] seq_len", "int[] seq_len"),  # SymInt -> int
    ("npu_rms_norm", "Tensor input", "Tensor self"),  # the docs' name
]


@pytest.mark.parametrize("name,old,new", MUTATIONS)
def test_schema_comparator_detects_a_mutated_schema(name, old, new):
    (pinned,) = OPERATORS[name].schemas
    ns = OPERATORS[name].namespace
    assert old in pinned
    assert schema_diff(parse(pinned, ns), parse(pinned.replace(old, new, 1), ns)) != []
    assert schema_diff(parse(pinned, ns), _registered(name)[0]) == []


def test_binary_search_detects_a_mutated_schema(wheel):
    for name in ("_npu_paged_attention", "_npu_paged_attention_v2", "_npu_flash_attention_v2"):
        (pinned,) = OPERATORS[name].schemas
        assert in_binary(pinned, wheel.atb_so) == []
        assert in_binary(pinned.replace("num_heads", "num_head", 1), wheel.atb_so) != []
        assert in_binary(pinned.replace("Tensor query", "Tensor q", 1), wheel.atb_so) != []


def test_header_comparison_detects_a_mutated_declaration(wheel):
    ret, params = wheel.header_declaration("_npu_paged_attention")
    (registered,) = _registered("_npu_paged_attention")
    assert header_diff((ret, params), registered) == []
    swapped = [params[1], params[0], *params[2:]]
    assert header_diff((ret, swapped), registered) != []
    assert header_diff(("at::Tensor", params), registered) != []
