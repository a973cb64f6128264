"""The fixed pool of KV blocks: ref counts, the prefix cache and its KV events.

Every block id is in exactly one state:
  - referenced (ref_count > 0): in some block table (a sequence, kept KV or an import reservation);
  - cached-free (ref_count == 0, has a hash): holds reusable prefix KV, evictable in LRU order;
  - free (ref_count == 0, no hash).
New blocks come from the free list first, then by evicting the least recently freed cached block
(reported as a "removed" event). A full block whose tokens' KV is computed gets its chained hash
registered ("stored" event) unless an equal block is already cached.
Prefix matches trust the 64-bit chained hash (no token comparison).
"""

from collections import OrderedDict, deque
from typing import NamedTuple

from engine.hashing import hash_block
from engine.sequence import Sequence


class KvEvent(NamedTuple):
    """kind: "stored" | "removed" | "cleared" (block_hashes empty for "cleared")."""

    kind: str
    block_hashes: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._block_of_hash: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._events: list[KvEvent] = []

    # -- counts and snapshots -------------------------------------------------------------------

    @property
    def num_total_blocks(self) -> int:
        return len(self._ref_counts)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take (free + cached-free)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Referenced blocks (cached-free blocks count as free)."""
        return self.num_total_blocks - self.num_free_blocks

    def cached_block_hashes(self) -> list[int]:
        """Every hash currently in the prefix cache (snapshot for a new event subscriber)."""
        return list(self._block_of_hash)

    def drain_events(self) -> list[KvEvent]:
        """KV events since the last drain, oldest first; the caller owns them."""
        events, self._events = self._events, []
        return events

    # -- sequences ------------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether allocate(seq) would succeed now."""
        hits = self._prefix_hits(seq)
        revived = sum(1 for b in hits if self._ref_counts[b] == 0)
        needed = self._blocks_for(seq.num_tokens) - len(hits)
        return needed <= self.num_free_blocks - revived

    def allocate(self, seq: Sequence) -> None:
        """Gives seq (holding no blocks) blocks for all its tokens, reusing cached prefix blocks.
        Sets seq.num_computed_tokens = seq.num_cached_tokens = cached tokens (never all of them:
        the last token must be computed to get logits). Caller checked can_allocate."""
        assert not seq.block_table, f"{seq} already holds blocks"
        hits = self._prefix_hits(seq)
        for block in hits:
            self._take_cached(block)
        seq.block_table = hits + self.allocate_blocks(self._blocks_for(seq.num_tokens) - len(hits))
        seq.block_hashes = [self._hash_of[b] for b in hits]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size

    def may_append(self, seq: Sequence) -> bool:
        """Whether seq's block table can grow to cover all its tokens now."""
        return self._blocks_for(seq.num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append_slot(self, seq: Sequence) -> None:
        """Grows seq's block table to cover all its tokens (decode growth; caller checked may_append)."""
        missing = self._blocks_for(seq.num_tokens) - len(seq.block_table)
        if missing > 0:
            seq.block_table += self.allocate_blocks(missing)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers the hashes of seq's full, computed blocks not hashed yet (call after each step)."""
        size, tokens = self.block_size, seq.token_ids
        new_hashes = []
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // size):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = hash_block(parent, tokens[i * size:(i + 1) * size])
            seq.block_hashes.append(block_hash)
            block = seq.block_table[i]
            if self.enable_prefix_caching and block_hash not in self._block_of_hash and self._hash_of[block] is None:
                self._block_of_hash[block_hash] = block
                self._hash_of[block] = block_hash
                new_hashes.append(block_hash)
        if new_hashes:
            self._events.append(KvEvent("stored", tuple(new_hashes)))

    def free(self, seq: Sequence) -> None:
        """Drops seq's references; its cached blocks become evictable (tail blocks evicted first)."""
        self.free_blocks(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    # -- raw blocks (import reservations) -------------------------------------------------------

    def allocate_blocks(self, n: int) -> list[int]:
        """n unhashed blocks with ref count 1, evicting cached-free blocks if needed."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"need {n} blocks, only {self.num_free_blocks} free (check capacity first)")
        blocks = [self._pop_free() for _ in range(n)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def free_blocks(self, blocks: list[int]) -> None:
        """Drops one reference to each block, last block first."""
        for block in reversed(blocks):
            assert self._ref_counts[block] > 0, f"block {block} freed twice"
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._hash_of[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash ("cleared" event); only when no block is referenced."""
        if self.num_used_blocks:
            return False
        for block in self._evictable:
            self._hash_of[block] = None
            self._free.append(block)
        self._evictable.clear()
        self._block_of_hash.clear()
        self._events.append(KvEvent("cleared"))
        return True

    # -- internals ------------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks matching seq's leading full blocks, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        hits, parent, size = [], None, self.block_size
        for i in range((seq.num_tokens - 1) // size):
            parent = hash_block(parent, seq.token_ids[i * size:(i + 1) * size])
            block = self._block_of_hash.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def _take_cached(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            del self._evictable[block]
        self._ref_counts[block] += 1

    def _pop_free(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        block_hash = self._hash_of[block]
        del self._block_of_hash[block_hash]
        self._hash_of[block] = None
        self._events.append(KvEvent("removed", (block_hash,)))
        return block
