"""Activations: BLOOM's tanh GeLU and Gemma's gated tanh GeLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BloomGelu(nn.Module):
    """BLOOM's tanh-approximated GeLU, as one fused kernel.

    NOTE: HF's ``BloomGelu`` spells it out, ``x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715
    * x * x)))`` (Megatron-DeepSpeed's constant for sqrt(2/pi)): seven elementwise passes over
    ``[tokens, 4 * hidden]``, ~25% of a CPU prefill. ``F.gelu(approximate="tanh")`` is the same
    function to within 5e-7 in float32 (``tests/models/test_activation.py`` checks it against HF's).

    ``inplace=True`` (as ``nn.ReLU``'s) overwrites ``x``: a model's MLP, whose ``[tokens, 4 *
    hidden]`` projection is a temporary, then reads and writes one buffer instead of reading one
    and writing a second as large. On this project's 2-core CPU, at BLOOM-560m's 3,328-token
    prefill shape: the GELU 45 ms fresh against 23 ms in place, the MLP 354 against 330 ms (8
    alternated runs, no page faults in either); a fresh buffer of that size can also be new
    memory, faulted in on first touch (``README.md``, Performance).
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return torch.ops.aten.gelu_(x, approximate="tanh")
        return F.gelu(x, approximate="tanh")


class GeluAndMul(nn.Module):
    """``gelu(x[..., :d]) * x[..., d:]`` for a merged ``[gate | up]`` projection ``[T, 2d]``."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:  # [T, 2d] -> [T, d]
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate).mul_(up)  # into gelu's fresh output
