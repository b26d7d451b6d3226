"""ALiBi slopes (BLOOM): one slope per head; attention adds ``slope * (key_pos - query_pos)``.

For a head count that is not a power of two (BLOOM-176B has 112 heads), the slopes are those of
the closest lower power of two followed by every other slope of the next power of two: HF
``build_alibi_tensor``, after the ALiBi reference code (ofirpress/attention_with_linear_biases).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tgi_npu_backend.distributed import shard_size


def alibi_slopes(num_heads: int) -> Tensor:
    """``[num_heads]`` float32 slopes, computed with the same float32 ops as HF."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def alibi_slopes_for_rank(num_heads: int, rank: int, world_size: int) -> Tensor:
    """The slopes of the contiguous block of heads that ``rank`` computes."""
    local = shard_size(num_heads, world_size, "n_head")
    return alibi_slopes(num_heads)[rank * local : (rank + 1) * local].contiguous()
