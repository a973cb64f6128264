import pytest

from engine.block_manager import BlockManager, KvEvent
from engine.hashing import block_hashes
from engine.sampling import SamplingParams
from engine.sequence import Sequence

BS = 4


def _seq(tokens, rid="r"):
    return Sequence(rid, tokens, SamplingParams(), max_tokens=8)


def _compute_all(bm, seq):
    """What the engine does after a step computing every token of seq."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def _check_invariants(bm, live_seqs):
    refs = {}
    for seq in live_seqs:
        for b in seq.block_table:
            refs[b] = refs.get(b, 0) + 1
    free = set(bm._free) | set(bm._evictable)
    assert not free & set(refs), "a block is both free and referenced"
    assert len(bm._free) + len(bm._evictable) + len(refs) == bm.num_total_blocks
    assert all(bm._ref_counts[b] == n for b, n in refs.items())
    assert bm.num_used_blocks == len(refs)
    assert all(bm._hash_of[b] == h for h, b in bm._block_of_hash.items())


def test_allocate_and_free_counts():
    bm = BlockManager(8, BS)
    seq = _seq(list(range(10)))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and seq.num_cached_tokens == 0
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    _check_invariants(bm, [seq])
    bm.free(seq)
    assert bm.num_used_blocks == 0 and seq.block_table == []
    _check_invariants(bm, [])


def test_can_allocate_false_when_pool_is_short():
    bm = BlockManager(2, BS)
    assert not bm.can_allocate(_seq(list(range(9))))
    assert bm.can_allocate(_seq(list(range(8))))


def test_full_computed_blocks_are_stored_with_chained_hashes():
    bm = BlockManager(8, BS)
    seq = _seq(list(range(10)))
    bm.allocate(seq)
    _compute_all(bm, seq)
    expected = block_hashes(list(range(10)), BS)
    assert bm.drain_events() == [KvEvent("stored", tuple(expected))]
    assert sorted(bm.cached_block_hashes()) == sorted(expected)
    assert bm.drain_events() == []


def test_prefix_reuse_shares_blocks_and_counts_cached_tokens():
    bm = BlockManager(16, BS)
    a = _seq(list(range(12)) + [50], "a")
    bm.allocate(a)
    _compute_all(bm, a)
    b = _seq(list(range(8)) + [60, 61, 62, 63, 64], "b")
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    assert bm._ref_counts[a.block_table[0]] == 2
    _check_invariants(bm, [a, b])
    bm.free(a)
    assert bm._ref_counts[b.block_table[0]] == 1
    _check_invariants(bm, [b])


def test_fully_cached_prompt_still_computes_its_last_block():
    bm = BlockManager(16, BS)
    a = _seq(list(range(8)), "a")
    bm.allocate(a)
    _compute_all(bm, a)
    bm.free(a)
    b = _seq(list(range(8)), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and len(b.block_table) == 2
    _compute_all(bm, b)  # its recomputed last block duplicates a cached one: not registered twice
    assert len(bm.cached_block_hashes()) == 2
    _check_invariants(bm, [b])


def test_freed_cached_blocks_are_reused_after_free():
    bm = BlockManager(4, BS)
    a = _seq(list(range(9)), "a")
    bm.allocate(a)
    _compute_all(bm, a)
    bm.free(a)
    assert bm.num_used_blocks == 0 and len(bm.cached_block_hashes()) == 2
    b = _seq(list(range(9)), "b")
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 8
    _check_invariants(bm, [b])


def test_eviction_is_lru_and_reported_as_removed():
    bm = BlockManager(4, BS)
    old = _seq([1, 1, 1, 1, 0], "old")
    new = _seq([2, 2, 2, 2, 0], "new")
    for seq in (old, new):
        bm.allocate(seq)
        _compute_all(bm, seq)
    bm.free(old)
    bm.free(new)  # freed later: evicted later
    bm.drain_events()
    old_hash, new_hash = block_hashes([1] * 4, BS)[0], block_hashes([2] * 4, BS)[0]
    big = _seq(list(range(100, 111)), "big")  # 3 blocks: 2 uncached-free + evict 1
    assert bm.can_allocate(big)
    bm.allocate(big)
    assert bm.drain_events() == [KvEvent("removed", (old_hash,))]
    assert bm.cached_block_hashes() == [new_hash]
    _check_invariants(bm, [big])


def test_hit_on_evictable_block_counts_against_free_space():
    bm = BlockManager(3, BS)
    a = _seq(list(range(5)), "a")
    bm.allocate(a)
    _compute_all(bm, a)
    bm.free(a)
    # 3 free blocks, one of them the cached prefix b reuses: b needs 1 hit + 2 new = all 3.
    b = _seq(list(range(12)), "b")
    assert bm.can_allocate(b)
    c = _seq(list(range(13)), "c")
    assert not bm.can_allocate(c)


def test_append_slot_grows_on_block_boundary():
    bm = BlockManager(4, BS)
    seq = _seq(list(range(4)))
    bm.allocate(seq)
    assert len(seq.block_table) == 1
    seq.token_ids.append(9)
    assert bm.may_append(seq)
    bm.append_slot(seq)
    assert len(seq.block_table) == 2
    seq.token_ids.append(10)
    bm.append_slot(seq)
    assert len(seq.block_table) == 2
    _check_invariants(bm, [seq])


def test_may_append_false_when_full():
    bm = BlockManager(1, BS)
    seq = _seq(list(range(4)))
    bm.allocate(seq)
    seq.token_ids.append(1)
    assert not bm.may_append(seq)


def test_prefix_caching_disabled_reuses_nothing():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = _seq(list(range(9)), "a")
    bm.allocate(a)
    _compute_all(bm, a)
    assert bm.drain_events() == [] and bm.cached_block_hashes() == []
    b = _seq(list(range(9)), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_raw_blocks_and_reset():
    bm = BlockManager(4, BS)
    blocks = bm.allocate_blocks(3)
    assert len(set(blocks)) == 3 and bm.num_used_blocks == 3
    with pytest.raises(RuntimeError):
        bm.allocate_blocks(2)
    assert not bm.reset_prefix_cache()
    bm.free_blocks(blocks)
    assert bm.reset_prefix_cache()
    assert bm.drain_events() == [KvEvent("cleared")]


def test_random_workload_keeps_invariants():
    import random
    rng = random.Random(0)
    bm = BlockManager(12, BS)
    live = []
    for i in range(300):
        if live and rng.random() < 0.4:
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            seq = _seq([rng.randrange(3) for _ in range(rng.randrange(1, 14))], f"s{i}")
            if bm.can_allocate(seq):
                bm.allocate(seq)
                _compute_all(bm, seq)
                live.append(seq)
        _check_invariants(bm, live)
    # A subscriber replaying the events ends up with exactly the cache's hashes.
    replayed, kinds = set(), set()
    for event in bm.drain_events():
        kinds.add(event.kind)
        if event.kind == "stored":
            assert not replayed & set(event.block_hashes)
            replayed |= set(event.block_hashes)
        else:
            assert set(event.block_hashes) <= replayed
            replayed -= set(event.block_hashes)
    assert kinds == {"stored", "removed"}
    assert replayed == set(bm.cached_block_hashes())
