"""Plain dense computations the emulated operators are checked against (SDPA in float32, explicit
per-position cache writes): written for the tests, sharing nothing with the emulation's oracle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TOL = {torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2.5e-2, rtol=2e-2)}


def dense(q, k, v, scale, bias=None):
    """q [Q, H, D], k [K, KVH, D], v [K, KVH, Dv], bias additive [H|1, Q, K] -> [Q, H, Dv] float32."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(heads // kv_heads, dim=1)
    v = v.float().repeat_interleave(heads // kv_heads, dim=1)
    mask = None if bias is None else bias.float().expand(heads, q.shape[0], k.shape[0])
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


def causal_bias(q_len, k_len):
    """[1, Q, K]: 0 where key <= query position (queries are the last q_len positions), -inf else."""
    q_pos = torch.arange(k_len - q_len, k_len)
    allowed = torch.arange(k_len)[None, :] <= q_pos[:, None]
    return torch.zeros(q_len, k_len).masked_fill(~allowed, float("-inf"))[None]


def bloom_slopes(heads):
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < heads:
        extra = 2.0 ** (-4.0 / closest)
        slopes += [extra ** (2 * i + 1) for i in range(heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes, q_len, k_len):
    """[H, Q, K]: slope * (key_pos - query_pos), causal (-inf above), queries at the end."""
    q_pos = torch.arange(k_len - q_len, k_len)
    rel = (torch.arange(k_len)[None, :] - q_pos[:, None]).float()
    return slopes[:, None, None] * rel[None] + causal_bias(q_len, k_len)


class Paged:
    """Sequences of random K/V written position by position into a paged ND cache with shuffled
    block tables; the cache starts as random garbage."""

    def __init__(self, lens, block_size, kv_heads, head_dim, dtype, seed=0, spare_blocks=3):
        g = torch.Generator().manual_seed(seed)
        self.lens, self.block_size, self.dtype = list(lens), block_size, dtype
        per_seq = [math.ceil(n / block_size) for n in self.lens]
        self.num_blocks = sum(per_seq) + spare_blocks
        shape = (self.num_blocks, block_size, kv_heads, head_dim)
        self.key_cache = torch.randn(shape, generator=g).to(dtype)
        self.value_cache = torch.randn(shape, generator=g).to(dtype)
        order = torch.randperm(self.num_blocks, generator=g).tolist()
        width = max(per_seq)
        self.block_table = torch.zeros(len(self.lens), width, dtype=torch.int32)
        self.keys, self.values = [], []
        for i, n in enumerate(self.lens):
            blocks = [order.pop() for _ in range(per_seq[i])]
            self.block_table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            k = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
            v = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
            for p in range(n):
                self.key_cache[blocks[p // block_size], p % block_size] = k[p]
                self.value_cache[blocks[p // block_size], p % block_size] = v[p]
            self.keys.append(k)
            self.values.append(v)

    def slot(self, i, p):
        return int(self.block_table[i, p // self.block_size]) * self.block_size + p % self.block_size
