"""``PagedAttention``: the model-side face of an ``AttentionBackend``.

It stores this pass's K/V into the paged cache, then runs the backend's prefill or decode kernel.
Heads are this rank's heads (tensor parallelism splits heads; see ``ModelConfig``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tgi_npu_backend.kernels.base import AttentionBackend, AttentionMetadata, Phase


class PagedAttention(nn.Module):
    def __init__(
        self,
        *,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: AttentionBackend,
        alibi_slopes: Tensor | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads evenly")
        self.layer_idx = layer_idx
        self.num_heads = num_heads  # local (this rank's) query heads
        self.num_kv_heads = num_kv_heads  # local KV heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.alibi_slopes: Tensor | None
        if alibi_slopes is not None:
            if alibi_slopes.shape != (num_heads,):
                raise ValueError(
                    f"expected {num_heads} ALiBi slopes, got {tuple(alibi_slopes.shape)}"
                )
            # float32 always: the slopes are tiny for late heads (2**-8 and below).
            self.register_buffer(
                "alibi_slopes",
                alibi_slopes.to(device=device, dtype=torch.float32),
                persistent=False,
            )
        else:
            self.alibi_slopes = None

    def forward(
        self,
        query: Tensor,  # [T, H, D]
        key: Tensor,  # [T, KVH, D]
        value: Tensor,  # [T, KVH, D]
        kv_cache: tuple[Tensor, Tensor],  # (key_cache, value_cache) in the backend's layout
        meta: AttentionMetadata,
    ) -> Tensor:  # [T, H * D]
        key_cache, value_cache = kv_cache
        self.backend.store_kv(key, value, key_cache, value_cache, meta)
        if meta.phase is not Phase.DECODE:
            out = self.backend.prefill(
                query, key, value, key_cache, value_cache, meta, self.scale, self.alibi_slopes
            )
        else:
            out = self.backend.decode(
                query, key_cache, value_cache, meta, self.scale, self.alibi_slopes
            )
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
