"""The ``torch_npu`` module the emulation puts in ``sys.modules``.

Like torch_npu 2.13.0 (``op_plugin/atb/_atb_ops.py``): ``torch_npu._npu_*`` and ``torch_npu.atb.*``
are wrappers that load the ATB library on every call until it loads, so with NNAL missing every
call raises the same OSError before any argument is looked at; then they call
``torch.ops.atb.<name>``. The aclnn ops (``torch_npu.npu_rms_norm``...) are the dispatcher ops
``torch.ops.npu.<name>`` themselves.
"""

from __future__ import annotations

import importlib.machinery
import types
from collections.abc import Callable

import torch

from .contracts import nnal_present
from .device import make_npu_module
from .schemas import OPERATORS, TORCH_NPU_VERSION
from .state import state


def _atb_wrapper(name: str) -> Callable:
    def call(*args, **kwargs):
        st = state()
        if st.settings.nnal_missing:
            st.calls[name] += 1
            nnal_present(name, True)
        return getattr(torch.ops.atb, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = "\n".join(OPERATORS[name].schemas)
    return call


def _module(name: str, doc: str) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    return mod


def build() -> dict[str, types.ModuleType]:
    """sys.modules entries: torch_npu, torch_npu.atb, torch_npu.npu."""
    torch_npu = _module("torch_npu", "CPU emulation of torch_npu 2.13.0 (tgi_npu_backend.npu_emulation)")
    torch_npu.__path__ = []
    torch_npu.__version__ = TORCH_NPU_VERSION
    # real module name is 'atb' (types.ModuleType(ATB_MODULE_NAME) in _atb_ops.py)
    atb = _module("atb", "torch_npu.atb (emulated)")
    npu = make_npu_module()
    torch_npu.atb, torch_npu.npu = atb, npu
    for name, op in OPERATORS.items():
        if op.namespace == "atb":
            target = atb if op.python_module == "torch_npu.atb" else torch_npu
            setattr(target, name, _atb_wrapper(name))
        else:
            setattr(torch_npu, name, getattr(torch.ops.npu, name))
    return {"torch_npu": torch_npu, "torch_npu.atb": atb, "torch_npu.npu": npu}
