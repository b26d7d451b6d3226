"""Is there a usable Ascend NPU here, and which: the probes ``device.py`` runs before choosing a
platform, and the block size the NPU paged-attention ops want. No import of torch_npu happens
before one of these is called (``device_kernels/npu.py`` calls the operators themselves).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

from .base import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

FUSED_DTYPES = (torch.float16, torch.bfloat16)  # what the ATB / aclnn attention ops take


def load_torch_npu() -> Any:
    """The torch_npu module (imported on first use)."""
    import torch_npu as module

    return module


@functools.cache
def npu_available() -> bool:
    """True when torch_npu imports and sees a device.

    NOTE: with torch-npu installed but no CANN, ``import torch_npu`` raises ImportError
    (libhccl.so) and, through the ``torch.backends`` autoload entry point, RuntimeError. We never
    set TORCH_DEVICE_BACKEND_AUTOLOAD: if autoload is on and broken, ``import torch`` itself has
    already failed; if it is off, the explicit import below is the only place torch_npu loads,
    and any failure means "no NPU".
    """
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        load_torch_npu()  # registers torch.npu
        return bool(torch.npu.is_available())
    except (ImportError, RuntimeError, OSError, AttributeError):
        return False


def soc_version() -> int:
    """``torch_npu.npu.get_soc_version()``: 200-205 = 310P, 220-225 = A2, 250-255 = A3."""
    return int(load_torch_npu().npu.get_soc_version())


def probe_atb(dtype: torch.dtype, device: torch.device) -> None:
    """One one-block ``_npu_reshape_and_cache``: torch_npu loads ``libop_plugin_atb.so`` (which
    needs NNAL's ``libatb.so``) at the first ATB call and raises ``OSError`` there."""
    dtype = dtype if dtype in FUSED_DTYPES else torch.float16
    key = torch.zeros((1, 1, 16), dtype=dtype, device=device)
    cache = torch.zeros((1, 16, 1, 16), dtype=dtype, device=device)
    slots = torch.zeros((1,), dtype=torch.int32, device=device)
    load_torch_npu()._npu_reshape_and_cache(key, key, cache, cache.clone(), slots)


def recommended_block_size(head_dim: int) -> int:
    """Largest valid block size with ``block_size * head_dim <= 128 * 128``.

    128 for head_dim <= 128, 64 for Gemma's 256. NOTE: the paged-attention docs require
    ``block_size * head_size <= 128*128`` on 310P and in quantized/parallel-decoding modes, and
    MindIE runs Gemma with block_size 64; plain fp16/bf16 decode on A2 would accept 128 too.
    """
    size = min(MAX_BLOCK_SIZE, (128 * 128 // head_dim) // MIN_BLOCK_SIZE * MIN_BLOCK_SIZE)
    if size < MIN_BLOCK_SIZE:
        raise ValueError(f"head_dim {head_dim} is too large for the NPU paged-attention ops")
    return size
