"""Which platform the shard runs on: where tensors live, its default dtype, how much memory is
still available (``kv_sizing`` turns that into the KV pool), and the platform's startup checks.

``npu-emulated`` is a verification mode: the NPU platform (NpuBackend, the NPU dtype and
block-size policy, NPU memory sizing from ``torch.npu.mem_get_info``, set_device, the SoC and
NNAL checks) with tensors on the CPU and torch_npu replaced by ``npu_emulation``, which enforces
the real operators' schemas and documented preconditions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from loguru import logger

from . import host_malloc

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# torch_npu.npu.get_soc_version() ranges (vllm-ascend device/hardware.py).
SOC_310P = range(200, 206)
SOC_A2 = range(220, 226)
SOC_A3 = range(250, 256)


@dataclass(frozen=True)
class Platform:
    kind: str  # "cpu" | "cuda" | "npu": what the kernels and memory policy target
    device: torch.device  # where tensors live (the CPU when the NPU is emulated)
    emulated: bool = False
    index: int = 0  # device ordinal (NPU: rank % device_count)

    @property
    def name(self) -> str:
        """Info.device_type."""
        return "npu-emulated" if self.emulated else self.kind

    @property
    def dist_backend(self) -> str:
        if self.kind == "npu" and not self.emulated:
            return "hccl"
        return "nccl" if self.kind == "cuda" else "gloo"

    def default_dtype(self, checkpoint_dtype: str | None, weight_only_int8: bool = False) -> torch.dtype:
        """CPU: float32, but bfloat16 for a weight-only int8 (W8A16) model where oneDNN has
        bfloat16 kernels: 16-bit activations as the scheme says, and the int8 kernel's own input
        type (``models/layers/quant/ops_cpu.py``). NPU: the checkpoint's half type, else float16
        (the ATB ops take half types only)."""
        if self.kind == "cpu":
            from tgi_npu_backend.models.layers.linear import BF16_ONEDNN

            return torch.bfloat16 if weight_only_int8 and BF16_ONEDNN else torch.float32
        if checkpoint_dtype in ("float16", "bfloat16"):
            return DTYPES[checkpoint_dtype]
        return torch.float16

    def set_device(self) -> None:
        """Bind this process to its NPU before anything touches it (the HCCL group included).

        Where the model runs on the CPU (the CPU, or the NPU emulated on it), the calling thread,
        the one that then runs every step, flushes denormal floats to zero, and the process keeps
        the memory it frees (``host_malloc.py``)."""
        if self.kind == "npu":
            torch.npu.set_device(self.index)  # type: ignore[attr-defined]
        elif self.kind == "cuda":
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu":
            # NOTE: a softmax over scores more than ~87 below their maximum (ALiBi's far keys, a
            # 250k-vocabulary LM head) makes float32 denormals, which the CPU handles in microcode:
            # measured on [32, 250880] logits spread over 300, torch.log_softmax took 31.8 ms
            # without and 14.7 ms with flush-to-zero (2 threads). Denormals are below 1.2e-38, so
            # no logprob or token changes. MXCSR is per thread, and the OpenMP team a thread
            # starts on its first parallel op inherits it: this runs before the first one.
            torch.set_flush_denormal(True)
            host_malloc.keep_freed_memory()  # before the model loads

    def available_memory(self) -> int:
        """Bytes the shard may still allocate."""
        if self.kind == "npu":
            free, _total = torch.npu.mem_get_info(self.index)  # type: ignore[attr-defined]
            return int(free)
        if self.kind == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free)
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def synchronize(self) -> None:
        if self.kind == "npu":
            torch.npu.synchronize(self.index)  # type: ignore[attr-defined]
        elif self.kind == "cuda":
            torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        if self.kind == "npu":
            torch.npu.empty_cache()  # type: ignore[attr-defined]
        elif self.kind == "cuda":
            torch.cuda.empty_cache()


CPU = Platform("cpu", torch.device("cpu"))


def select_platform(requested: str, rank: int, emulation: str | None = None) -> Platform:
    """``auto`` picks the NPU when torch_npu and CANN are usable, else the CPU; ``npu-emulated``
    installs the emulation (knobs in ``emulation``, ``TGI_NPU_EMULATION``'s syntax)."""
    from tgi_npu_backend.kernels.npu_platform import npu_available

    if requested == "cpu":
        return CPU
    if requested == "npu-emulated":
        from tgi_npu_backend.npu_emulation import EmulationSettings, install

        settings = EmulationSettings.parse(emulation or "")
        install(settings)
        index = rank % torch.npu.device_count()  # type: ignore[attr-defined]
        return Platform("npu", torch.device("cpu"), emulated=True, index=index)
    if npu_available():
        index = rank % torch.npu.device_count()  # type: ignore[attr-defined]
        return Platform("npu", torch.device("npu", index), index=index)
    if requested == "npu":
        raise ValueError(
            "--device npu: torch_npu is not usable here (is CANN installed and "
            "`source /usr/local/Ascend/ascend-toolkit/set_env.sh` done?); use --device cpu"
        )
    return CPU


def select_dtype(requested: str | None, platform: Platform, checkpoint_dtype: str | None,
                 weight_only_int8: bool = False) -> torch.dtype:
    """--dtype wins; otherwise the platform's default for this checkpoint."""
    if requested is not None:
        return DTYPES[requested]
    return platform.default_dtype(checkpoint_dtype, weight_only_int8)


def check_npu_startup(platform: Platform, dtype: torch.dtype) -> None:
    """Refuse, before the socket appears, an NPU this shard cannot serve on, with what to change.

    * SoC: the caches, masks and weights here are ND (Atlas A2/A3). Atlas 300I (310P) needs NZ
      layouts for the ATB attention ops and has no bfloat16 (torch-npu 2.13.0
      ``_atb_api_docs.py``, ``_npu_paged_attention_v2``: "Atlas 推理系列产品 ... NZ格式",
      "只支持float16").
    * NNAL/ATB: torch_npu loads ``libop_plugin_atb.so`` (which needs NNAL's ``libatb.so``) at the
      first ATB call and raises ``OSError`` there; a one-block probe here makes that happen at
      startup instead of in the middle of Warmup.
    """
    if platform.kind != "npu":
        return
    from tgi_npu_backend.kernels.npu_platform import probe_atb, soc_version

    soc = soc_version()
    name = torch.npu.get_device_name(platform.index)  # type: ignore[attr-defined]
    if soc in SOC_310P:
        raise ValueError(
            f"{name} (SoC version {soc}, Atlas 300I / 310P) is not supported: its ATB attention "
            "ops need NZ-format KV caches and masks, and it has no bfloat16; this shard lays them "
            "out ND for Atlas A2/A3 (910B/910C). Serve on an A2/A3 card."
        )
    if soc not in SOC_A2 and soc not in SOC_A3:
        logger.warning(f"{name}: SoC version {soc} is neither A2 (220-225) nor A3 (250-255); untested")
    try:
        probe_atb(dtype, platform.device)
    except OSError as err:
        raise ValueError(
            f"the Ascend NNAL (ATB) library is not usable: {err}. Install the NNAL package that "
            "matches your CANN and torch-npu, then `source /usr/local/Ascend/nnal/atb/set_env.sh` "
            "(the container entrypoint does this)"
        ) from err
    logger.info(f"NPU {platform.index}: {name}, SoC version {soc}; ATB operators load")
