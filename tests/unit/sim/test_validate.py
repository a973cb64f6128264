"""How the validation slices the trace and times its arrivals (no mesh here: that is bench.sim)."""

import time

import pytest

from sim.calibrate import host_slowdown
from sim.costs import load_costs
from sim.trace import MOONCAKE_TRACE, Request
from sim.validate import (
    Slice,
    at_rate,
    background_cores,
    machine_busy_s,
    predict,
    scaled_phases,
    probe_scales,
    rescaled,
    spread_ticks,
)


def at(t):
    return Request("r", t, 16, 2, (), 16)


def test_requests_of_one_trace_tick_are_spread_over_the_tick():
    spread = spread_ticks([at(0.0), at(0.0), at(0.0), at(3.0), at(9.0), at(9.0)], tick_s=3.0)
    assert [r.arrival_s for r in spread] == [0.0, 1.0, 2.0, 3.0, 9.0, 10.5]


def test_at_rate_keeps_the_spacing_and_sets_the_mean_rate():
    out = at_rate([at(10.0), at(11.0), at(14.0)], rate=0.5)
    assert [r.arrival_s for r in out] == pytest.approx([0.0, 1.0, 4.0])  # 2 gaps in 4 s: 0.5 req/s


@pytest.mark.skipif(not MOONCAKE_TRACE.exists(), reason="shared/data trace not present")
def test_phases_take_consecutive_trace_requests_at_their_rates():
    phases, tokens = scaled_phases(Slice(n=8, rates=(0.5, 1.0)))
    first, second = phases
    assert len(first) == len(second) == 8
    assert not {r.request_id for r in first} & {r.request_id for r in second}
    assert first[-1].arrival_s == pytest.approx(7 / 0.5) and second[-1].arrival_s == pytest.approx(7 / 1.0)
    assert all(r.prompt_tokens == len(tokens[r.request_id]) <= 1024 for r in first + second)
    assert all(len(r.block_hashes) == r.prompt_tokens // 16 for r in first + second)


def test_host_slowdown_is_the_mean_over_kinds_of_work():
    assert host_slowdown({"prefill": [1.0, 1.2, 1.6], "decode": [1.0, 1.4, 2.0]}) == [1.0, 1.3, 1.8]


def test_rescaled_multiplies_prefill_and_decode_compute_times_only():
    costs = load_costs("cpu-local")
    now = rescaled(costs, 1.5, 0.8)
    assert now.prefill_s(512, 256) == pytest.approx(1.5 * costs.prefill_s(512, 256))
    assert now.attention_s([(64, 0), (128, 32)]) == pytest.approx(1.5 * costs.attention_s([(64, 0), (128, 32)]))
    assert now.decode_step_s(4, 2048) == pytest.approx(0.8 * costs.decode_step_s(4, 2048))
    assert now.transfer_s(1000) == costs.transfer_s(1000) and now.rpc_s == costs.rpc_s


def test_probe_scales_compare_lone_probes_with_the_profile_as_the_calibration_did():
    costs = load_costs("cpu-local")
    served, step = 1.1 * costs.prefill_s(512), 0.9 * costs.decode_step_s(1, 518)
    probes = [{"prompt_tokens": 512, "ttft_s": served + pull + 2 * costs.rpc_s, "kv_pull_s": pull,
               "token_gap_s": step * jitter} for pull, jitter in ((0.004, 1.0), (0.006, 1.01), (0.005, 0.99))]
    probes.append(probes[0] | {"ttft_s": 10.0, "token_gap_s": 5.0})  # one straggler: the median ignores it
    assert probe_scales(costs, probes) == pytest.approx((1.1, 0.9), abs=0.005)


def test_machine_busy_counts_this_process_computing():
    before, cpu_before = machine_busy_s(), time.process_time()
    while time.process_time() - cpu_before < 0.3:
        pass
    assert machine_busy_s() - before >= 0.25  # every process's CPU, ours included


def test_background_is_what_the_machine_used_beside_the_four_workers():
    run = {"wall_s": 10.0, "machine_busy_s": 14.0,
           "cpu_s_by_process": {"prefill-0": 3.0, "prefill-1": 2.0, "decode-0": 2.5, "decode-1": 1.5,
                                "router": 0.6, "client": 0.4}}
    assert background_cores(run) == 0.5  # 14 - 9 worker seconds over 10 s: tenants, router and client


@pytest.mark.skipif(not MOONCAKE_TRACE.exists(), reason="shared/data trace not present")
def test_a_busier_host_predicts_later_first_tokens_phase_by_phase():
    costs = load_costs("cpu-local")
    phases, _ = scaled_phases(Slice(n=10, rates=(0.8, 1.6)))
    offsets = [0.0, 60.0]
    quiet = predict(costs, phases, offsets, 0, [0.0, 0.0])
    busy = predict(costs, phases, offsets, 0, [0.0, 1.0])
    assert quiet == predict(costs, phases, offsets, 0)  # no background: one run of both phases
    assert busy[0] == quiet[0]  # the first phase's background is unchanged
    assert sum(busy[1]) > sum(quiet[1])
