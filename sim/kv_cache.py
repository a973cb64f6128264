"""A worker's KV cache as the simulator sees it: a fixed number of blocks, prefix reuse by chained
block hash, LRU eviction at block granularity — the engine's BlockManager without the tensors.

Every block is referenced (held by a job; hashed or not), cached-free (hashed, ref count 0,
evictable, oldest first) or free. Allocation takes free blocks first, then evicts the least
recently freed cached block ("removed"); a computed full block's hash is registered once
("stored"), a duplicate of an already cached hash stays an unhashed block, as in the engine.
Events go to `on_event(kind, hashes)` at once (the router's prefix index listens).
"""

from collections import OrderedDict
from collections.abc import Callable


class KvCache:
    def __init__(self, capacity_blocks: int, on_event: Callable[[str, list[int]], None] = lambda kind, hashes: None):
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity = capacity_blocks
        self._refs: dict[int, int] = {}  # referenced hashed blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached-free, least recently freed first
        self._unhashed = 0  # referenced blocks without a hash
        self._on_event = on_event

    @property
    def used_blocks(self) -> int:
        """Referenced blocks (cached-free ones count as free, as in the engine's load report)."""
        return len(self._refs) + self._unhashed

    @property
    def free_blocks(self) -> int:
        return self.capacity - self.used_blocks

    def holds(self, block_hash: int) -> bool:
        return block_hash in self._refs or block_hash in self._evictable

    def match(self, block_hashes, limit: int) -> int:
        """Leading blocks of the prompt that are cached, at most limit."""
        n = 0
        for h in block_hashes:
            if n >= limit or not (h in self._refs or h in self._evictable):
                break
            n += 1
        return n

    def acquire(self, hits, new_blocks: int) -> None:
        """References the cached blocks `hits` and allocates new_blocks unhashed ones, evicting
        if needed. Caller checked can_acquire."""
        for h in hits:
            if h in self._evictable:
                del self._evictable[h]
            self._refs[h] = self._refs.get(h, 0) + 1
        truly_free = self.capacity - self.used_blocks - len(self._evictable)
        evict = max(0, new_blocks - truly_free)
        removed = [self._evictable.popitem(last=False)[0] for _ in range(evict)]
        self._unhashed += new_blocks
        if removed:
            self._on_event("removed", removed)

    def can_acquire(self, hits, new_blocks: int) -> bool:
        revived = sum(1 for h in hits if h in self._evictable)
        return new_blocks <= self.free_blocks - revived

    def store(self, block_hashes) -> list[int]:
        """Turns held unhashed blocks into these computed full blocks; returns the hashes the job
        now references (duplicates of cached hashes stay unhashed and are not returned)."""
        stored = []
        for h in block_hashes:
            if h in self._refs or h in self._evictable:
                continue
            self._refs[h] = 1
            self._unhashed -= 1
            stored.append(h)
        if stored:
            self._on_event("stored", stored)
        return stored

    def release(self, hashed, unhashed: int) -> None:
        """Drops a job's references: its hashed blocks (in prompt order) become evictable, tail
        first (so a prompt's tail is evicted before its shared head), unhashed ones free."""
        for h in reversed(hashed):
            left = self._refs[h] - 1
            if left:
                self._refs[h] = left
            else:
                del self._refs[h]
                self._evictable[h] = None
        self._unhashed -= unhashed
        assert self._unhashed >= 0, "released more unhashed blocks than held"
