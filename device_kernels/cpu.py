"""Fast pure-PyTorch attention for the CPU: the serving path. ``reference.py`` stays the oracle.

Same protocol and semantics as the reference (cached prefixes, ALiBi, GQA/MQA, slot -1 = don't
store); what differs is how the work is laid out:

* **KV layout** ``[num_blocks, kv_heads, block_size, head_dim]``: one block of one KV head is a
  contiguous ``[block_size, head_dim]`` matrix, so gathered blocks feed ``bmm`` as they are.
* **Decode**, float32 caches: the native kernel (``cpu_decode.c``, built and loaded by
  ``cpu_native.py``) reads each sequence's blocks where they lie, one task per sequence and group
  of KV heads. Other dtypes, or where it cannot be built (no C compiler), or with
  ``native=False``: PyTorch ops over exactly the blocks each sequence holds (no padding to the
  longest sequence), ``bmm`` over ``[blocks * kv_heads]`` for the scores and for the values, read
  in place over runs of consecutive blocks. That softmax spans a sequence's blocks: the
  per-sequence max comes from a ``scatter_reduce``, exponentials are summed per block and added
  per sequence with ``index_add`` (no permutes, no Python loop over sequences).
* **Prefill** pads the sequences of a pass into ``[b, q, heads, D]`` and runs
  ``scaled_dot_product_attention`` with the causal + ALiBi mask. Sequences are sorted by length
  and cut into groups whose padding stays under ``cpu_plan.PAD_RATIO`` (a loop over groups,
  not over sequences); a group without cached prefixes shares one ``[1, heads, q, q]`` mask.

Scores, softmax and the weighted sum run in float32 for every cache dtype, as in the reference.
The per-step index tensors depend only on the metadata: ``prepare`` builds them once per forward
pass (``cpu_plan.py``; a decode pass's with numpy, on the host copies of the metadata, and only
when the PyTorch decode runs: the native kernel reads the block table itself), and every layer
reads them from ``meta.plan``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_native
from .base import AttentionMetadata, check_block_size, plan_of, with_plan
from .cpu_plan import BlockLayout, CpuPlan, DecodePlan, PrefillGroup, build_plan, decode_plan
from .reference import ReferenceBackend

NEG_INF = float("-inf")
# NOTE: torch's CPU ``exp`` takes ~80x longer per element below -87.3, where float32 ``exp``
# underflows (measured on torch 2.13, AVX512: 32k elements in [-300, 0] 1320 us, in [-87, -80]
# 15 us; flush-to-zero does not help, unlike ``softmax``). ALiBi puts far keys there (slope 0.7
# times a distance of 125 is -87). Clamping the scores' distance to the maximum at -87 first keeps
# exp on its fast path; exp(-87) = 1.6e-38 against a maximum's 1, so the sums and outputs do not
# change in float32.
EXP_FLOOR = -87.0


class CpuBackend(ReferenceBackend):
    """The attention protocol (``device_kernels/base.py``) for CPU serving; pointwise kernels
    (RMSNorm, rotary) and the block size are the reference's."""

    name = "cpu"

    def __init__(self, native: bool = True) -> None:
        super().__init__()
        self._layout: BlockLayout | None = None  # the last decode pass's (cpu_plan.decode_plan)
        # the native decode kernel for float32 caches (None: PyTorch ops for every dtype)
        self.native = cpu_native.decode_kernel() if native else None

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        check_block_size(block_size)
        return (num_blocks, num_kv_heads, block_size, head_dim)

    # ------------------------------------------------------------------ per-step plan
    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The pass's index plan (``cpu_plan.py``); a decode pass's block layout is kept for the
        next one. With the native kernel a decode pass's attention plan is left to ``decode``,
        which builds it only for a cache the kernel does not take."""
        plan, self._layout = build_plan(meta, self._layout, decode=self.native is None)
        return with_plan(meta, plan)

    def _decode_plan(self, meta: AttentionMetadata) -> DecodePlan:
        plan: CpuPlan = plan_of(meta, self.name)
        if plan.attention is None:  # once per pass, shared by the layers
            plan.attention, self._layout = decode_plan(meta, meta.block_size, self._layout)
        return plan.attention

    # ------------------------------------------------------------------ the protocol
    def store_kv(
        self,
        key: Tensor,
        value: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Write ``key``/``value`` ``[T, kv_heads, head_dim]`` to their slots; -1 = don't store."""
        p: CpuPlan = plan_of(meta, self.name)
        if p.keep is not None:
            key, value = key[p.keep], value[p.keep]
        key_cache[p.store_blocks, :, p.store_offsets] = key.to(key_cache.dtype)
        value_cache[p.store_blocks, :, p.store_offsets] = value.to(value_cache.dtype)

    def decode(
        self,
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        alibi_slopes: Tensor | None,
    ) -> Tensor:
        if self.native is not None and key_cache.dtype == torch.float32:
            out = self.native(query, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                              scale, alibi_slopes)
            return out.to(query.dtype)
        b, heads, d = query.shape
        _, kv_heads, bs, _ = key_cache.shape
        group = heads // kv_heads
        p = self._decode_plan(meta)
        if b == 1:
            return _decode_one(query, key_cache, value_cache, p, scale, alibi_slopes)
        n = p.blocks.shape[0]
        # Query head h uses KV head h // group: [B, KVH, G, D] per block, never repeating K/V.
        q = query.float().view(b, kv_heads, group, d).index_select(0, p.seq_of)  # [N, KVH, G, D]
        bias = None if alibi_slopes is None else alibi_slopes.view(1, kv_heads, group, 1) * p.rel
        in_place = p.runs is not None and key_cache.dtype == torch.float32
        if in_place:
            scores = _run_scores(q, key_cache, p).mul_(scale)  # -inf stays -inf
            if bias is not None:
                scores.add_(bias)
        else:
            k = key_cache.index_select(0, p.blocks).float()  # [N, KVH, bs, D]
            v = value_cache.index_select(0, p.blocks).float()
            # NOTE: probabilities are 0 past a sequence's end, but 0 * NaN = NaN: unwritten slots
            # of the last blocks (which may hold anything) are zeroed in V; masked in the scores.
            v[p.last] = v[p.last].masked_fill(p.last_invalid, 0.0)
            kt = k.view(n * kv_heads, bs, d).transpose(1, 2)
            if bias is not None:  # [N, KVH, G, bs]
                scores = torch.baddbmm(bias.view(n * kv_heads, group, bs), q.view(-1, group, d), kt, alpha=scale)
            else:
                scores = torch.bmm(q.view(-1, group, d), kt).mul_(scale)
            scores = scores.view(n, kv_heads, group, bs).masked_fill_(p.rel > 0, NEG_INF)
        # softmax over all blocks of a sequence
        block_max = scores.amax(-1)  # [N, KVH, G]
        seq_max = torch.full((b, kv_heads, group), NEG_INF, device=query.device)
        seq_max.scatter_reduce_(0, p.seq_of.view(n, 1, 1).expand_as(block_max), block_max, "amax")
        # unnormalised; EXP_FLOOR: see its note (a masked -inf becomes a weight of 1.6e-38, on
        # a value that is zero or finite)
        probs = scores.sub_(seq_max.index_select(0, p.seq_of)[..., None]).clamp_(min=EXP_FLOOR).exp_()
        norm = torch.zeros_like(seq_max).index_add_(0, p.seq_of, probs.sum(-1))  # [B, KVH, G]
        if in_place:
            partial = _run_values(probs, value_cache, p)
        else:
            partial = torch.bmm(probs.view(-1, group, bs), v.view(n * kv_heads, bs, d))
        out = torch.zeros(b, kv_heads, group, d, device=query.device).index_add_(
            0, p.seq_of, partial.view(n, kv_heads, group, d)
        )
        return out.div_(norm[..., None]).view(b, heads, d).to(query.dtype)

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
        _, heads, d = query.shape
        kv_heads = key.shape[1]
        groups: list[PrefillGroup] = plan_of(meta, self.name).attention
        out = torch.empty_like(query)
        f32 = torch.float32
        for g in groups:
            q = query.index_select(0, g.q_src).to(f32)  # [b * q, H, D]
            k = key.index_select(0, g.k_src).to(f32)  # [b * k, KVH, D]
            v = value.index_select(0, g.k_src).to(f32)
            if g.prefix_dst.numel():  # cached prefix positions come from the cache
                k.index_copy_(0, g.prefix_dst, key_cache[g.prefix_block, :, g.prefix_offset].to(f32))
                v.index_copy_(0, g.prefix_dst, value_cache[g.prefix_block, :, g.prefix_offset].to(f32))
            if alibi_slopes is not None:
                bias = alibi_slopes.view(1, heads, 1, 1) * g.rel[:, None]  # [b|1, H, q, k]
                mask = bias.masked_fill_(~g.allowed[:, None], NEG_INF)
            else:
                mask = torch.zeros(g.allowed.shape, device=query.device).masked_fill_(
                    ~g.allowed, NEG_INF
                )[:, None]
            o = F.scaled_dot_product_attention(
                q.view(g.b, g.q, heads, d).transpose(1, 2),
                k.view(g.b, g.k, kv_heads, d).transpose(1, 2),
                v.view(g.b, g.k, kv_heads, d).transpose(1, 2),
                attn_mask=mask,
                scale=scale,
                enable_gqa=kv_heads != heads,
            )  # [b, H, q, D]
            o = o.transpose(1, 2).reshape(g.b * g.q, heads, d).index_select(0, g.q_dst)
            out.index_copy_(0, g.tokens, o.to(query.dtype))
        return out


# ---------------------------------------------------------------------- decode without a gather
# Runs of consecutive blocks are read where they lie in the cache (``cpu_plan.block_runs`` says
# when that pays): one ``bmm`` per run, written into its rows of the scores or the output.


def _run_scores(q: Tensor, key_cache: Tensor, p: DecodePlan) -> Tensor:
    """``q . k`` ``[N, KVH, G, bs]`` with each run's keys read where they lie in a float32 cache;
    the last blocks are gathered, and masked past each sequence's end."""
    n, kv_heads, group, d = q.shape
    b, bs = p.last.shape[0], key_cache.shape[2]
    qf = q.view(n * kv_heads, group, d)
    scores = torch.empty(n * kv_heads, group, bs)
    for block, count, i in p.runs:
        kt = key_cache[block : block + count].view(count * kv_heads, bs, d).transpose(1, 2)
        rows = slice(i * kv_heads, (i + count) * kv_heads)
        torch.bmm(qf[rows], kt, out=scores[rows])
    scores = scores.view(n, kv_heads, group, bs)
    last_k = key_cache.index_select(0, p.last_blocks)  # [B, KVH, bs, D]
    q_last = q.index_select(0, p.last).view(b * kv_heads, group, d)
    last = torch.bmm(q_last, last_k.view(b * kv_heads, bs, d).transpose(1, 2))
    # only the last blocks have key positions past the end
    last = last.view(b, kv_heads, group, bs).masked_fill_(p.last_invalid.view(b, 1, 1, bs), NEG_INF)
    return scores.index_copy_(0, p.last, last)


def _run_values(probs: Tensor, value_cache: Tensor, p: DecodePlan) -> Tensor:
    """``probs @ v`` per block ``[N, KVH, G, D]``, each run's values read in place; the last
    blocks are gathered with their unwritten tails zeroed (0 * NaN would be NaN)."""
    n, kv_heads, group, bs = probs.shape
    b, d = p.last.shape[0], value_cache.shape[3]
    pf = probs.view(n * kv_heads, group, bs)
    partial = torch.empty(n * kv_heads, group, d)
    for block, count, i in p.runs:
        v = value_cache[block : block + count].view(count * kv_heads, bs, d)
        rows = slice(i * kv_heads, (i + count) * kv_heads)
        torch.bmm(pf[rows], v, out=partial[rows])
    partial = partial.view(n, kv_heads, group, d)
    last_v = value_cache.index_select(0, p.last_blocks)
    last_v.masked_fill_(p.last_invalid, 0.0)
    p_last = probs.index_select(0, p.last).view(b * kv_heads, group, bs)
    last = torch.bmm(p_last, last_v.view(b * kv_heads, bs, d)).view(b, kv_heads, group, d)
    return partial.index_copy_(0, p.last, last)


def _decode_one(
    query: Tensor, key_cache: Tensor, value_cache: Tensor, p: DecodePlan, scale: float,
    alibi_slopes: Tensor | None,
) -> Tensor:
    """Decode attention of a single sequence: its blocks gathered, one softmax over all of them.

    NOTE: at batch 1 the per-op cost, not the bytes, is what a layer's attention costs (the
    batched path's ~30 small ops per layer measured 20-60 us each between a step's linears);
    this is 11, with the same float32 math."""
    _, heads, d = query.shape
    _, kv_heads, bs, _ = key_cache.shape
    group = heads // kv_heads
    n = p.blocks.shape[0]
    k = key_cache.index_select(0, p.blocks).float()  # [n, KVH, bs, D], a copy
    v = value_cache.index_select(0, p.blocks).float()
    v[-1].masked_fill_(p.last_invalid.view(1, bs, 1), 0.0)  # unwritten slots: 0 * NaN = NaN
    q = query.float().view(1, kv_heads, group, d)
    scores = torch.matmul(q, k.transpose(2, 3))  # [n, KVH, G, bs]
    scores = scores.permute(1, 2, 0, 3).reshape(kv_heads, group, n * bs).mul_(scale)
    rel = p.rel.view(1, 1, n * bs)  # keys in order: block by block
    if alibi_slopes is not None:
        scores.add_(alibi_slopes.view(kv_heads, group, 1) * rel)
    probs = torch.softmax(scores.masked_fill_(rel > 0, NEG_INF), dim=-1)
    probs = probs.view(kv_heads, group, n, bs).permute(2, 0, 1, 3)  # [n, KVH, G, bs]
    out = torch.matmul(probs, v).sum(0)  # [KVH, G, D]
    return out.view(1, heads, d).to(query.dtype)
