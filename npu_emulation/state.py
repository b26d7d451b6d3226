"""What the emulation counts, and the one place that holds the current settings."""

from __future__ import annotations

from collections import Counter

import torch

from .settings import EmulationSettings


class EmulationState:
    """Counters of one emulated process; ``install()`` returns it, ``state()`` finds it again.

    ``calls``: operator name -> calls (every call that reached the operator, valid or not).
    ``fallbacks``: reason -> count, as reported by the backend through ``record_fallback``.
    ``peak_mask_bytes``: the largest ``nbytes`` of any mask/bias/slopes tensor passed to an
    emulated operator or reported through ``record_mask``.
    ``npu_calls``: ``(function, args)`` of every call into the fake ``torch.npu``.
    """

    def __init__(self, settings: EmulationSettings) -> None:
        self.settings = settings
        self.calls: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.peak_mask_bytes = 0
        self.mask_bytes: Counter[str] = Counter()  # name -> largest nbytes seen under that name
        self.npu_calls: list[tuple[str, tuple]] = []
        self.current_device = 0

    def record_fallback(self, op: str, reason: str) -> None:
        self.fallbacks[f"{op}: {reason}"] += 1

    def record_mask(self, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        nbytes = tensor.numel() * tensor.element_size()
        self.mask_bytes[name] = max(self.mask_bytes[name], nbytes)
        self.peak_mask_bytes = max(self.peak_mask_bytes, nbytes)

    def reset_counters(self) -> None:
        self.calls.clear()
        self.fallbacks.clear()
        self.mask_bytes.clear()
        self.peak_mask_bytes = 0
        self.npu_calls.clear()

    def __repr__(self) -> str:
        return (
            f"EmulationState(soc={self.settings.chip}, calls={dict(self.calls)}, "
            f"fallbacks={dict(self.fallbacks)}, peak_mask_bytes={self.peak_mask_bytes})"
        )


_STATE: EmulationState | None = None


def state() -> EmulationState:
    """The process's emulation state (default settings until ``install`` sets others)."""
    global _STATE
    if _STATE is None:
        _STATE = EmulationState(EmulationSettings())
    return _STATE
