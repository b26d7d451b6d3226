"""Rotary position embeddings, neox ("rotate half") style, as Gemma uses them.

cos/sin are computed in float32 from each token's absolute position, so a ragged batch of
prompts, decode steps at different lengths and late-joining sequences all rotate correctly:
nothing here assumes positions start at 0 or are contiguous. The rotation itself is a kernel
(``AttentionBackend.rotary``: pure torch on CPU, ``npu_rotary_mul`` on Ascend).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, rope_theta: float, device: torch.device | None = None
    ) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        # Same expression as HF (float32 arange / dim) so that the frequencies match bit for bit.
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        inv_freq = 1.0 / (rope_theta**exponent)  # [D/2] float32
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``positions`` ``[T]`` -> cos, sin ``[T, 1, D]`` in ``dtype``, computed once per forward
        pass and shared by every layer. NOTE: computed in float32, then cast to the activation
        dtype before use, as HF does."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)
