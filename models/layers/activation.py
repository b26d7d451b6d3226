"""Activations: BLOOM's tanh GeLU and Gemma's gated tanh GeLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BloomGelu(nn.Module):
    """Tanh-approximated GeLU with BLOOM's (Megatron-DeepSpeed) constant 0.79788456."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


class GeluAndMul(nn.Module):
    """``gelu(x[..., :d]) * x[..., d:]`` for a merged ``[gate | up]`` projection ``[T, 2d]``."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:  # [T, 2d] -> [T, d]
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up
