"""The router's prefix index under a stream of KV events."""

import random

from engine.hashing import block_hashes
from services.router.prefix_index import PrefixIndex


def test_matched_blocks_counts_leading_blocks_only():
    index = PrefixIndex()
    hashes = block_hashes(list(range(160)), 16)  # 10 blocks
    index.stored("a", hashes[:6])
    index.stored("b", hashes[:2])
    index.stored("c", hashes[3:])  # holds later blocks but not the start: no match
    assert index.matched_blocks(hashes, ["a", "b", "c", "d"]) == {"a": 6, "b": 2, "c": 0, "d": 0}
    index.removed("a", [hashes[3]])  # an evicted middle block ends the match
    assert index.matched_blocks(hashes, ["a"]) == {"a": 3}
    index.stored("b", hashes)
    assert index.matched_blocks(hashes, ["b"]) == {"b": 10}


def test_clear_and_worker_death_drop_only_that_worker():
    index = PrefixIndex()
    hashes = block_hashes(list(range(64)), 16)
    index.stored("a", hashes)
    index.stored("b", hashes)
    index.cleared("a")
    assert index.holders(hashes[0]) == {"b"} and index.num_blocks("a") == 0
    index.cleared("b")
    assert index.holders(hashes[0]) == set() and index.snapshot() == {}


def test_rebuild_from_snapshots_gives_the_same_index():
    rng = random.Random(7)
    live, held = PrefixIndex(), {"a": set(), "b": set(), "c": set()}
    for _ in range(2000):
        worker, h = rng.choice("abc"), rng.randrange(300)
        op = rng.random()
        if op < 0.6:
            live.stored(worker, [h])
            held[worker].add(h)
        elif op < 0.98:
            live.removed(worker, [h])
            held[worker].discard(h)
        else:
            live.cleared(worker)
            held[worker].clear()
    restarted = PrefixIndex()  # a new router: each worker's stream opens with cleared + stored(snapshot)
    for worker, blocks in held.items():
        restarted.cleared(worker)
        restarted.stored(worker, blocks)
    assert restarted.snapshot() == live.snapshot() == {w: frozenset(b) for w, b in held.items() if b}


def test_expectations_count_until_confirmed_or_expired():
    now = [0.0]
    index = PrefixIndex(expect_ttl_s=5.0, clock=lambda: now[0])
    hashes = block_hashes(list(range(64)), 16)
    index.expect("a", hashes)
    assert index.matched_blocks(hashes, ["a", "b"]) == {"a": 4, "b": 0}
    assert index.snapshot() == {}, "expectations never enter the confirmed index"
    index.stored("a", hashes[:2])  # confirmed in part
    now[0] = 6.0  # the rest expired: the worker never stored them
    assert index.matched_blocks(hashes, ["a"]) == {"a": 2}
    index.expect("b", hashes)
    index.cleared("b")  # a worker that goes away takes its expectations with it
    assert index.matched_blocks(hashes, ["b"]) == {"b": 0}


def test_prefix_matches_names_only_the_candidates_that_match():
    index = PrefixIndex()
    hashes = block_hashes(list(range(160)), 16)  # 10 blocks
    index.stored("a", hashes[:6])
    index.stored("b", hashes[:2])
    index.stored("c", hashes[3:])
    index.expect("d", hashes[:4])
    assert index.prefix_matches(hashes, {"a", "b", "c", "d", "e"}) == {"a": 6, "b": 2, "d": 4}
    assert index.prefix_matches(hashes, {"b", "c"}) == {"b": 2}
    assert index.prefix_matches(hashes, {"a", "d"}, include_expected=False) == {"a": 6}
    assert index.prefix_matches([], {"a"}) == {}
    assert (index.confirmed_blocks(hashes, "a"), index.confirmed_blocks(hashes, "d")) == (6, 0)
