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


def test_expired_expectations_are_dropped_and_renewed_ones_kept():
    now = [0.0]
    index = PrefixIndex(expect_ttl_s=5.0, clock=lambda: now[0])
    index.expect("a", [1, 2])
    index.expect("b", [2])
    now[0] = 3.0
    index.expect("a", [2])  # renewed: until 8
    assert index.num_expected() == 3
    now[0] = 6.0
    index.expect("c", [9])  # each expect call drops what has expired by now
    assert index.num_expected() == 2
    assert index.matched_blocks([2], ["a", "b"]) == {"a": 1, "b": 0}
    index.cleared("a")
    now[0] = 9.0
    index.expect("c", [10])  # a's renewed entry went with the clear; c's first one still lives
    assert index.num_expected() == 2 and index.matched_blocks([9], ["c"]) == {"c": 1}


def test_a_cleared_workers_slot_goes_to_the_next_worker_without_its_blocks():
    index = PrefixIndex()
    hashes = block_hashes(list(range(64)), 16)
    for worker in "abc":
        index.stored(worker, hashes)
    index.cleared("b")
    index.stored("d", hashes[:1])  # takes b's slot
    assert index.holders(hashes[0]) == {"a", "c", "d"} and index.holders(hashes[1]) == {"a", "c"}
    assert index.matched_blocks(hashes, "abcd") == {"a": 4, "b": 0, "c": 4, "d": 1}


def test_matches_agree_with_a_plain_reading_of_what_each_worker_holds():
    rng = random.Random(11)
    index, held = PrefixIndex(), {f"w{i}": set() for i in range(80)}  # more workers than a machine word
    prompt = list(range(1000, 1030))
    for _ in range(3000):
        worker, op = rng.choice(list(held)), rng.random()
        if op < 0.6:
            blocks = prompt[:rng.randint(1, len(prompt))]
            index.stored(worker, blocks)
            held[worker].update(blocks)
        elif op < 0.97:
            h = rng.choice(prompt)
            index.removed(worker, [h])
            held[worker].discard(h)
        else:
            index.cleared(worker)
            held[worker].clear()
    expected = {}
    for worker, blocks in held.items():
        n = 0
        while n < len(prompt) and prompt[n] in blocks:
            n += 1
        expected[worker] = n
    assert index.matched_blocks(prompt, held) == expected
    assert index.prefix_matches(prompt, held) == {w: n for w, n in expected.items() if n}
