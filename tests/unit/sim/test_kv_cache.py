"""The simulated KV cache: prefix hits, LRU eviction at block granularity, KV events."""

from sim.kv_cache import KvCache


def make(capacity):
    events = []
    return KvCache(capacity, lambda kind, hashes: events.append((kind, list(hashes)))), events


def compute(cache, hashes, hits=0):
    """A prompt of len(hashes) full blocks: reuse `hits`, compute and store the rest."""
    cache.acquire(hashes[:hits], len(hashes) - hits)
    stored = cache.store(hashes[hits:])
    return list(hashes[:hits]) + stored, len(hashes) - hits - len(stored)


def test_hits_reuse_and_stored_events():
    cache, events = make(8)
    held = compute(cache, [1, 2, 3])
    assert events == [("stored", [1, 2, 3])] and cache.used_blocks == 3
    cache.release(*held)
    assert cache.used_blocks == 0 and cache.match([1, 2, 9], limit=10) == 2
    assert cache.match([1, 2, 3], limit=1) == 1


def test_lru_evicts_least_recently_freed_blocks_one_at_a_time_tail_first():
    cache, events = make(4)
    cache.release(*compute(cache, [1, 2]))  # freed tail first: 2 is older than 1 in LRU order
    cache.release(*compute(cache, [3, 4]))
    events.clear()
    held = compute(cache, [5])  # needs one block: evicts exactly the oldest, block 2
    assert events == [("removed", [2]), ("stored", [5])]
    assert cache.match([1], 4) == 1 and cache.match([1, 2], 4) == 1  # 1 survives, 2 is gone
    cache.release(*held)
    events.clear()
    cache.acquire([], 3)
    assert events == [("removed", [1, 4, 3])]


def test_a_hit_revives_a_block_so_it_is_not_evicted():
    cache, events = make(3)
    cache.release(*compute(cache, [1, 2, 3]))
    held = compute(cache, [1, 7], hits=1)  # 1 referenced again; evicts 3 (oldest free) for 7
    assert ("removed", [3]) in events and cache.holds(1)
    assert not cache.can_acquire([], 2)  # 1 and 7 are held: only one block can be freed
    cache.release(*held)
    assert cache.free_blocks == 3


def test_duplicate_hash_stays_unhashed_and_is_released_as_such():
    cache, events = make(4)
    first = compute(cache, [1, 2])
    second = compute(cache, [1, 2])  # computed again while the first still holds them
    assert second == ([], 2) and events == [("stored", [1, 2])]
    cache.release(*first)
    cache.release(*second)
    assert cache.used_blocks == 0
