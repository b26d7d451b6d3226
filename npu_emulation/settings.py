"""The emulated machine: SoC, NNAL presence, device memory, device count, injected faults.

SoC numbers are torch_npu 2.13.0's ``SocVersion`` enum (``torch_npu/include/torch_npu/csrc/core/npu/
NpuVariables.h`` in the wheel), which ``torch_npu.npu.get_soc_version()`` returns; the families are
the ranges vllm-ascend ``vllm_ascend/device/hardware.py`` (``device_type_from_runtime_soc``) reads:
200..205 = 310P (Atlas inference series), 220..225 = A2 (910B), 250..255 = A3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# name -> SocVersion value (NpuVariables.h, torch_npu 2.13.0)
SOC_VERSIONS: dict[str, int] = {
    "Ascend310P1": 200, "Ascend310P2": 201, "Ascend310P3": 202, "Ascend310P4": 203,
    "Ascend310P5": 204, "Ascend310P7": 205,
    "Ascend910B1": 220, "Ascend910B2": 221, "Ascend910B2C": 222, "Ascend910B3": 223,
    "Ascend910B4": 224, "Ascend910B4-1": 225,
    "Ascend910_9391": 250, "Ascend910_9392": 251, "Ascend910_9381": 252, "Ascend910_9382": 253,
    "Ascend910_9372": 254, "Ascend910_9362": 255,
}
# the family names accepted as ``soc`` and the chip each one stands for
FAMILY_DEFAULT_CHIP = {"910B": "Ascend910B4", "A3": "Ascend910_9391", "310P": "Ascend310P3"}

# Faults: a plain operator name perturbs that operator's result; "oom:<op>" makes it raise
# torch.OutOfMemoryError and "oom-rt:<op>" a RuntimeError, the two forms NPU OOM arrives in
# (libtorch_npu.so message: "NPU out of memory. Tried to allocate ...").
FAULT_PREFIXES = ("oom:", "oom-rt:")

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40,
          "TIB": 1 << 40}


def soc_family(soc: str) -> str:
    """'A2', 'A3' or '310P' for a family name or a chip name."""
    chip = FAMILY_DEFAULT_CHIP.get(soc, soc)
    version = SOC_VERSIONS[chip]
    if 200 <= version <= 205:
        return "310P"
    if 220 <= version <= 225:
        return "A2"
    return "A3"


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m or (m.group(2) or "").upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 2147483648, 2GiB, 512MiB)")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").upper()]


@dataclass(frozen=True)
class EmulationSettings:
    soc: str = "910B"  # "910B" (A2), "A3", "310P", or a chip name such as "Ascend910B2"
    nnal_missing: bool = False  # every ATB (torch_npu.atb / torch_npu._npu_*) call raises OSError
    mem_free: int = 8 << 30  # torch.npu.mem_get_info() -> (mem_free, mem_total)
    mem_total: int = 16 << 30
    device_count: int = 8
    faults: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.soc not in FAMILY_DEFAULT_CHIP and self.soc not in SOC_VERSIONS:
            known = ", ".join([*FAMILY_DEFAULT_CHIP, *SOC_VERSIONS])
            raise ValueError(f"soc: unknown SoC {self.soc!r}; one of {known}")
        if not 0 <= self.mem_free <= self.mem_total:
            raise ValueError(
                f"mem_free/mem_total: need 0 <= mem_free <= mem_total, got {self.mem_free} and "
                f"{self.mem_total}"
            )
        if self.device_count < 1:
            raise ValueError(f"devices: need at least one device, got {self.device_count}")
        object.__setattr__(self, "faults", frozenset(self.faults))
        from .schemas import OPERATORS  # late: schemas does not import settings

        for fault in self.faults:
            op = fault.split(":", 1)[1] if fault.startswith(FAULT_PREFIXES) else fault
            if op not in OPERATORS:
                raise ValueError(
                    f"fault: unknown operator {op!r}; one of {', '.join(sorted(OPERATORS))} "
                    f"(optionally prefixed {' or '.join(FAULT_PREFIXES)})"
                )

    @property
    def chip(self) -> str:
        return FAMILY_DEFAULT_CHIP.get(self.soc, self.soc)

    @property
    def soc_version(self) -> int:
        return SOC_VERSIONS[self.chip]

    @property
    def family(self) -> str:
        return soc_family(self.soc)

    @classmethod
    def parse(cls, text: str) -> EmulationSettings:
        """``"soc=310P,nnal=missing,mem_free=2GiB,mem_total=4GiB,devices=2,fault=OP"``.

        ``fault`` may repeat or hold several operators joined by ``+``. Empty text = defaults.
        """
        kw: dict = {}
        faults: set[str] = set()
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise ValueError(f"{key or item}: expected key=value in {text!r}")
            try:
                if key == "soc":
                    kw["soc"] = value
                elif key == "nnal":
                    if value not in ("missing", "present"):
                        raise ValueError(f"expected 'missing' or 'present', got {value!r}")
                    kw["nnal_missing"] = value == "missing"
                elif key in ("mem_free", "mem_total"):
                    kw[key] = parse_size(value)
                elif key == "devices":
                    kw["device_count"] = int(value)
                elif key == "fault":
                    faults.update(v for v in value.split("+") if v)
                else:
                    raise ValueError(
                        "unknown key; known keys: soc, nnal, mem_free, mem_total, devices, fault"
                    )
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        if "mem_free" in kw and "mem_total" not in kw:
            kw["mem_total"] = max(kw["mem_free"], cls.mem_total)
        if "mem_total" in kw and "mem_free" not in kw:
            kw["mem_free"] = min(kw["mem_total"], cls.mem_free)
        return cls(faults=frozenset(faults), **kw)
