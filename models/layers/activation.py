"""Activations: BLOOM's tanh GeLU and Gemma's gated tanh GeLU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BloomGelu(nn.Module):
    """BLOOM's tanh-approximated GeLU, as one fused kernel.

    NOTE: HF's ``BloomGelu`` spells it out, ``x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715
    * x * x)))`` (Megatron-DeepSpeed's constant for sqrt(2/pi)): seven elementwise passes over
    ``[tokens, 4 * hidden]``, ~25% of a CPU prefill. ``F.gelu(approximate="tanh")`` is the same
    function to within 5e-7 in float32 (``tests/models/test_activation.py`` checks it against HF's).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")


class GeluAndMul(nn.Module):
    """``gelu(x[..., :d]) * x[..., d:]`` for a merged ``[gate | up]`` projection ``[T, 2d]``."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:  # [T, 2d] -> [T, d]
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up
