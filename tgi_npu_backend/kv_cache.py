"""The paged KV pool: one (key, value) cache pair per layer, laid out by the attention backend.

Block ``b`` holds positions ``b * block_size .. b * block_size + block_size - 1`` of the flat
slot space; the router hands out blocks ``1..num_blocks-1`` (block 0 is its health probe's).
The pool outlives batches: KV written for a prompt may be read again by a later request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tgi_npu_backend.kernels import AttentionBackend

MAX_SLOTS = 2**32 - 1  # slots travel as uint32 on the wire


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int  # per rank
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def blocks_for(self, budget_bytes: int) -> int:
        return min(budget_bytes // self.bytes_per_block, MAX_SLOTS // self.block_size)


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, backend: AttentionBackend, device: torch.device):
        if num_blocks < 2:
            raise ValueError(
                f"the KV pool would hold only {num_blocks} block(s) of {spec.block_size} tokens; "
                "give it more memory (--kv-cache-fraction / TGI_NPU_KV_CACHE_FRACTION)"
            )
        self.spec = spec
        self.num_blocks = num_blocks
        self.caches: list[tuple[Tensor, Tensor]] = [
            backend.allocate_kv_cache(
                num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim, spec.dtype, device
            )
            for _ in range(spec.num_layers)
        ]

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.spec.block_size
