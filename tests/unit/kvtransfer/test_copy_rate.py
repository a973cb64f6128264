"""CopyRate: when a NIXL puller first looks at a posted READ (kvtransfer.nixl_transport)."""

import pytest

from kvtransfer.nixl_transport import CopyRate

MIB = 1 << 20


def test_no_plan_before_the_first_observation():
    assert CopyRate().expected_s(72 * MIB) == 0.0


def test_a_faster_read_raises_the_rate_at_once_a_slower_one_only_partly():
    rate = CopyRate(decay=0.8)
    rate.observe(100 * MIB, 0.01)
    assert rate.expected_s(100 * MIB) == pytest.approx(0.01)
    rate.observe(100 * MIB, 0.005)
    assert rate.expected_s(100 * MIB) == pytest.approx(0.005)
    rate.observe(100 * MIB, 0.05)  # one slow READ (a busy host) does not make the next plan 10x longer
    assert 0.005 < rate.expected_s(100 * MIB) < 0.0065


def test_a_read_already_done_at_the_first_look_steps_the_rate_up():
    rate = CopyRate(step_up=2.0)
    rate.observe(100 * MIB, 0.04)
    rate.finished_within(100 * MIB, 0.034)
    assert rate.expected_s(100 * MIB) == pytest.approx(0.02)
    fresh = CopyRate()
    fresh.finished_within(100 * MIB, 0.01)  # no plan yet: the time seen is the best bound there is
    assert fresh.expected_s(100 * MIB) == pytest.approx(0.01)


def _first_looks(rate: CopyRate, num_bytes: int, true_s: float, reads: int) -> list[float]:
    """What NixlPuller._wait does over `reads` READs that each really take true_s (the READ is
    seen done at the first look if that comes after true_s, else at true_s)."""
    looks = []
    for _ in range(reads):
        look = rate.first_look_s(num_bytes)
        looks.append(look)
        rate.learn(num_bytes, max(look, true_s), running_at_first_look=look < true_s)
    return looks


def test_after_a_cold_slow_first_read_the_first_look_settles_just_before_the_end():
    rate = CopyRate()
    rate.observe(72 * MIB, 0.040)  # first READ: endpoints and pages cold, 4x the steady time
    looks = _first_looks(rate, 72 * MIB, 0.010, reads=12)
    assert all(look < 0.010 for look in looks[3:])  # from the 4th READ on, never late
    assert all(look >= 0.5 * 0.010 for look in looks[3:])  # nor so early that the wait is all polling
