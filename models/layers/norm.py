"""Normalisation layers: BLOOM's LayerNorm and Gemma's ``(1 + weight)`` RMSNorm (replicated)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgi_npu_backend.kernels.base import AttentionBackend
from tgi_npu_backend.weights import Weights


class LayerNorm(nn.Module):
    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(
            torch.empty(dim, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)

    def load(self, weights: Weights, prefix: str) -> None:
        self.weight.data.copy_(weights.get(f"{prefix}.weight", (self.dim,)))
        self.bias.data.copy_(weights.get(f"{prefix}.bias", (self.dim,)))

    def forward(self, x: Tensor) -> Tensor:  # [T, dim]
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


class GemmaRMSNorm(nn.Module):
    """RMSNorm with Gemma's two quirks.

    * The stored weight is an offset: the scale is ``1 + weight`` (zero-initialised weights).
    * Everything is computed in float32 and cast back only at the end: ``(x * (1 + w)).to(dtype)``,
      not ``x.to(dtype) * w`` as Llama does (HF PR 29402); it matters in float16/bfloat16.

    The normalisation is a kernel (``AttentionBackend.rms_norm`` / ``add_rms_norm``: pure torch on
    CPU, ``npu_rms_norm`` / ``npu_add_rms_norm`` on Ascend); ``1 + weight`` is folded once at load
    into a float32 ``gamma``.
    """

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        backend: AttentionBackend,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(
            torch.empty(dim, dtype=dtype, device=device), requires_grad=False
        )
        self.register_buffer(
            "gamma", torch.empty(dim, dtype=torch.float32, device=device), persistent=False
        )

    def load(self, weights: Weights, prefix: str) -> None:
        self.weight.data.copy_(weights.get(f"{prefix}.weight", (self.dim,)))
        self.gamma.copy_(1.0 + self.weight.float())

    def forward(self, x: Tensor) -> Tensor:  # [T, dim]
        return self.backend.rms_norm(x, self.gamma, self.eps)

    def add_forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """``(norm(x + residual), x + residual)``: the residual add fused with the norm."""
        return self.backend.add_rms_norm(x, residual, self.gamma, self.eps)
