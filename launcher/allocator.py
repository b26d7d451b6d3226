"""KV block allocator: TGI's ``SimpleAllocator`` (``backends/v3/src/block_allocator.rs``).

Pool = ``max_batch_total_tokens // block_size`` blocks; block 0 is reserved for the health probe,
so ids ``1..n-1`` are handed out. A request of ``tokens`` positions gets ``ceil(tokens / bs)``
blocks and one slot per position: ``slot = block * block_size + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockAllocation:
    blocks: tuple[int, ...]
    slots: tuple[int, ...]  # slots[p] holds the KV of sequence position p
    prefix_len: int = 0  # leading positions whose KV is already cached (0 here; see radix.py)


class BlockAllocator:
    def __init__(
        self, max_batch_total_tokens: int, block_size: int, window_size: int | None = None
    ):
        if block_size < 1:
            raise ValueError(f"the shard reported block_size={block_size}; it must be >= 1")
        self.block_size = block_size
        self.window_size = window_size
        self.num_blocks = max_batch_total_tokens // block_size
        # NOTE: like the Rust allocator, blocks are taken from the end of the free list.
        self._free: list[int] = list(range(1, self.num_blocks))
        self._used: set[int] = set()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (all but the reserved block 0)."""
        return max(self.num_blocks - 1, 0)

    def blocks_for(self, tokens: int) -> int:
        if self.window_size is not None:
            tokens = min(tokens, self.window_size)
        return -(-tokens // self.block_size)

    def allocate(
        self, tokens: int, prefill_tokens: list[int] | None = None
    ) -> BlockAllocation | None:
        """Blocks and slots for ``tokens`` positions, or None when the pool is short
        (``prefill_tokens`` is ignored: no prefix reuse here)."""
        required = self.blocks_for(tokens)
        if required > len(self._free):
            return None
        repeats = 1
        if self.window_size is not None:
            repeats = -(-tokens // self.window_size)
        blocks = self._free[len(self._free) - required :]
        del self._free[len(self._free) - required :]
        self._used.update(blocks)
        slots: list[int] = []
        bs = self.block_size
        for block in blocks * repeats:  # a sliding window reuses its blocks cyclically
            take = min(bs, tokens - len(slots))
            slots.extend(range(block * bs, block * bs + take))
            if len(slots) == tokens:
                break
        return BlockAllocation(blocks=tuple(blocks), slots=tuple(slots))

    def free(self, allocation: BlockAllocation, cache: bool = True) -> None:
        for block in allocation.blocks:
            assert block in self._used, f"block {block} freed twice"
            self._used.remove(block)
        self._free.extend(allocation.blocks)
