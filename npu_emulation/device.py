"""A fake ``torch.npu`` (= ``torch_npu.npu``) that answers from the settings and records each call.

Signatures follow torch_npu 2.13.0 ``torch_npu/npu/__init__.py`` and ``npu/utils.py``. NOTE: that
release defines no ``torch.npu.OutOfMemoryError``: an NPU OOM arrives as ``torch.OutOfMemoryError``
or as ``RuntimeError("NPU out of memory...")``, so the fake raises AttributeError for it, as the
real namespace would, instead of offering a name that only the emulation has.
"""

from __future__ import annotations

import importlib.machinery
import types

import torch

from .state import state

_HINTS = {
    "OutOfMemoryError": "catch torch.OutOfMemoryError and RuntimeError('NPU out of memory...')",
}


def _record(name: str, *args) -> None:
    state().npu_calls.append((name, args))


def _index(device) -> int:
    """int, 'npu:1', a torch.device, or None (= current device)."""
    if device is None:
        return state().current_device
    if isinstance(device, torch.device):
        return state().current_device if device.index is None else device.index
    if isinstance(device, str):
        _, _, idx = device.partition(":")
        return int(idx) if idx else state().current_device
    return int(device)


def _valid(device) -> int:
    idx = _index(device)
    count = state().settings.device_count
    if not 0 <= idx < count:
        raise AssertionError(f"Invalid device id {idx}: {count} NPU(s) visible (emulated)")
    return idx


def is_available() -> bool:
    _record("is_available")
    return True


def device_count() -> int:
    _record("device_count")
    return state().settings.device_count


def set_device(device) -> None:
    _record("set_device", device)
    state().current_device = _valid(device)


def current_device() -> int:
    _record("current_device")
    return state().current_device


def synchronize(device=None) -> None:
    _record("synchronize", device)
    _valid(device)


def mem_get_info(device=None) -> tuple[int, int]:
    _record("mem_get_info", device)
    _valid(device)
    s = state().settings
    return s.mem_free, s.mem_total


def empty_cache() -> None:
    _record("empty_cache")


def get_device_name(device_name=None) -> str:
    _record("get_device_name", device_name)
    _valid(device_name)
    return state().settings.chip


def get_soc_version() -> int:
    _record("get_soc_version")
    return state().settings.soc_version


def is_bf16_supported() -> bool:
    _record("is_bf16_supported")
    return state().settings.family != "310P"


class FakeNpuModule(types.ModuleType):
    def __getattr__(self, name: str):
        hint = _HINTS.get(name, "not emulated; ask for it to be added if the backend needs it")
        raise AttributeError(f"emulated torch.npu (torch_npu 2.13.0) has no attribute {name!r}: {hint}")


def make_npu_module() -> FakeNpuModule:
    mod = FakeNpuModule("torch_npu.npu", "The emulated torch.npu / torch_npu.npu namespace.")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu.npu", None)
    for fn in (is_available, device_count, set_device, current_device, synchronize, mem_get_info,
               empty_cache, get_device_name, get_soc_version, is_bf16_supported):
        setattr(mod, fn.__name__, fn)
    return mod
