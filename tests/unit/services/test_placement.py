"""Placement plugins (table tests) and the profile runner."""

import numpy as np
import pytest

from services.router.placement import registry
from services.router.placement.base import LoadView, PlacementRequest, WorkerView
from services.router.placement.runner import NoCandidates, PoolProfile, load_profile
from services.router.placement.table import WorkerTable

REQ = PlacementRequest("r1", [2, 3, 4], "interactive")


def workers(*specs):
    return [WorkerView(wid, f"addr-{wid}", role, healthy) for wid, role, healthy in specs]


def pool_of(views):
    """The views as the runner hands them to plugins: a Pool of every row of a WorkerTable."""
    return WorkerTable.of(views).pool()


def kept_ids(filter_name, views, **params):
    pool = pool_of(views)
    keep = registry.build("filter", filter_name, **params).filter(REQ, pool)
    return [w for w, k in zip(pool.ids, keep) if k]


def scores_by_id(scorer_name, views, request=REQ):
    pool = pool_of(views)
    return dict(zip(pool.ids, np.asarray(registry.build("scorer", scorer_name).score(request, pool)).tolist()))


def picked_ids(picker, scored, times):
    pool = pool_of([w for w, _ in scored])
    totals = np.array([score for _, score in scored])
    return [pool.ids[picker.pick(REQ, pool, totals)] for _ in range(times)]


@pytest.mark.parametrize("pool,expected", [
    ([("a", "decode", True), ("b", "decode", False), ("c", "decode", True)], ["a", "c"]),
    ([("a", "decode", False)], []),
    ([], []),
])
def test_healthy_filter(pool, expected):
    assert kept_ids("healthy", workers(*pool)) == expected


def test_round_robin_cycles_in_id_order():
    picker = registry.build("picker", "round_robin")
    pool = [(w, 0.0) for w in workers(("b", "decode", True), ("a", "decode", True), ("c", "decode", True))]
    assert picked_ids(picker, pool, 6) == ["a", "b", "c", "a", "b", "c"]


def test_max_score_picks_best_and_breaks_ties_among_best_only():
    picker = registry.build("picker", "max_score", seed=1)
    a, b, c = workers(("a", "decode", True), ("b", "decode", True), ("c", "decode", True))
    assert picked_ids(picker, [(a, 0.2), (b, 0.9), (c, 0.5)], 1) == ["b"]
    assert set(picked_ids(picker, [(a, 0.7), (b, 0.7), (c, 0.1)], 50)) == {"a", "b"}


class FixedScorer:
    name = "fixed"

    def __init__(self, scores):
        self.scores = scores

    def score(self, request, pool):
        return [self.scores[w] for w in pool.ids]


def test_runner_clamps_and_weights_scores():
    pool = pool_of(workers(("a", "decode", True), ("b", "decode", True), ("c", "decode", True)))
    profile = PoolProfile([], [(FixedScorer({"a": 5.0, "b": 0.5, "c": float("nan")}), 2.0),
                               (FixedScorer({"a": -3.0, "b": 0.25, "c": 0.5}), 1.0)],
                          registry.build("picker", "max_score"))
    choice = profile.choose("decode", REQ, pool)
    # a: 2*clamp(5)=2 + clamp(-3)=0; b: 2*0.5 + 0.25; c: NaN counts as 0, + 0.5
    assert choice.scores == {"a": 2.0, "b": 1.25, "c": 0.5}
    assert choice.worker.worker_id == "a"
    assert set(choice.plugin_ms) == {"scorer.fixed", "picker.max_score"}


def test_runner_rejects_a_scorer_that_skips_candidates():
    one_score = FixedScorer({})
    one_score.score = lambda request, pool: [1.0]
    profile = PoolProfile([], [(one_score, 1.0)], registry.build("picker", "max_score"))
    with pytest.raises(ValueError, match=r"fixed returned \(1,\) values for 2 candidates"):
        profile.choose("decode", REQ, pool_of(workers(("a", "decode", True), ("b", "decode", True))))


class ListFilter:
    """Keeps the candidates whose id is in `ids`, answering with a plain list."""

    name = "list_filter"

    def __init__(self, ids):
        self.ids = ids

    def filter(self, request, pool):
        return [w in self.ids for w in pool.ids]


def test_filters_run_in_turn_on_what_the_previous_kept():
    pool = pool_of(workers(("a", "decode", True), ("b", "decode", False), ("c", "decode", True)))
    profile = PoolProfile([registry.build("filter", "healthy"), ListFilter({"b", "c"})], [],
                          registry.build("picker", "max_score"))
    choice = profile.choose("decode", REQ, pool)
    assert choice.worker.worker_id == "c" and choice.scores == {"c": 0.0}
    with pytest.raises(NoCandidates, match=r"no decode worker is available \(3 known"):
        PoolProfile([registry.build("filter", "healthy"), ListFilter({"b"})], [],
                    registry.build("picker", "max_score")).choose("decode", REQ, pool)


def test_profile_places_decode_then_prefill():
    profile = load_profile("round_robin")
    placement = profile.place(REQ, workers(("p0", "prefill", True), ("d0", "decode", True), ("d1", "decode", False)))
    assert placement.decode.worker.worker_id == "d0"
    assert placement.prefill.worker.worker_id == "p0"
    assert profile.counts == {"remote_prefill": 1}


def test_no_healthy_prefill_falls_back_to_local_prefill():
    placement = load_profile("random").place(REQ, workers(("p0", "prefill", False), ("d0", "decode", True)))
    assert placement.prefill is None


def test_no_decode_worker_raises():
    with pytest.raises(NoCandidates, match="no decode worker"):
        load_profile("round_robin").place(REQ, workers(("p0", "prefill", True), ("d0", "decode", False)))


def test_a_seeded_profile_repeats_its_random_picks_and_leaves_unseedable_pickers_alone():
    pool = workers(*[(f"d{i}", "decode", True) for i in range(8)], *[(f"p{i}", "prefill", True) for i in range(8)])

    def picks(profile):
        return [(p.decode.worker.worker_id, p.prefill.worker.worker_id)
                for p in (profile.place(PlacementRequest(f"r{i}", [2] * 64, "interactive"), pool) for i in range(20))]
    assert picks(load_profile("random", seed=3)) == picks(load_profile("random", seed=3))
    assert picks(load_profile("random", seed=3)) != picks(load_profile("random", seed=4))
    assert picks(load_profile("round_robin", seed=3))[:2] == [("d0", "p0"), ("d1", "p1")]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known pickers: .*round_robin"):
        registry.build("picker", "nope")
    with pytest.raises(ValueError, match="known: .*round_robin"):
        load_profile("nope")


def loaded(wid, role="decode", waiting=0, running=0, used=0, total=100, queued=0, prefix=0, healthy=True):
    return WorkerView(wid, f"addr-{wid}", role, healthy, LoadView(waiting, running, used, total, queued), prefix, prefix)


@pytest.mark.parametrize("name,pool,expected", [
    ("queue_depth", [loaded("a", waiting=4), loaded("b", running=2), loaded("c")], {"a": 0.0, "b": 0.5, "c": 1.0}),
    ("queue_depth", [loaded("a", running=3), loaded("b", waiting=3)], {"a": 1.0, "b": 1.0}),
    ("kv_utilization", [loaded("a", used=25), loaded("b", used=100), loaded("c", total=0)],
     {"a": 0.75, "b": 0.0, "c": 1.0}),
    ("queued_prefill_tokens", [loaded("a", queued=1000), loaded("b", queued=250), loaded("c", queued=0)],
     {"a": 0.0, "b": 0.75, "c": 1.0}),
])
def test_load_scorers(name, pool, expected):
    assert scores_by_id(name, pool) == pytest.approx(expected)


def test_prefix_overlap_is_the_share_of_prompt_blocks_held():
    request = PlacementRequest("r", list(range(64)), "interactive", block_size=16)  # 4 full blocks
    scores = scores_by_id("prefix_overlap", [loaded("a", prefix=4), loaded("b", prefix=1), loaded("c")], request)
    assert scores == {"a": 1.0, "b": 0.25, "c": 0.0}
    short = PlacementRequest("r", [1, 2, 3], "interactive", block_size=16)
    assert scores_by_id("prefix_overlap", [loaded("a")], short) == {"a": 0.0}


@pytest.mark.parametrize("pool,expected", [
    ([loaded("a", used=96), loaded("b", used=94), loaded("c", waiting=65), loaded("d", total=0)], ["b", "d"]),
])
def test_has_capacity_filter(pool, expected):
    assert kept_ids("has_capacity", pool, max_kv_utilization=0.95, max_waiting=64) == expected


@pytest.mark.parametrize("prompt_len,cached_blocks,remote", [
    (100, 0, False),   # short prompt: prefill on the decode worker
    (300, 0, True),    # long and cold: remote prefill pays
    (300, 12, False),  # 192 of 300 cached on the decode worker: 108 left < 128
    (300, 10, True),   # 160 cached: 140 left >= 128
])
def test_conditional_decider(prompt_len, cached_blocks, remote):
    request = PlacementRequest("r", list(range(prompt_len)), "interactive", block_size=16)
    decision = registry.build("decider", "conditional", min_uncached_tokens=128).decide(
        request, loaded("d", prefix=cached_blocks))
    assert decision.remote_prefill is remote
    assert "uncached" in decision.reason


def test_prefix_aware_profile_follows_the_cached_prefix_and_skips_remote_prefill():
    from services.router.prefix_index import PrefixIndex
    from engine.hashing import block_hashes
    prompt = list(range(1000, 1400))  # 25 full blocks
    index = PrefixIndex()
    index.stored("d1", block_hashes(prompt, 16)[:20])
    index.stored("p0", block_hashes(prompt, 16)[:5])
    pool = [loaded("d0"), loaded("d1"), loaded("p0", role="prefill"), loaded("p1", role="prefill")]
    profile = load_profile("prefix_aware")
    placed = profile.place(PlacementRequest("r", prompt, "interactive"), pool, index)
    assert placed.decode.worker.worker_id == "d1" and placed.decode.worker.prefix_blocks == 20
    assert placed.prefill is None and not placed.decision.remote_prefill  # 80 uncached < 128
    cold = list(range(5000, 5400))
    placed = profile.place(PlacementRequest("r2", cold, "interactive"), pool, index)
    assert placed.decision.remote_prefill and placed.prefill is not None


def test_prefix_aware_avoids_a_saturated_worker():
    pool = [loaded("d0", running=12, waiting=3, used=90), loaded("d1", running=1, used=10)]
    choices = {load_profile("prefix_aware").place(PlacementRequest(f"r{i}", [5] * 40, "interactive"), pool,
                                                  None).decode.worker.worker_id for i in range(20)}
    assert choices == {"d1"}


def test_router_inflight_counts_when_load_reports_lag():
    # Reports say both idle, but this router just sent d0 three streams: the next goes to d1.
    pool = [loaded("d0")._replace(load=LoadView(kv_blocks_total=100, router_inflight=3)), loaded("d1")]
    assert scores_by_id("queue_depth", pool) == {"d0": 0.0, "d1": 1.0}
    prefill = [loaded("p0", role="prefill")._replace(load=LoadView(router_inflight_tokens=900)),
               loaded("p1", role="prefill", queued=300)]
    assert scores_by_id("queued_prefill_tokens", prefill) == {"p0": 0.0, "p1": 1.0}


def test_burst_of_one_prefix_sticks_to_one_worker_before_any_kv_event():
    from services.router.prefix_index import PrefixIndex
    index, profile = PrefixIndex(), load_profile("prefix_aware")
    pool = [loaded("d0"), loaded("d1"), loaded("p0", role="prefill"), loaded("p1", role="prefill")]
    shared = list(range(2000, 2512))
    chosen = {profile.place(PlacementRequest(f"r{i}", shared + [i] * 8, "interactive"), pool, index)
              .decode.worker.worker_id for i in range(6)}
    assert len(chosen) == 1


def test_decider_relies_on_confirmed_blocks_only():
    # Request 2 of a group arrives while request 1's prefill is still running: the router
    # expects the prefix on d1 (steer there) but must not prefill locally on a promise.
    from services.router.prefix_index import PrefixIndex
    from engine.hashing import block_hashes
    prompt = list(range(7000, 7400))
    index = PrefixIndex()
    index.expect("d1", block_hashes(prompt, 16))
    index.expect("p0", block_hashes(prompt, 16))
    pool = [loaded("d0"), loaded("d1"), loaded("p0", role="prefill"), loaded("p1", role="prefill")]
    placed = load_profile("prefix_aware").place(PlacementRequest("r", prompt + [1] * 8, "interactive"), pool, index)
    assert placed.decode.worker.worker_id == "d1"
    assert placed.decode.worker.prefix_blocks == 25 and placed.decode.worker.confirmed_prefix_blocks == 0
    assert placed.decision.remote_prefill and placed.prefill.worker.worker_id == "p0"
    index.stored("d1", block_hashes(prompt, 16))  # now confirmed by the worker's KV events
    placed = load_profile("prefix_aware").place(PlacementRequest("r2", prompt + [2] * 8, "interactive"), pool, index)
    assert not placed.decision.remote_prefill
