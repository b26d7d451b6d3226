"""Attention kernels behind one protocol (``base.AttentionBackend``), chosen once per device.

``reference`` is plain PyTorch (CPU/CUDA path and test oracle), ``npu`` uses torch_npu; importing
this package never imports torch_npu.
"""

from __future__ import annotations

import torch

from .base import AttentionBackend, AttentionMetadata, Phase, check_block_size
from .reference import ReferenceBackend

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "Phase",
    "ReferenceBackend",
    "check_block_size",
    "get_backend",
]


def get_backend(device: torch.device | str, native: bool = True) -> AttentionBackend:
    """The attention backend for ``device``: cpu -> cpu (fast), cuda -> reference, npu -> torch_npu.

    A string is accepted because ``torch.device("npu")`` only parses once torch_npu is loaded.
    ``native``: the CPU backend decodes with its native kernel where it builds (``cpu_native.py``).
    """
    kind = device.split(":")[0] if isinstance(device, str) else device.type
    if kind in ("cpu", "cuda"):
        from .cpu import CpuBackend

        return CpuBackend(native=native) if kind == "cpu" else ReferenceBackend()
    if kind == "npu":
        from .npu import NpuBackend

        return NpuBackend()
    raise ValueError(f"no attention backend for device type {kind!r}: use cpu, cuda or npu")
