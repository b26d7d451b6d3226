"""Which device the shard runs on, its default dtype, and how much memory it can give the KV pool."""

from __future__ import annotations

import os

import torch

from .config import DEFAULT_CPU_KV_FRACTION, DEFAULT_NPU_KV_FRACTION

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def select_device(requested: str, rank: int) -> torch.device:
    """``auto`` picks the NPU when torch_npu and CANN are usable, else the CPU."""
    from tgi_npu_backend.kernels.npu import npu_available

    if requested == "cpu":
        return torch.device("cpu")
    if npu_available():
        return torch.device("npu", rank % torch.npu.device_count())  # type: ignore[attr-defined]
    if requested == "npu":
        raise ValueError(
            "--device npu: torch_npu is not usable here (is CANN installed and "
            "`source /usr/local/Ascend/ascend-toolkit/set_env.sh` done?); use --device cpu"
        )
    return torch.device("cpu")


def select_dtype(requested: str | None, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """--dtype wins; CPU defaults to float32; NPU to the checkpoint's half type (else float16)."""
    if requested is not None:
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in ("float16", "bfloat16"):
        return DTYPES[checkpoint_dtype]
    return torch.float16


def available_memory(device: torch.device) -> int:
    """Bytes the shard may still allocate on ``device``."""
    if device.type == "npu":
        free, _total = torch.npu.mem_get_info(device)  # type: ignore[attr-defined]
        return int(free)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_budget(device: torch.device, fraction: float | None) -> int:
    """Bytes for the KV pool: ``fraction`` of what is available after the model and warmup."""
    if fraction is None:
        fraction = DEFAULT_CPU_KV_FRACTION if device.type == "cpu" else DEFAULT_NPU_KV_FRACTION
    return int(available_memory(device) * fraction)


def synchronize(device: torch.device) -> None:
    if device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "npu":
        torch.npu.empty_cache()  # type: ignore[attr-defined]
    elif device.type == "cuda":
        torch.cuda.empty_cache()
