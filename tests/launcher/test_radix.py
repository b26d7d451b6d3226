"""RadixAllocator (TGI radix.rs semantics) against an independent account of its blocks."""

from __future__ import annotations

import random

from tgi_npu_backend.launcher.radix import RadixAllocator

BS = 4


def check_slots(a, tokens: int) -> None:
    assert len(a.slots) == tokens
    assert list(a.slots) == [b * BS + o for b in a.blocks for o in range(BS)][:tokens]


def test_reuse_after_free_is_block_aligned_and_refcounted():
    alloc = RadixAllocator(BS * 16, BS)  # blocks 1..15
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks + 2
    a = alloc.allocate(10 + 5 - 1, prompt)
    assert a.prefix_len == 0 and 0 not in a.blocks
    check_slots(a, 14)
    a2 = alloc.allocate(14, prompt)
    assert a2.prefix_len == 0  # nothing is cached until a request ends
    alloc.free(a2, cache=False)
    alloc.free(a)
    assert alloc.cached_blocks == 2  # the prompt's full blocks, not its tail or generated part
    b = alloc.allocate(12 + 3, prompt[:9] + [7, 7, 7])  # shares the first two blocks
    c = alloc.allocate(10 + 3, prompt[:4] + [9] * 6)  # shares only the first
    assert b.prefix_len == 8 and b.blocks[:2] == a.blocks[:2]
    assert c.prefix_len == 4 and c.blocks[:1] == a.blocks[:1]
    check_slots(b, 15)
    check_slots(c, 13)
    assert not set(b.blocks[2:]) & set(c.blocks[1:])
    # referenced prefix blocks are never evicted, even when the pool runs dry
    rest = alloc.free_blocks
    assert alloc.allocate(BS * (rest + 1)) is None
    d = alloc.allocate(BS * rest)
    assert d is not None and not set(d.blocks) & (set(b.blocks) | set(c.blocks))
    for x in (b, c, d):
        alloc.free(x)
    assert alloc.free_blocks + alloc.cached_blocks == alloc.capacity


def test_duplicates_are_freed_and_whole_prompt_match():
    alloc = RadixAllocator(BS * 16, BS)
    prompt = list(range(8))  # exactly 2 blocks
    a, b = alloc.allocate(8 + 3, prompt), alloc.allocate(8 + 3, prompt)  # concurrent, no hit
    assert a.prefix_len == b.prefix_len == 0
    alloc.free(a)
    alloc.free(b)  # its prompt blocks duplicate a's: back to the free list
    assert alloc.cached_blocks == 2 and alloc.free_blocks == 13
    c = alloc.allocate(8 + 3, prompt)
    # the whole prompt matched: prefix_len == input_length (the queue lowers it by one)
    assert c.prefix_len == 8 and c.blocks[:2] == a.blocks[:2] and len(c.blocks) == 3
    alloc.free(c)
    assert alloc.free_blocks + alloc.cached_blocks == alloc.capacity


def test_no_token_ids_no_reuse_and_nothing_cached():
    alloc = RadixAllocator(BS * 8, BS)
    a = alloc.allocate(12, None)
    alloc.free(a)
    assert alloc.cached_blocks == 0 and alloc.free_blocks == alloc.capacity
    b = alloc.allocate(12, list(range(12)))
    alloc.free(b, cache=False)  # its prefill never ran
    assert alloc.cached_blocks == 0 and alloc.allocate(12, list(range(12))).prefix_len == 0


def test_eviction_is_lru_over_unreferenced_leaves():
    alloc = RadixAllocator(BS * 7, BS)  # 6 usable blocks
    p1, p2 = [1] * 8, [2] * 8
    for p in (p1, p2):
        alloc.free(alloc.allocate(8, p))
    assert alloc.cached_blocks == 4 and alloc.free_blocks == 2
    alloc.free(alloc.allocate(8, p1[:4]))  # touches p1's first block only: p1's leaf is older
    # 3 blocks needed, 2 free: the least recently used leaf goes (p1's second block)
    x = alloc.allocate(12)
    assert alloc.cached_blocks == 3
    assert alloc.allocate(4, p1).prefix_len == 4 and alloc.allocate(4, p2).prefix_len == 8
    alloc.free(x)


def test_pressure_random_capacity_returns_to_full():
    rng = random.Random(0)
    alloc = RadixAllocator(BS * 20, BS)
    system = [5] * 12
    live = []
    for step in range(400):
        if live and (rng.random() < 0.5 or alloc.free_blocks < 3):
            a, prompt = live.pop(rng.randrange(len(live)))
            alloc.free(a)
            continue
        tail = [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
        prompt = (system if rng.random() < 0.7 else []) + tail
        tokens = len(prompt) + rng.randrange(1, 6) - 1
        a = alloc.allocate(tokens, prompt if rng.random() < 0.9 else None)
        if a is None:
            continue
        check_slots(a, tokens)
        assert 0 not in a.blocks and a.prefix_len % BS == 0 and a.prefix_len <= len(prompt)
        held = {b for x, _ in live for b in x.blocks[x.prefix_len // BS :]}
        assert not held & set(a.blocks[a.prefix_len // BS :]), "a block handed out twice"
        live.append((a, prompt))
    for a, _ in live:
        alloc.free(a)
    assert alloc.free_blocks + alloc.cached_blocks == alloc.capacity
    everything = alloc.allocate(alloc.capacity * BS)  # evicts the whole trie
    assert everything is not None and sorted(everything.blocks) == list(range(1, 20))
