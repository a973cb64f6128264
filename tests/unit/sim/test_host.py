"""A host's CPU shared by workers (processor sharing with a measured slowdown), by hand.

Times are powers of two so the Host's answers are exact in floating point (the cluster's add a
transfer term of a few bytes over 2**60 B/s, hence approx there)."""

import dataclasses
import heapq

import pytest

from sim.cluster import Cluster
from sim.host import Host, slowdown_curve
from tests.unit.sim.test_cluster import FIXED, request


class Clock:
    """A minimal event loop: enough to drive a Host alone."""

    def __init__(self):
        self.now, self._heap, self._seq, self.log = 0.0, [], 0, []

    def at(self, t, fn, *args):
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def run(self):
        while self._heap:
            self.now, _, fn, args = heapq.heappop(self._heap)
            fn(*args)

    def done(self, name):
        self.log.append((name, self.now))


def test_two_workers_computing_together_each_go_at_half_speed():
    clock = Clock()
    host = Host(lambda: clock.now, clock.at, slowdown_curve((1.0, 2.0), cores=1))
    host.start("a", 1.0, clock.done, "a")
    clock.at(0.5, host.start, "b", 1.0, clock.done, "b")
    clock.run()
    # a: 0.5 alone, then its last 0.5 at half speed (1.0 s); b: 0.5 shared, its last 0.5 alone.
    assert clock.log == [("a", 1.5), ("b", 2.0)]


def test_a_dedicated_host_never_slows_down():
    clock = Clock()
    host = Host(lambda: clock.now, clock.at)
    host.start("a", 1.0, clock.done, "a")
    host.start("b", 0.25, clock.done, "b")
    clock.run()
    assert clock.log == [("b", 0.25), ("a", 1.0)]


def test_resize_cuts_a_computation_short_at_the_work_done():
    clock = Clock()
    host = Host(lambda: clock.now, clock.at, slowdown_curve((1.0, 2.0), cores=1))
    host.start("a", 4.0, clock.done, "a")
    host.start("b", 8.0, clock.done, "b")

    def cut():
        assert host.work_done("a") == 0.5  # 1 s at half speed
        host.resize("a", 1.0)
    clock.at(1.0, cut)
    clock.run()
    # a finishes its 1.0 at 2.0 (half speed); b has 1.0 of 8 done then, the other 7 alone.
    assert clock.log == [("a", 2.0), ("b", 9.0)]


def test_slowdown_past_the_measured_table_is_processor_sharing():
    slowdown = slowdown_curve((1.0, 1.25, 1.75, 2.5), cores=2)
    assert [slowdown(n) for n in (1, 2, 3, 4)] == [1.0, 1.25, 1.75, 2.5]
    assert slowdown(8) == 5.0  # twice the workers of the last measured point: twice its slowdown
    with pytest.raises(ValueError):
        slowdown_curve((1.5, 2.0), cores=2)  # one worker alone is the reference: 1.0


def test_a_prefill_and_a_decode_on_one_shared_host_slow_each_other():
    costs = dataclasses.replace(FIXED, host_cores=1.0, host_slowdown=(1.0, 2.0))
    cluster = Cluster(costs, 1, 1, "round_robin", block_size=16)
    first, second = cluster.run([request(1, 0.0, 128, 3), request(2, 0.15625, 64, 2)])
    assert first.first_token_s == pytest.approx(0.15625)  # 0.125 prefill alone + 1/32 transfer
    # From 0.15625 the first's two decode steps (1/32 s of work) and the second's prefill (1/16 s)
    # share the host at half speed: the decode ends at 0.21875, the prefill's last 1/32 s alone.
    assert first.end_s == pytest.approx(0.21875)
    assert second.first_token_s == pytest.approx(0.25 + 2**-5)
    dedicated = Cluster(FIXED, 1, 1, "round_robin", block_size=16)
    _, alone = dedicated.run([request(1, 0.0, 128, 3), request(2, 0.15625, 64, 2)])
    assert alone.first_token_s == pytest.approx(0.15625 + 2**-4 + 2**-5)


def test_background_load_leaves_the_workers_the_rest_of_the_cores():
    measured = (1.0, 1.1, 1.65, 2.4)  # on 2 cores: 3 workers share them (1.5x) and interfere (1.1x)
    alone = slowdown_curve(measured, cores=2)
    busy = slowdown_curve(measured, cores=2, background=0.5)  # 1.5 cores left
    assert busy(1) == alone(1) == 1.0  # one worker still has a whole core
    assert busy(2) == pytest.approx(1.1 * 2 / 1.5)
    assert busy(3) == pytest.approx(1.65 * 3 / 1.5 / 1.5)
    assert slowdown_curve(measured, cores=2, background=5.0)(1) == 4.0  # a quarter of a core at least
    with pytest.raises(ValueError):
        slowdown_curve(measured, cores=2, background=-0.1)
