"""A CPU emulation of the torch_npu 2.13.0 operators the NPU backend calls.

``install(EmulationSettings(...))`` registers the operators (once per process) under their real
dispatcher namespaces and schemas, puts a ``torch_npu`` module in ``sys.modules`` and a fake
``torch.npu`` on ``torch``; ``uninstall()`` removes both. Each operator validates its documented
preconditions (``contracts.py``, each rule citing its source), fills its outputs with NaN, computes
with an independent float64 oracle (``oracle.py``), and counts itself in ``state()``.

Files: settings (knobs) · state (counters) · schemas (the pinned schema strings) · library
(dispatcher registration) · contracts / masks (preconditions, mask conventions) · oracle (dense
math) · ops_* (one operator family each) · calls (count, NNAL, faults) · device (fake torch.npu) ·
module (the fake torch_npu module).

What it proves, and what only a device can: the emulation checks call contracts and the math's
meaning (shapes, dtypes, masks, lengths, layouts as documented); the numerics and speed of the
real kernels, undocumented behaviour (marked "confirm on a device" where it was inferred from
op-plugin's tests) and NZ layouts (310P) need a device.
"""

from __future__ import annotations

import sys

import torch

from . import library, module
from .settings import EmulationSettings
from .state import EmulationState, state

__all__ = ["EmulationSettings", "EmulationState", "install", "uninstall", "state", "is_installed"]

_SAVED: dict[str, object] = {}  # what install() replaced, restored by uninstall()
_MISSING = object()
_INSTALLED_MODULES: dict[str, object] = {}


def is_installed() -> bool:
    return bool(_INSTALLED_MODULES)


def install(settings: EmulationSettings | None = None) -> EmulationState:
    """Install (or, when installed, re-configure) the emulation; returns its state."""
    st = state()
    st.settings = settings if settings is not None else EmulationSettings()
    library.register()
    if is_installed():
        return st
    mods = module.build()
    entries: dict[str, object] = {**mods, "torch.npu": mods["torch_npu.npu"]}
    for name, mod in entries.items():
        _SAVED[name] = sys.modules.get(name, _MISSING)
        sys.modules[name] = mod  # type: ignore[assignment]
    _SAVED["torch.npu attribute"] = getattr(torch, "npu", _MISSING)
    torch.npu = mods["torch_npu.npu"]  # type: ignore[attr-defined]
    _INSTALLED_MODULES.update(entries)
    return st


def uninstall() -> None:
    """Remove the fake modules and ``torch.npu`` (the dispatcher ops stay registered)."""
    if not is_installed():
        return
    for name, mod in _INSTALLED_MODULES.items():
        if sys.modules.get(name) is mod:
            previous = _SAVED.get(name, _MISSING)
            if previous is _MISSING:
                del sys.modules[name]
            else:
                sys.modules[name] = previous  # type: ignore[assignment]
    previous = _SAVED.get("torch.npu attribute", _MISSING)
    if previous is _MISSING:
        if hasattr(torch, "npu"):
            delattr(torch, "npu")
    else:
        torch.npu = previous  # type: ignore[attr-defined]
    _SAVED.clear()
    _INSTALLED_MODULES.clear()
