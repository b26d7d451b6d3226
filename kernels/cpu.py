"""Fast pure-PyTorch attention for the CPU: the serving path. ``reference.py`` stays the oracle.

Same protocol and semantics as the reference (cached prefixes, ALiBi, GQA/MQA, slot -1 = don't
store); what differs is how the work is laid out:

* **KV layout** ``[num_blocks, kv_heads, block_size, head_dim]``: one block of one KV head is a
  contiguous ``[block_size, head_dim]`` matrix, so gathered blocks feed ``bmm`` as they are.
* **Decode** gathers exactly the blocks each sequence holds (no padding to the longest sequence)
  and runs one ``bmm`` over ``[blocks * kv_heads]`` for the scores and one for the values.
  The softmax spans a sequence's blocks: the per-sequence max comes from a ``scatter_reduce``,
  exponentials are summed per block and added per sequence with ``index_add`` (no permutes, no
  Python loop over sequences).
* **Prefill** pads the sequences of a pass into ``[b, q, heads, D]`` and runs
  ``scaled_dot_product_attention`` with the causal + ALiBi mask. Sequences are sorted by length
  and cut into a few groups whose padding stays under ``PAD_RATIO`` (a loop over groups, not over
  sequences); a group without cached prefixes shares one ``[1, heads, q, q]`` mask.

Scores, softmax and the weighted sum run in float32 for every cache dtype, as in the reference.
The per-step index tensors depend only on the metadata: ``prepare`` builds them once per forward
pass (a decode pass's with numpy, on the host copies of the metadata), and every layer reads them
from ``meta.plan``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionMetadata, Phase, check_block_size, plan_of, with_plan
from .reference import ReferenceBackend

PAD_RATIO = 1.5  # a prefill group pads at most this many query rows per real one
NEG_INF = float("-inf")
# NOTE: torch's CPU ``exp`` takes ~80x longer per element below -87.3, where float32 ``exp``
# underflows (measured on torch 2.13, AVX512: 32k elements in [-300, 0] 1320 us, in [-87, -80]
# 15 us; flush-to-zero does not help, unlike ``softmax``). ALiBi puts far keys there (slope 0.7
# times a distance of 125 is -87). Clamping the scores' distance to the maximum at -87 first keeps
# exp on its fast path; exp(-87) = 1.6e-38 against a maximum's 1, so the sums and outputs do not
# change in float32.
EXP_FLOOR = -87.0


def _long(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


@dataclass
class _DecodePlan:
    """Index tensors of one decode pass. ``N`` = blocks held by all sequences together."""

    blocks: Tensor  # [N] int64 block ids, sequence by sequence
    seq_of: Tensor  # [N] int64 sequence of each block
    rel: Tensor  # [N, 1, 1, bs] float32 key position - query position (<= 0 where valid)
    last: Tensor  # [B] int64 index (into N) of each sequence's last block
    last_invalid: Tensor  # [B, 1, bs, 1] bool, unwritten tail of that last block
    # Runs of consecutive cache blocks among the blocks before each sequence's last one, as
    # (first cache block, blocks, first index into N): read in place, without a gather. None when
    # the blocks are too scattered for that to pay (see ``_runs``).
    runs: list[tuple[int, int, int]] | None


@dataclass
class _BlockLayout:
    """The part of a decode plan fixed by the block table and the blocks each sequence holds."""

    table: Tensor  # the block table it was built from (the same object while a batch decodes)
    counts: np.ndarray  # [B] blocks each sequence holds
    bs: int
    blocks: Tensor  # [N] int64
    seq_of: Tensor  # [N] int64
    seq_of_np: np.ndarray
    key_pos: np.ndarray  # [N, bs] float32 position of each key slot
    last: Tensor  # [B] int64
    last_np: np.ndarray
    runs: list[tuple[int, int, int]] | None

    @staticmethod
    def build(block_tables: Tensor, counts: np.ndarray, bs: int) -> _BlockLayout:
        table = block_tables.numpy()
        held = np.arange(table.shape[1]) < counts[:, None]  # [B, max_blocks]
        seq_of, index = np.nonzero(held)  # sequence by sequence, block index in its sequence
        blocks = table[held].astype(np.int64)
        key_pos = (index * bs)[:, None] + np.arange(bs)
        last = np.cumsum(counts) - 1
        return _BlockLayout(
            table=block_tables, counts=counts, bs=bs,
            blocks=torch.from_numpy(blocks), seq_of=torch.from_numpy(seq_of), seq_of_np=seq_of,
            key_pos=key_pos.astype(np.float32), last=torch.from_numpy(last), last_np=last,
            runs=_runs(blocks, seq_of, last),
        )


@dataclass
class _CpuPlan:
    attention: _DecodePlan | list[_PrefillGroup]
    # Where ``store_kv`` writes, the same for every layer: the tokens with a slot (None: all, no
    # slot is -1) and each one's cache block and offset in it.
    keep: Tensor | None  # [T] bool
    store_blocks: Tensor  # [T'] int64
    store_offsets: Tensor  # [T'] int64


@dataclass
class _PrefillGroup:
    """Sequences of a prefill pass padded together: ``b`` rows of ``q`` queries, ``k`` keys."""

    b: int
    q: int
    k: int
    tokens: Tensor  # [n] int64 this group's tokens in the pass (in pass order)
    q_dst: Tensor  # [n] int64 row of each token in the padded [b * q] queries
    # The pass's token behind each padded query row / key row. Padding rows (and prefix rows,
    # overwritten from the cache) repeat their sequence's first token: finite values whose
    # outputs are dropped (queries) or whose keys are masked (keys), so one gather builds each
    # padded tensor, with no zero fill and no scatter.
    q_src: Tensor  # [b * q] int64
    k_src: Tensor  # [b * k] int64
    rel: Tensor  # [b or 1, q, k] float32 key position - query position
    allowed: Tensor  # [b or 1, q, k] bool, causal (and within the prefix + chunk)
    # keys of cached prefixes (empty when no sequence of the group has one)
    prefix_dst: Tensor  # [p] int64 row in the padded keys
    prefix_block: Tensor  # [p] int64 cache block
    prefix_offset: Tensor  # [p] int64 offset in that block


class CpuBackend(ReferenceBackend):
    """The attention protocol (``kernels/base.py``) for CPU serving; pointwise kernels
    (RMSNorm, rotary) and the block size are the reference's."""

    name = "cpu"

    def __init__(self) -> None:
        super().__init__()
        self._layout: _BlockLayout | None = None  # the last decode pass's (see _decode_plan)

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        check_block_size(block_size)
        return (num_blocks, num_kv_heads, block_size, head_dim)

    # ------------------------------------------------------------------ per-step plan
    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The pass's index plan: decode blocks for a DECODE pass, padded groups otherwise."""
        if meta.phase is Phase.DECODE:
            attention: _DecodePlan | list[_PrefillGroup] = self._decode_plan(meta, meta.block_size)
        else:
            attention = self._prefill_plan(meta)
        slots = meta.slot_mapping.numpy()
        keep = None if slots.min(initial=0) >= 0 else slots >= 0
        blocks, offsets = np.divmod(slots if keep is None else slots[keep], meta.block_size)
        return with_plan(meta, _CpuPlan(
            attention,
            keep=None if keep is None else torch.from_numpy(keep),
            store_blocks=torch.from_numpy(blocks),
            store_offsets=torch.from_numpy(offsets),
        ))

    def _decode_plan(self, meta: AttentionMetadata, bs: int) -> _DecodePlan:
        # NOTE: built with numpy on host arrays (this backend's tensors are host memory): a
        # few dozen ops on [blocks]-sized index arrays cost ~1 us each in numpy and ~5-10 us as
        # torch ops, and this runs on every decode step (benchmarks/bench_host.py's host
        # time per step). Only the positions change from one step to the next; which blocks each
        # sequence reads (the layout) changes when one enters a new block (every ``bs`` steps)
        # or the batch changes, so the last layout is kept and reused while it still holds.
        host = meta.seq_lens_host  # the runner's host copy (a decode step's), else the list
        seq_lens = host.numpy() if host is not None else np.array(meta.seq_lens_list)
        counts = (seq_lens + (bs - 1)) // bs  # blocks per sequence
        layout = self._layout
        if (
            layout is None
            or layout.table is not meta.block_tables
            or layout.bs != bs
            or not np.array_equal(layout.counts, counts)
        ):
            layout = self._layout = _BlockLayout.build(meta.block_tables, counts, bs)
        # key position - query position, [N, bs]
        rel = layout.key_pos - (seq_lens - 1).astype(np.float32)[layout.seq_of_np][:, None]
        return _DecodePlan(
            blocks=layout.blocks,
            seq_of=layout.seq_of,
            rel=torch.from_numpy(rel).view(-1, 1, 1, bs),
            last=layout.last,
            last_invalid=torch.from_numpy(rel[layout.last_np] > 0).view(-1, 1, bs, 1),
            runs=layout.runs,
        )

    @staticmethod
    def _prefill_plan(meta: AttentionMetadata) -> list[_PrefillGroup]:
        device = meta.slot_mapping.device
        bs = meta.block_size
        qlens, ctxs = meta.query_lens_list, meta.context_lens_list
        starts = meta.cu_seqlens_q_list
        order = sorted(range(len(qlens)), key=lambda i: -qlens[i])
        groups: list[list[int]] = []
        real = 0  # query tokens in the last group
        for i in order:  # longest first: a group's first sequence sets its padded length
            g = groups[-1] if groups else None
            if g and (len(g) + 1) * qlens[g[0]] <= PAD_RATIO * (real + qlens[i]):
                g.append(i)
                real += qlens[i]
            else:
                groups.append([i])
                real = qlens[i]
        plan = []
        for g in groups:
            q = max(qlens[i] for i in g)
            k = max(ctxs[i] + qlens[i] for i in g)
            tokens, q_dst, q_src, k_src = [], [], [], []
            prefix_dst, prefix_seq, prefix_pos = [], [], []
            for row, i in enumerate(g):
                n, c, first = qlens[i], ctxs[i], starts[i]
                own = range(first, first + n)
                tokens += own
                q_dst += range(row * q, row * q + n)
                q_src += [*own, *[first] * (q - n)]
                k_src += [*[first] * c, *own, *[first] * (k - c - n)]
                prefix_dst += range(row * k, row * k + c)
                prefix_seq += [i] * c
                prefix_pos += range(c)
            has_prefix = any(ctxs[i] for i in g)
            q_pos = torch.arange(q, device=device)
            k_pos = torch.arange(k, device=device)
            if has_prefix:  # row r's queries sit at positions ctx_r + 0, 1, ...
                ctx = torch.tensor([ctxs[i] for i in g], device=device)
                rel = k_pos[None, None, :] - (ctx[:, None, None] + q_pos[None, :, None])
            else:  # every row starts at position 0: one mask for the whole group
                rel = (k_pos[None, :] - q_pos[:, None])[None]
            pos, seqs = _long(prefix_pos, device), _long(prefix_seq, device)
            plan.append(
                _PrefillGroup(
                    b=len(g),
                    q=q,
                    k=k,
                    tokens=_long(tokens, device),
                    q_dst=_long(q_dst, device),
                    q_src=_long(q_src, device),
                    k_src=_long(k_src, device),
                    rel=rel.float(),
                    allowed=rel <= 0,
                    prefix_dst=_long(prefix_dst, device),
                    prefix_block=meta.block_tables[seqs, pos // bs].long(),
                    prefix_offset=pos % bs,
                )
            )
        return plan

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
        p: _CpuPlan = plan_of(meta, self.name)
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
        b, heads, d = query.shape
        _, kv_heads, bs, _ = key_cache.shape
        group = heads // kv_heads
        p: _DecodePlan = plan_of(meta, self.name).attention
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
        groups: list[_PrefillGroup] = plan_of(meta, self.name).attention
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
# NOTE: measured on the 2-core CPU this project benchmarks on (BLOOM-560m shape, float32, 32
# sequences of 16-224 tokens): gathering every block a decode step reads copies the whole K/V
# working set once more per layer. Reading runs of consecutive blocks where they lie in the cache
# (one ``bmm`` per run, written into its rows of the scores) saves that copy; a run costs two
# kernel calls per layer, so the blocks must come in runs of 2 or more on average for it to pay.
MIN_MEAN_RUN = 2


def _runs(blocks: np.ndarray, seq_of: np.ndarray, last: np.ndarray) -> list[tuple[int, int, int]] | None:
    """Runs of consecutive cache block ids within each sequence, over every block but the
    sequences' last ones (those may hold stale values past the sequence's end and are gathered
    and cleaned instead); ``None`` when the runs are too short to pay."""
    n = len(blocks)
    full = np.ones(n, dtype=bool)
    full[last] = False
    count = n - len(last)  # each sequence has one last block
    if count == 0:
        return None
    joins = np.zeros(n, dtype=bool)  # block i continues block i - 1's run
    joins[1:] = (blocks[1:] == blocks[:-1] + 1) & (seq_of[1:] == seq_of[:-1])
    start = full & ~joins
    firsts = np.flatnonzero(start)
    if len(firsts) * MIN_MEAN_RUN > count:
        return None
    run_of = np.cumsum(start) - 1
    lengths = np.bincount(run_of[full], minlength=len(firsts))
    return list(zip(blocks[firsts].tolist(), lengths.tolist(), firsts.tolist()))


def _run_scores(q: Tensor, key_cache: Tensor, p: _DecodePlan) -> Tensor:
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
    last_k = key_cache.index_select(0, p.blocks.index_select(0, p.last))  # [B, KVH, bs, D]
    q_last = q.index_select(0, p.last).view(b * kv_heads, group, d)
    last = torch.bmm(q_last, last_k.view(b * kv_heads, bs, d).transpose(1, 2))
    # only the last blocks have key positions past the end
    last = last.view(b, kv_heads, group, bs).masked_fill_(p.last_invalid.view(b, 1, 1, bs), NEG_INF)
    return scores.index_copy_(0, p.last, last)


def _run_values(probs: Tensor, value_cache: Tensor, p: _DecodePlan) -> Tensor:
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
    last_v = value_cache.index_select(0, p.blocks.index_select(0, p.last))
    last_v.masked_fill_(p.last_invalid, 0.0)
    p_last = probs.index_select(0, p.last).view(b * kv_heads, group, bs)
    last = torch.bmm(p_last, last_v.view(b * kv_heads, bs, d)).view(b, kv_heads, group, d)
    return partial.index_copy_(0, p.last, last)


def _decode_one(
    query: Tensor, key_cache: Tensor, value_cache: Tensor, p: _DecodePlan, scale: float,
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
