"""Placement plugins (table tests) and the profile runner."""

import pytest

from services.router.placement import registry
from services.router.placement.base import PlacementRequest, WorkerView
from services.router.placement.runner import NoCandidates, PoolProfile, load_profile

REQ = PlacementRequest("r1", [2, 3, 4], "interactive")


def workers(*specs):
    return [WorkerView(wid, f"addr-{wid}", role, healthy) for wid, role, healthy in specs]


@pytest.mark.parametrize("pool,expected", [
    ([("a", "decode", True), ("b", "decode", False), ("c", "decode", True)], ["a", "c"]),
    ([("a", "decode", False)], []),
    ([], []),
])
def test_healthy_filter(pool, expected):
    kept = registry.build("filter", "healthy").filter(REQ, workers(*pool))
    assert [w.worker_id for w in kept] == expected


def test_round_robin_cycles_in_id_order():
    picker = registry.build("picker", "round_robin")
    pool = [(w, 0.0) for w in workers(("b", "decode", True), ("a", "decode", True), ("c", "decode", True))]
    assert [picker.pick(REQ, pool).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_max_score_picks_best_and_breaks_ties_among_best_only():
    picker = registry.build("picker", "max_score", seed=1)
    a, b, c = workers(("a", "decode", True), ("b", "decode", True), ("c", "decode", True))
    assert picker.pick(REQ, [(a, 0.2), (b, 0.9), (c, 0.5)]).worker_id == "b"
    assert {picker.pick(REQ, [(a, 0.7), (b, 0.7), (c, 0.1)]).worker_id for _ in range(50)} == {"a", "b"}


class FixedScorer:
    name = "fixed"

    def __init__(self, scores):
        self.scores = scores

    def score(self, request, pool):
        return self.scores


def test_runner_clamps_and_weights_scores():
    pool = workers(("a", "decode", True), ("b", "decode", True))
    profile = PoolProfile([], [(FixedScorer({"a": 5.0, "b": 0.5}), 2.0), (FixedScorer({"a": -3.0, "b": 0.25}), 1.0)],
                          registry.build("picker", "max_score"))
    choice = profile.choose("decode", REQ, pool)
    assert choice.scores == {"a": 2.0, "b": 1.25}  # a: 2*clamp(5)=2 + clamp(-3)=0; b: 2*0.5 + 0.25
    assert choice.worker.worker_id == "a"
    assert set(choice.plugin_ms) == {"scorer.fixed", "picker.max_score"}


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


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known pickers: .*round_robin"):
        registry.build("picker", "nope")
    with pytest.raises(ValueError, match="known: .*round_robin"):
        load_profile("nope")
