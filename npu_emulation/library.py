"""Registration of the emulated operators with the PyTorch dispatcher, under the real namespaces
(``atb::`` = ``torch.ops.atb``, ``npu::`` = ``torch.ops.npu``) and with exactly the real schemas
(``schemas.py``), so a wrong argument name, type or keyword fails in the dispatcher as on a
device. Done once per process: a dispatcher namespace cannot be defined twice."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .ops_aclnn import npu_add_rms_norm, npu_rms_norm, npu_rotary_mul
from .ops_cache import reshape_and_cache
from .ops_flash import flash_attention, flash_attention_v2
from .ops_paged import paged_attention, paged_attention_splitfuse, paged_attention_v2
from .ops_prefix import flash_attention_prefix_v2
from .ops_quant import (
    npu_dynamic_quant,
    npu_quant_matmul,
    npu_quantize,
    npu_weight_quant_batchmatmul,
)
from .schemas import OPERATORS

# overload ("name" or "name.overload") -> CPU implementation
IMPLEMENTATIONS: dict[str, Callable] = {
    "_npu_reshape_and_cache": reshape_and_cache,
    "_npu_paged_attention": paged_attention,
    "_npu_paged_attention_v2.out": paged_attention_v2,
    "_npu_flash_attention": flash_attention,
    "_npu_flash_attention_v2.out": flash_attention_v2,
    "_npu_flash_attention_prefix_v2.out": flash_attention_prefix_v2,
    "_npu_paged_attention_splitfuse": paged_attention_splitfuse,
    "npu_rms_norm": npu_rms_norm,
    "npu_add_rms_norm": npu_add_rms_norm,
    "npu_rotary_mul": npu_rotary_mul,
    "npu_quantize": npu_quantize,
    "npu_dynamic_quant": npu_dynamic_quant,
    "npu_quant_matmul": npu_quant_matmul,
    "npu_weight_quant_batchmatmul": npu_weight_quant_batchmatmul,
}

_LIBRARIES: dict[str, torch.library.Library] = {}  # kept alive: a collected Library deregisters


def overload_name(schema: str) -> str:
    return schema.split("(", 1)[0]


def register() -> None:
    """Define every operator of ``schemas.OPERATORS`` with its CPU implementation (idempotent)."""
    if _LIBRARIES:
        return
    for ns in sorted({op.namespace for op in OPERATORS.values()}):
        if hasattr(torch.ops, ns) and any(
            hasattr(getattr(torch.ops, ns), name) for name, op in OPERATORS.items()
            if op.namespace == ns
        ):
            raise RuntimeError(
                f"torch.ops.{ns} already has torch_npu operators: the real torch_npu is loaded in "
                "this process, and the emulation must not be installed over it"
            )
        _LIBRARIES[ns] = torch.library.Library(ns, "DEF")
    for op in OPERATORS.values():
        lib = _LIBRARIES[op.namespace]
        for schema in op.schemas:
            lib.define(schema)
            lib.impl(overload_name(schema), IMPLEMENTATIONS[overload_name(schema)], "CPU")


def registered_schemas(name: str) -> list[str]:
    """``str(_schema)`` of every overload of ``name`` as the dispatcher holds it."""
    op = OPERATORS[name]
    packet = getattr(getattr(torch.ops, op.namespace), name)
    return [str(getattr(packet, ov)._schema) for ov in packet.overloads()]
