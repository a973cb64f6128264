"""The simulator places with the router's own plugins: same objects, same decisions, and a
scorer registered for the router changes what the simulator does."""

import grpc

from services.router.placement import registry
from services.router.placement.base import LoadView
from services.router.placement.runner import PlacementProfile, load_profile
from services.router.prefix_index import PrefixIndex
from services.router.workers import WorkerEndpoint
from sim.cluster import Cluster
from sim.router import SimRouter, TraceRequest
from sim.trace import Request, shared_prefix
from tests.unit.sim.test_cluster import FIXED

LOADS = {"prefill-0": LoadView(2, 1, 10, 100, 4000), "prefill-1": LoadView(0, 1, 50, 100, 500),
         "decode-0": LoadView(0, 6, 80, 100), "decode-1": LoadView(1, 2, 30, 100), "decode-2": LoadView(0, 3, 20, 100)}
ROLES = {w: w.split("-")[0] for w in LOADS}
HASHES = list(range(100, 120))


def fill(index: PrefixIndex) -> None:
    index.stored("decode-0", HASHES[:12])
    index.stored("decode-2", HASHES[:5])
    index.stored("prefill-0", HASHES[:20])


def test_decision_equals_the_router_profile_on_the_same_state():
    now = [10.0]
    router = SimRouter(load_profile("prefix_aware"), ROLES, LOADS.__getitem__, lambda: now[0])
    fill(router.index)
    router.views()  # the workers' reports arrive
    router.track("decode-1", 0)
    router.track("decode-2", 0)
    router.track("decode-2", 0, -1)  # ended since decode-2's last report
    request = TraceRequest("q", HASHES, 20 * 16 + 7, 16)
    ours = router.place(request)

    index = PrefixIndex(clock=lambda: now[0])
    fill(index)
    # The router's own views: its WorkerEndpoints holding the same reports, in-flight and finished counts.
    with grpc.insecure_channel("127.0.0.1:1") as channel:  # never used: the stubs need one
        endpoints = [WorkerEndpoint(w, ROLES[w], channel, w, True, load) for w, load in LOADS.items()]
    endpoints[3].inflight = 1  # decode-1, tracked above
    endpoints[4].finished_since_report = 1  # decode-2's request that ended
    views = [e.view() for e in endpoints]
    assert router.views() == views
    theirs = load_profile("prefix_aware").place(TraceRequest("q", HASHES, 20 * 16 + 7, 16), views, index)
    assert ours.decode.worker.worker_id == theirs.decode.worker.worker_id
    assert ours.decode.scores == theirs.decode.scores
    assert ours.decision == theirs.decision
    assert ours.prefill.worker.worker_id == theirs.prefill.worker.worker_id == "prefill-0"
    assert ours.prefill.scores == theirs.prefill.scores


def test_the_cluster_runs_the_registered_plugin_objects():
    profile = Cluster(FIXED, 1, 1, "prefix_aware", block_size=16).router.profile
    assert isinstance(profile, PlacementProfile)
    names = [s.name for s, _ in profile.decode.scorers]
    assert names == ["prefix_overlap", "queue_depth", "kv_utilization"]
    for scorer, _ in profile.decode.scorers:
        assert type(scorer) is type(registry.build("scorer", scorer.name))


@registry.register("scorer", "sim_test_last_worker")
class LastWorkerScorer:
    """Test plugin: 1 for the worker with the highest id, 0 for the rest."""

    name = "sim_test_last_worker"

    def score(self, request, pool):
        last = max(pool.ids)
        return [float(w == last) for w in pool.ids]


def test_a_new_scorer_changes_the_simulation(tmp_path):
    profile = tmp_path / "last.yaml"
    profile.write_text("name: last\n"
                       "decode: {filters: [healthy], scorers: [{name: sim_test_last_worker, weight: 1}], picker: max_score}\n"
                       "prefill: {filters: [healthy], scorers: [{name: sim_test_last_worker, weight: 1}], picker: max_score}\n"
                       "decider: always_remote\n")
    reqs = shared_prefix(4, 4, 512, 64, 4, rate_per_s=20.0, block_size=16)
    base = Cluster(FIXED, 2, 3, "prefix_aware", block_size=16).run(reqs)
    custom = Cluster(FIXED, 2, 3, str(profile), block_size=16).run(reqs)
    assert len({j.decode_id for j in base}) > 1
    assert {j.decode_id for j in custom} == {"decode-2"} and {j.prefill_id for j in custom} == {"prefill-1"}


def test_kv_events_reach_the_index_and_load_reports_lag_by_the_interval():
    cluster = Cluster(FIXED, 1, 1, "round_robin", block_size=16)
    cluster.run([Request("a", 0.0, 64, 2, (1, 2, 3, 4), 16)])
    index = cluster.router.index
    assert index.holders(1) == {"prefill-0", "decode-0"}
    now = [0.0]
    loads = {"decode-0": LoadView(running=1)}
    router = SimRouter(load_profile("round_robin"), {"decode-0": "decode"}, loads.__getitem__, lambda: now[0],
                       report_interval_s=0.2)
    assert router.views()[0].load.running == 1
    loads["decode-0"] = LoadView(running=5)
    now[0] = 0.1
    assert router.views()[0].load.running == 1  # the next report is not due yet
    now[0] = 0.2
    assert router.views()[0].load.running == 5
