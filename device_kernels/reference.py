"""Pure-PyTorch attention over a paged KV cache: the CPU/CUDA path and the test oracle's sibling.

Clarity first: scores and softmax in float32, one batched einsum per call (a Python loop runs only
over the sequences of a prefill pass), grouped-query attention without repeating K/V.

KV layout per layer: K and V are each ``[num_blocks, block_size, kv_heads, head_dim]``; position
``p`` of a sequence lives in flat slot
``block_table[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import AttentionMetadata, check_block_size


def attend(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, scale: float, alibi_slopes: Tensor | None
) -> Tensor:
    """Attention of queries at positions ``q_pos`` to keys at positions ``0..K-1``, causally.

    q ``[B, Q, heads, D]``; k, v ``[B, K, kv_heads, D]`` (key ``s`` is at position ``s``);
    q_pos ``[B, Q]`` int. A query at position ``p`` sees keys ``0..p``, so keys past a sequence's
    end (padding, other sequences' blocks, garbage) are excluded as long as ``p < seq_len``.
    Returns ``[B, Q, heads, D]`` in q's dtype.
    """
    b, nq, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    k_pos = torch.arange(k.shape[1], device=q.device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, Q, K]
    # NOTE: masked scores are overwritten below, but 0 * NaN = NaN in probs @ v, so values that no
    # query may see (unwritten cache slots may hold anything) are zeroed before the matmul.
    v = torch.where(allowed.any(dim=1)[:, :, None, None], v, 0)

    # Query head h uses kv head h // group: view heads as [kv_heads, group], never repeat K/V.
    qg = q.reshape(b, nq, kv_heads, group, d).float()
    scores = torch.einsum("bqngd,bsnd->bngqs", qg, k.float()) * scale  # [B, KVH, G, Q, K]
    if alibi_slopes is not None:
        rel = (k_pos[None, None, :] - q_pos[:, :, None]).float()  # [B, Q, K] key_pos - query_pos
        slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).view(
            1, kv_heads, group, 1, 1
        )
        scores = scores + slopes * rel[:, None, None]
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # every query sees at least itself: no all -inf row
    out = torch.einsum("bngqs,bsnd->bqngd", probs, v.float())
    return out.reshape(b, nq, heads, d).to(q.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ReferenceBackend:
    """The attention protocol (``device_kernels/base.py``) in plain PyTorch."""

    name = "reference"
    DEFAULT_BLOCK_SIZE = 16  # small blocks waste little of the pool on CPU

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        return meta  # the reference needs nothing beyond the metadata

    def block_size_for(self, head_dim: int) -> int:
        return self.DEFAULT_BLOCK_SIZE

    def rms_norm(self, x: Tensor, gamma: Tensor, eps: float) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (out * gamma.float()).to(x.dtype)

    def add_rms_norm(
        self, x: Tensor, residual: Tensor, gamma: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        s = x + residual
        return self.rms_norm(s, gamma, eps), s

    def rotary(
        self, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor]:
        return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        check_block_size(block_size)
        return (num_blocks, block_size, num_kv_heads, head_dim)

    def allocate_kv_cache(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[Tensor, Tensor]:
        shape = self.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        return (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    def store_kv(
        self,
        key: Tensor,
        value: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Write ``key``/``value`` ``[T, kv_heads, head_dim]`` to their slots; -1 = don't store."""
        slots = meta.slot_mapping
        keep = slots >= 0
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
        kv_heads, head_dim = key_cache.shape[-2:]
        key_cache.view(-1, kv_heads, head_dim)[slots] = key.to(key_cache.dtype)
        value_cache.view(-1, kv_heads, head_dim)[slots] = value.to(value_cache.dtype)

    def prefill(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        alibi_slopes: Tensor | None,
    ) -> Tensor:
        out = torch.empty_like(query)
        start = 0
        for i, (ctx, n) in enumerate(zip(meta.context_lens_list, meta.seq_lens_list)):
            end = start + (n - ctx)
            if ctx > 0:  # the prefix is only in the cache (this pass's tokens were stored too)
                k = self._gather(key_cache, meta.block_tables[i], n)
                v = self._gather(value_cache, meta.block_tables[i], n)
            else:
                k, v = key[start:end], value[start:end]
            q_pos = torch.arange(ctx, n, device=query.device)
            out[start:end] = attend(
                query[None, start:end], k[None], v[None], q_pos[None], scale, alibi_slopes
            )[0]
            start = end
        return out

    def decode(
        self,
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        alibi_slopes: Tensor | None,
    ) -> Tensor:
        b = query.shape[0]
        block_size = key_cache.shape[1]
        num_blocks = -(-meta.max_seqlen_k // block_size)
        table = meta.block_tables[
            :, :num_blocks
        ].long()  # [B, nb]; padding entries point at block 0
        k = key_cache[table].flatten(1, 2)  # [B, nb * block_size, kv_heads, D]
        v = value_cache[table].flatten(1, 2)
        q_pos = (meta.seq_lens.to(query.device).long() - 1)[
            :, None
        ]  # [B, 1] the new token's position
        return attend(query[:, None], k, v, q_pos, scale, alibi_slopes).reshape(b, *query.shape[1:])

    @staticmethod
    def _gather(cache: Tensor, block_table: Tensor, n: int) -> Tensor:
        """Positions ``0..n-1`` of one sequence: ``[n, kv_heads, head_dim]``."""
        block_size = cache.shape[1]
        blocks = block_table[: -(-n // block_size)].long()
        return cache[blocks].flatten(0, 1)[:n]
