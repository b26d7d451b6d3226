"""The CPU attention backend's per-pass plan (``CpuBackend.prepare``): the index tensors every
layer of one forward pass reads, built once from the metadata on the host.

* **Decode**: which cache blocks each sequence reads, in one flat list (``DecodePlan``), with the
  ALiBi distances and the mask of each sequence's last block; runs of consecutive blocks, read
  in place by ``device_kernels/cpu.py``. The block layout depends only on the block table and on how
  many blocks each sequence holds, so it is kept from pass to pass while those hold.
* **Prefill**: sequences sorted by length and cut into padded groups (``PrefillGroup``).
* **Store**: each token's cache block and offset, the same for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .base import AttentionMetadata, Phase

# A prefill group pads at most this many query rows per real one.
# NOTE: attention's work grows with the square of a group's padded length, so the padding a
# linear ratio admits costs more than it says, and fewer, fuller groups save less than that: a
# ``scaled_dot_product_attention`` call and a few gathers per group. Measured in one process, a
# whole prefill pass of BLOOM-560m's shape, ratios alternated: 32 prompts of 16-192 tokens 6.33 s
# at 1.5 against 6.13 s at 1.1 and 6.09 s at 1.05 (3 against 10 and 17 groups; medians of 6 and
# 4); 8 prompts of 200-700 tokens 8.58 against 7.94 s; 32 prompts of 4-24 tokens 0.98 s at both.
PAD_RATIO = 1.1


def _long(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


@dataclass
class DecodePlan:
    """Index tensors of one decode pass. ``N`` = blocks held by all sequences together."""

    blocks: Tensor  # [N] int64 block ids, sequence by sequence
    seq_of: Tensor  # [N] int64 sequence of each block
    rel: Tensor  # [N, 1, 1, bs] float32 key position - query position (<= 0 where valid)
    last: Tensor  # [B] int64 index (into N) of each sequence's last block
    last_blocks: Tensor  # [B] int64 cache block of each sequence's last block (blocks[last])
    last_invalid: Tensor  # [B, 1, bs, 1] bool, unwritten tail of that last block
    # Runs of consecutive cache blocks among the blocks before each sequence's last one, as
    # (first cache block, blocks, first index into N): read in place, without a gather. None when
    # the blocks are too scattered for that to pay (see ``block_runs``).
    runs: list[tuple[int, int, int]] | None


@dataclass
class BlockLayout:
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
    last_blocks: Tensor  # [B] int64
    runs: list[tuple[int, int, int]] | None

    @staticmethod
    def build(block_tables: Tensor, counts: np.ndarray, bs: int) -> BlockLayout:
        table = block_tables.numpy()
        held = np.arange(table.shape[1]) < counts[:, None]  # [B, max_blocks]
        seq_of, index = np.nonzero(held)  # sequence by sequence, block index in its sequence
        blocks = table[held].astype(np.int64)
        key_pos = (index * bs)[:, None] + np.arange(bs)
        last = np.cumsum(counts) - 1
        return BlockLayout(
            table=block_tables, counts=counts, bs=bs,
            blocks=torch.from_numpy(blocks), seq_of=torch.from_numpy(seq_of), seq_of_np=seq_of,
            key_pos=key_pos.astype(np.float32), last=torch.from_numpy(last), last_np=last,
            last_blocks=torch.from_numpy(blocks[last]),
            runs=block_runs(blocks, seq_of, last),
        )


@dataclass
class CpuPlan:
    # a decode pass's DecodePlan (None until the PyTorch decode asks for it), or prefill groups
    attention: DecodePlan | list[PrefillGroup] | None
    # Where ``store_kv`` writes, the same for every layer: the tokens with a slot (None: all, no
    # slot is -1) and each one's cache block and offset in it.
    keep: Tensor | None  # [T] bool
    store_blocks: Tensor  # [T'] int64
    store_offsets: Tensor  # [T'] int64


@dataclass
class PrefillGroup:
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


def build_plan(
    meta: AttentionMetadata, layout: BlockLayout | None, decode: bool = True
) -> tuple[CpuPlan, BlockLayout | None]:
    """The pass's plan: decode blocks for a DECODE pass (unless ``decode`` is False: then None,
    for the backend to build if it needs them), padded groups otherwise; with the block layout to
    keep for the next decode pass (``layout``, the last one, or a new one)."""
    attention: DecodePlan | list[PrefillGroup] | None = None
    if meta.phase is Phase.DECODE:
        if decode:
            attention, layout = decode_plan(meta, meta.block_size, layout)
    else:
        attention = prefill_plan(meta)
    slots = meta.slot_mapping.numpy()
    keep = None if slots.min(initial=0) >= 0 else slots >= 0
    blocks, offsets = np.divmod(slots if keep is None else slots[keep], meta.block_size)
    return CpuPlan(
        attention,
        keep=None if keep is None else torch.from_numpy(keep),
        store_blocks=torch.from_numpy(blocks),
        store_offsets=torch.from_numpy(offsets),
    ), layout


def decode_plan(
    meta: AttentionMetadata, bs: int, layout: BlockLayout | None
) -> tuple[DecodePlan, BlockLayout]:
    """A decode pass's plan, reusing ``layout`` (the last pass's) when it still holds; returns
    the plan and the layout it used."""
    # NOTE: built with numpy on host arrays (this backend's tensors are host memory): a
    # few dozen ops on [blocks]-sized index arrays cost ~1 us each in numpy and ~5-10 us as
    # torch ops, and this runs on every decode step (benchmarks/bench_host.py's host
    # time per step). Only the positions change from one step to the next; which blocks each
    # sequence reads (the layout) changes when one enters a new block (every ``bs`` steps)
    # or the batch changes, so the last layout is kept and reused while it still holds.
    host = meta.seq_lens_host  # the runner's host copy (a decode step's), else the list
    seq_lens = host.numpy() if host is not None else np.array(meta.seq_lens_list)
    counts = (seq_lens + (bs - 1)) // bs  # blocks per sequence
    if (
        layout is None
        or layout.table is not meta.block_tables
        or layout.bs != bs
        or not np.array_equal(layout.counts, counts)
    ):
        layout = BlockLayout.build(meta.block_tables, counts, bs)
    # key position - query position, [N, bs]
    rel = layout.key_pos - (seq_lens - 1).astype(np.float32)[layout.seq_of_np][:, None]
    plan = DecodePlan(
        blocks=layout.blocks,
        seq_of=layout.seq_of,
        rel=torch.from_numpy(rel).view(-1, 1, 1, bs),
        last=layout.last,
        last_blocks=layout.last_blocks,
        last_invalid=torch.from_numpy(rel[layout.last_np] > 0).view(-1, 1, bs, 1),
        runs=layout.runs,
    )
    return plan, layout


def prefill_plan(meta: AttentionMetadata) -> list[PrefillGroup]:
    """A pass with prompt tokens: its sequences sorted by length and cut into padded groups."""
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
            PrefillGroup(
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


# ---------------------------------------------------------------------- decode without a gather
# NOTE: measured on the 2-core CPU this project benchmarks on (BLOOM-560m shape, float32, 32
# sequences of 16-224 tokens): gathering every block a decode step reads copies the whole K/V
# working set once more per layer. Reading runs of consecutive blocks where they lie in the cache
# (one ``bmm`` per run, written into its rows of the scores) saves that copy; a run costs two
# kernel calls per layer, so the blocks must come in runs of 2 or more on average for it to pay.
MIN_MEAN_RUN = 2


def block_runs(blocks: np.ndarray, seq_of: np.ndarray, last: np.ndarray) -> list[tuple[int, int, int]] | None:
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
