"""KV block allocator with prefix reuse: TGI's ``RadixAllocator`` (``backends/v3/src/radix.rs``).

Blocks that held a finished request's *prompt* stay in a trie keyed by block-aligned runs of
prompt token ids (one trie node per full block). A later request whose prompt starts with the same
runs reuses those blocks (refcounted) and tells the shard, through ``Request.cache_len``, that
their KV is already there. Blocks no request references are evicted least-recently-used first,
leaves before their parents, when the free list runs short. Block 0 is never handed out.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from .allocator import BlockAllocation


@dataclass(frozen=True)
class RadixAllocation(BlockAllocation):
    allocation_id: int = -1  # the allocator's record of what to do on free


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...]  # the block_size token ids this block holds
    block: int
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    ref_count: int = 0  # live allocations whose matched prefix runs through this node
    last_access: int = 0
    alive: bool = True


@dataclass
class _Record:
    nodes: list[_Node]  # the matched (reused) prefix, root excluded
    prefill_tokens: tuple[int, ...] | None


class RadixAllocator:
    def __init__(self, max_batch_total_tokens: int, block_size: int):
        if block_size < 1:
            raise ValueError(f"the shard reported block_size={block_size}; it must be >= 1")
        self.block_size = block_size
        self.num_blocks = max_batch_total_tokens // block_size
        self._free: list[int] = list(range(1, self.num_blocks))  # block 0: health probe
        self._root = _Node(key=(), block=-1, parent=None)
        self._cached = 0  # blocks held by the trie
        self._time = 0
        # (last_access, seq, node) of unreferenced leaves; stale entries are skipped when popped
        self._lru: list[tuple[int, int, _Node]] = []
        self._seq = itertools.count()
        self._records: dict[int, _Record] = {}
        self._ids = itertools.count()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def cached_blocks(self) -> int:
        """Blocks the trie holds (reusable prefixes; evictable once no request references them)."""
        return self._cached

    @property
    def capacity(self) -> int:
        return max(self.num_blocks - 1, 0)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------ allocate / free
    def allocate(
        self, tokens: int, prefill_tokens: list[int] | tuple[int, ...] | None = None
    ) -> RadixAllocation | None:
        """Blocks for ``tokens`` positions, reusing the longest cached block-aligned prefix of
        ``prefill_tokens`` (None: no reuse, and nothing is cached on free). None when short."""
        self._time += 1
        nodes = self._match(prefill_tokens) if prefill_tokens else []
        for node in nodes:  # referenced before evicting, so the match itself is never evicted
            node.ref_count += 1
        prefix_len = len(nodes) * self.block_size
        needed = self.blocks_for(tokens - prefix_len)
        if needed > len(self._free):
            self._evict(needed - len(self._free))
        if needed > len(self._free):
            for node in nodes:
                self._decref(node)
            return None
        new = self._free[len(self._free) - needed :]
        del self._free[len(self._free) - needed :]
        blocks = [n.block for n in nodes] + new
        bs = self.block_size
        slots = [b * bs + o for b in blocks for o in range(bs)][:tokens]
        allocation_id = next(self._ids)
        self._records[allocation_id] = _Record(
            nodes, tuple(prefill_tokens) if prefill_tokens else None
        )
        return RadixAllocation(
            blocks=tuple(blocks), slots=tuple(slots), prefix_len=prefix_len,
            allocation_id=allocation_id,
        )

    def free(self, allocation: BlockAllocation, cache: bool = True) -> None:
        """Release an allocation. With ``cache`` (the shard wrote the prompt's KV) the full blocks
        of the prompt enter the trie; blocks duplicating a cached run, and the rest, are freed.
        ``cache=False`` is for allocations whose prefill never ran."""
        assert isinstance(allocation, RadixAllocation), "not allocated by this allocator"
        record = self._records.pop(allocation.allocation_id)
        for node in record.nodes:
            self._decref(node)
        blocks = list(allocation.blocks)
        n_reused = len(record.nodes)
        if not cache or record.prefill_tokens is None:
            self._free.extend(blocks[n_reused:])
            return
        self._time += 1
        tokens, bs = record.prefill_tokens, self.block_size
        n_prompt = len(tokens) // bs
        node = self._root
        for i in range(n_prompt):
            key = tokens[i * bs : (i + 1) * bs]
            child = node.children.get(key)
            if child is None:
                child = _Node(key=key, block=blocks[i], parent=node)
                node.children[key] = child
                self._cached += 1
            elif i < n_reused:
                assert child.block == blocks[i], "a reused block left the trie while referenced"
            else:
                self._free.append(blocks[i])  # another request cached this run meanwhile
            self._touch(child)
            node = child
        self._free.extend(blocks[max(n_prompt, n_reused) :])

    # ------------------------------------------------------------------ trie
    def _match(self, tokens) -> list[_Node]:
        bs, node, nodes = self.block_size, self._root, []
        for i in range(len(tokens) // bs):
            child = node.children.get(tuple(tokens[i * bs : (i + 1) * bs]))
            if child is None:
                break
            self._touch(child)
            nodes.append(child)
            node = child
        return nodes

    def _evictable(self, node: _Node) -> bool:
        return node.alive and node is not self._root and not node.ref_count and not node.children

    def _touch(self, node: _Node) -> None:
        node.last_access = self._time
        if self._evictable(node):
            heapq.heappush(self._lru, (node.last_access, next(self._seq), node))

    def _decref(self, node: _Node) -> None:
        assert node.ref_count > 0
        node.ref_count -= 1
        if self._evictable(node):
            heapq.heappush(self._lru, (node.last_access, next(self._seq), node))

    def _evict(self, n: int) -> None:
        """Move up to ``n`` blocks of unreferenced leaves, least recently used first, to the free
        list; a parent left childless becomes a leaf candidate itself."""
        evicted = 0
        while evicted < n and self._lru:
            stamp, _, node = heapq.heappop(self._lru)
            if not self._evictable(node) or node.last_access != stamp:
                continue  # stale entry: touched, referenced or given children since
            parent = node.parent
            del parent.children[node.key]
            node.alive = False
            self._cached -= 1
            self._free.append(node.block)
            evicted += 1
            if self._evictable(parent):
                heapq.heappush(self._lru, (parent.last_access, next(self._seq), parent))
