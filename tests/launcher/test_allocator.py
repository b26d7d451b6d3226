from __future__ import annotations

import pytest
from tgi_npu_backend.launcher.allocator import BlockAllocator


def test_block_zero_reserved_and_slots_follow_blocks():
    alloc = BlockAllocator(max_batch_total_tokens=64, block_size=16)  # 4 blocks: 1..3 usable
    assert alloc.capacity == 3 and alloc.free_blocks == 3
    a = alloc.allocate(20)  # input + max_new - 1 = 20 positions -> 2 blocks
    assert a is not None and 0 not in a.blocks and len(a.blocks) == 2
    assert len(a.slots) == 20
    expected = [b * 16 + o for b in a.blocks for o in range(16)][:20]
    assert list(a.slots) == expected
    assert alloc.allocate(17) is None  # 2 blocks needed, 1 left
    alloc.free(a)
    assert alloc.free_blocks == 3


def test_blocks_are_never_shared_until_freed():
    alloc = BlockAllocator(max_batch_total_tokens=16 * 9, block_size=16)
    taken = [alloc.allocate(16) for _ in range(8)]
    assert alloc.allocate(1) is None
    blocks = [b for a in taken for b in a.blocks]
    assert sorted(blocks) == list(range(1, 9))
    alloc.free(taken[3])
    with pytest.raises(AssertionError, match="freed twice"):
        alloc.free(taken[3])
    again = alloc.allocate(10)
    assert again.blocks == taken[3].blocks


def test_window_reuses_blocks_cyclically():
    alloc = BlockAllocator(max_batch_total_tokens=16 * 4, block_size=4, window_size=8)
    a = alloc.allocate(20)
    assert len(a.blocks) == 2 and len(a.slots) == 20
    assert a.slots[:8] == a.slots[8:16]


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block_size=0"):
        BlockAllocator(100, 0)
