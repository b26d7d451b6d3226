"""Dense float64 reference math for the emulated operators.

Written independently of ``device_kernels/reference.py`` (which is the thing under test on CPU): each
function is the textbook formula on explicit per-head tensors, in float64, with no paging, no
grouping trick and no fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expand_kv_heads(t: Tensor, num_heads: int) -> Tensor:
    """[K, kv_heads, D] -> [K, num_heads, D]: query head h reads kv head h // (num_heads / kv)."""
    kv_heads = t.shape[1]
    owner = torch.arange(num_heads) // (num_heads // kv_heads)
    return t.index_select(1, owner)


def attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None = None,
    visible: Tensor | None = None,
) -> Tensor:
    """softmax(scale * q.k + bias, over visible keys) . v for one sequence, in float64.

    q [Q, H, D]; k [K, KVH, D]; v [K, KVH, Dv]; bias broadcastable to [H, Q, K] (added after the
    scale, as the ATB kernels add their mask); visible bool broadcastable to [H, Q, K] (False =
    the key does not take part). Returns [Q, H, Dv] float64. A row with no visible key is NaN.
    """
    num_heads = q.shape[1]
    q64 = q.to(torch.float64)
    k64 = expand_kv_heads(k.to(torch.float64), num_heads)
    v64 = expand_kv_heads(v.to(torch.float64), num_heads)
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    if bias is not None:
        scores = scores + bias.to(torch.float64)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v64)


def gather_paged(cache: Tensor, table_row: Tensor, n: int) -> Tensor:
    """Positions 0..n-1 of one sequence from a paged ND cache: [n, kv_heads, D]."""
    block_size = cache.shape[1]
    pos = torch.arange(n)
    blocks = table_row.to(torch.int64)[pos // block_size]
    return cache[blocks, pos % block_size]


def causal(q_positions: Tensor, k_len: int) -> Tensor:
    """[Q, K] bool: key j visible from the query at absolute position p iff j <= p."""
    return torch.arange(k_len)[None, :] <= q_positions[:, None]


def rms_norm(x: Tensor, gamma: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """y = x / sqrt(mean(x^2 over gamma's dims) + eps) * gamma, and rstd; both float64."""
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    x64 = x.to(torch.float64)
    rstd = torch.rsqrt(x64.pow(2).mean(dim=dims, keepdim=True) + eps)
    return x64 * rstd * gamma.to(torch.float64), rstd


def rotary(x: Tensor, r1: Tensor, r2: Tensor, mode: str, rotate: Tensor | None) -> Tensor:
    """npu_rotary_mul's documented formula (_op_plugin_docs.py), in float64."""
    x64 = x.to(torch.float64)
    if rotate is not None:
        turned = x64 @ rotate.to(torch.float64)
    elif mode == "half":
        first, second = x64.chunk(2, dim=-1)
        turned = torch.cat((-second, first), dim=-1)
    else:  # interleave: pairs (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])
        turned = torch.stack((-x64[..., 1::2], x64[..., 0::2]), dim=-1).flatten(-2)
    return r1.to(torch.float64) * x64 + r2.to(torch.float64) * turned
