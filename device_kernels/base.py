"""The attention-backend protocol: the one seam between the model and the device kernels.

A backend owns the layout of the paged KV cache and implements:

* ``prepare``: once per forward pass, before the first layer, turn the runner's metadata into
  the backend's own step inputs (index plans, host length lists, int32 tables; masks it builds
  lazily), returned in ``meta.plan``; nothing about a step is kept inside the backend,
* ``store_kv``: write the K/V of the tokens of this forward pass into their slots,
* ``prefill``: attention of (possibly several, ragged) query chunks, each query attending
  to its own sequence's cached prefix plus the causal part of its chunk: a prefill pass, and a
  mixed pass (prompt chunks next to single decode tokens, chunked prefill) alike,
* ``decode``: one query token per sequence attending to everything in its paged cache.

A pass has a ``Phase``: PREFILL (prompt chunks only), DECODE (one token per sequence, all
decoding) or MIXED (both); the model calls ``decode`` for DECODE and ``prefill`` otherwise.

Slots follow TGI: ``slot = block * block_size + offset``; position ``p`` of a sequence is
stored in ``slots[p]``. ALiBi (BLOOM) is passed as per-head slopes so that a backend may build
its own bias or mask (the NPU ATB ops take a mask, the aclnn ops a ``pse_shift``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

# NOTE: torch_npu paged-attention ops need block_size % 16 == 0 and block_size <= 128
# (shared/npu/NPU_NOTES.md 3.2); the reference backend follows the same rule so that a
# configuration tested on CPU is valid on NPU.
MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 128


def check_block_size(block_size: int) -> None:
    if block_size % MIN_BLOCK_SIZE != 0 or not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE):
        raise ValueError(
            f"block size {block_size} is not supported: it must be a multiple of "
            f"{MIN_BLOCK_SIZE} between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )


class Phase(enum.Enum):
    """What a forward pass computes."""

    PREFILL = "prefill"  # prompt chunks only
    DECODE = "decode"  # one token per sequence, every sequence decoding
    MIXED = "mixed"  # prompt chunks and decode tokens in one pass (chunked prefill)


@dataclass
class AttentionMetadata:
    """Everything the kernels need about one forward pass, built once per step.

    ``T`` = number of tokens in the pass, ``B`` = number of sequences.
    Sequence ``i`` contributes ``query_lens[i] = seq_lens[i] - context_lens[i]`` tokens (its
    positions ``context_lens[i] .. seq_lens[i]-1``); in a DECODE pass every sequence contributes
    exactly one token (``T == B``).
    """

    phase: Phase
    slot_mapping: Tensor  # [T] int64, KV slot of every token of this pass
    block_tables: Tensor  # [B, max_blocks] int32, block ids per sequence (padded with 0)
    seq_lens: Tensor  # [B] int32, tokens in the cache for each sequence after this pass
    context_lens: Tensor  # [B] int32, tokens already cached before this pass (prefix)
    cu_seqlens_q: Tensor  # [B + 1] int32, cumulative query lengths (token offsets in the pass)
    max_seqlen_q: int
    max_seqlen_k: int
    block_size: int
    # Host copies: NPU ops take lengths as host lists/tensors; keeping them avoids a device sync.
    seq_lens_list: list[int]
    context_lens_list: list[int]
    query_lens_list: list[int]
    # ``seq_lens_list`` as a host int32 tensor, when the runner made one anyway (a decode step
    # builds its lengths on the host before copying them): the NPU ops' host lengths
    seq_lens_host: Tensor | None = None
    # Prefill only: when two tokens of the pass map to one slot (two identical prompts whose
    # blocks the prefix cache shares, each recomputing the last position), the rows to store:
    # the first token of each slot. None when every slot is distinct (always in decode).
    store_rows: list[int] | None = None
    # The backend's step inputs, from ``AttentionBackend.prepare`` (None before it ran)
    plan: Any = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def cu_seqlens_q_list(self) -> list[int]:
        """Host copy of ``cu_seqlens_q``: token offset of each sequence in the pass, then T."""
        cu = [0]
        for q in self.query_lens_list:
            cu.append(cu[-1] + q)
        return cu

    @property
    def has_prefix(self) -> bool:
        """True when some sequence attends to KV that this pass did not compute."""
        return any(c > 0 for c in self.context_lens_list)

    @classmethod
    def build(
        cls,
        *,
        phase: Phase,
        slot_mapping: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
        query_lens: list[int],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """Build metadata from host lists (one entry per sequence)."""
        seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
        table = torch.from_numpy(padded_block_table(block_tables))
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        to_device = host_to_device(device)
        return cls(
            phase=phase,
            slot_mapping=to_device(torch.tensor(slot_mapping, dtype=torch.int64)),
            block_tables=to_device(table),
            seq_lens=to_device(torch.tensor(seq_lens, dtype=torch.int32)),
            context_lens=to_device(torch.tensor(context_lens, dtype=torch.int32)),
            cu_seqlens_q=to_device(torch.tensor(cu, dtype=torch.int32)),
            max_seqlen_q=max(query_lens, default=0),
            max_seqlen_k=max(seq_lens, default=0),
            block_size=block_size,
            seq_lens_list=seq_lens,
            context_lens_list=list(context_lens),
            query_lens_list=list(query_lens),
            store_rows=None if phase is Phase.DECODE else _first_of_each_slot(slot_mapping),
        )


def padded_block_table(block_tables: list[list[int]]) -> np.ndarray:
    """``[B, max_blocks]`` int32 on the host, each row's block ids padded with 0 (at least one
    column)."""
    max_blocks = max((len(b) for b in block_tables), default=0)
    table = np.zeros((len(block_tables), max(max_blocks, 1)), dtype=np.int32)
    for i, blocks in enumerate(block_tables):
        table[i, : len(blocks)] = blocks
    return table


def _first_of_each_slot(slots: list[int]) -> list[int] | None:
    if len(set(slots)) == len(slots):
        return None
    seen: set[int] = set()
    rows = []
    for i, s in enumerate(slots):
        if s not in seen:
            seen.add(s)
            rows.append(i)
    return rows


def host_to_device(device: torch.device):
    """Host tensor -> ``device``. On an accelerator the copy goes from pinned memory and does not
    block the host (the step's kernels queue behind it on the same stream); on CPU it is a no-op."""
    if device.type == "cpu":
        return lambda t: t
    return lambda t: t.pin_memory().to(device, non_blocking=True)


@runtime_checkable
class AttentionBackend(Protocol):
    """Device attention kernels over a paged KV cache (see module docstring)."""

    name: str

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Once per forward pass: ``meta`` with this backend's step inputs in ``plan``."""
        ...

    def block_size_for(self, head_dim: int) -> int:
        """The KV block size this backend serves best for ``head_dim`` (``--block-size`` wins)."""
        ...

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of ONE of the K or V cache tensors of one layer."""
        ...

    def allocate_kv_cache(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[Tensor, Tensor]:
        """Zero-initialised (key_cache, value_cache) for one layer."""
        ...

    def store_kv(
        self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, meta: AttentionMetadata
    ) -> None:
        """Write ``key``/``value`` ``[T, kv_heads, head_dim]`` into ``meta.slot_mapping``."""
        ...

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
        """Causal attention for the prompt chunks of a prefill pass.

        query ``[T, heads, head_dim]``, key/value ``[T, kv_heads, head_dim]`` (this pass's
        tokens, already stored with ``store_kv``); returns ``[T, heads, head_dim]``. A sequence
        with ``context_lens[i] > 0`` also attends to its cached positions ``0..context_lens[i]-1``.
        ``alibi_slopes`` ``[heads]`` (float32) adds ``slope * (key_pos - query_pos)`` to scores.
        """
        ...

    def decode(
        self,
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        alibi_slopes: Tensor | None,
    ) -> Tensor:
        """One query per sequence ``[B, heads, head_dim]`` over its paged cache; returns the same shape."""
        ...

    # --- fused pointwise kernels next to attention (Gemma's RMSNorm and rotary) ----------------

    def rms_norm(self, x: Tensor, gamma: Tensor, eps: float) -> Tensor:
        """``x * rsqrt(mean(x^2) + eps) * gamma`` over the last dim, computed in float32 and cast to
        ``x``'s dtype. ``gamma`` is float32 (Gemma passes ``1 + weight``)."""
        ...

    def add_rms_norm(
        self, x: Tensor, residual: Tensor, gamma: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        """``s = x + residual`` (in ``x``'s dtype), then ``(rms_norm(s), s)``."""
        ...

    def rotary(
        self, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Neox ("rotate half") rotary: query ``[T, H, D]``, key ``[T, KVH, D]``, cos/sin
        ``[T, 1, D]`` in the activation dtype; returns the rotated pair."""
        ...


def with_plan(meta: AttentionMetadata, plan: Any) -> AttentionMetadata:
    """``meta`` carrying ``plan`` (a new object: the runner's metadata is left as it was)."""
    # NOTE: a shallow copy of the fields, not ``dataclasses.replace`` or ``copy.copy`` (both go
    # through introspection, ~20x slower; this runs on every forward pass).
    prepared = object.__new__(AttentionMetadata)
    prepared.__dict__.update(meta.__dict__)
    prepared.plan = plan
    return prepared


def plan_of(meta: AttentionMetadata, backend: str) -> Any:
    if meta.plan is None:
        raise RuntimeError(
            f"the {backend} attention backend got metadata without a plan: call "
            "backend.prepare(meta) once per forward pass and pass its result to every layer"
        )
    return meta.plan
