"""What every emulated operator does around its contract and its math: count, NNAL, faults."""

from __future__ import annotations

import torch
from torch import Tensor

from .contracts import nnal_present
from .schemas import ATB_OPERATORS
from .state import EmulationState, state


def begin(op: str) -> EmulationState:
    """Count the call; ATB ops raise NNAL's OSError first when NNAL is missing."""
    st = state()
    st.calls[op] += 1
    if op in ATB_OPERATORS:
        nnal_present(op, st.settings.nnal_missing)
    return st


def maybe_oom(st: EmulationState, op: str) -> None:
    """Injected out-of-memory, in the two forms an NPU OOM takes (after validation, where the
    device would allocate)."""
    faults = st.settings.faults
    if f"oom:{op}" in faults:
        raise torch.OutOfMemoryError(
            f"NPU out of memory. Tried to allocate 2.00 GiB (emulated fault in {op})"
        )
    if f"oom-rt:{op}" in faults:
        raise RuntimeError(f"NPU out of memory. Tried to allocate 2.00 GiB (emulated fault in {op})")


def nan_fill(*outs: Tensor) -> None:
    """Outputs start as NaN so that a row the operator did not write shows."""
    for t in outs:
        t.fill_(float("nan"))


def perturb(st: EmulationState, op: str, *results: Tensor) -> None:
    """Injected wrong values (for the self-test's negative case): results shifted by 1."""
    if op in st.settings.faults:
        for t in results:
            t.add_(1.0)
