"""The serving overhead: how the simulator applies it (exact answers with power-of-two costs) and
how sim.serving turns mesh and bare-engine points into the profile's numbers (no mesh here)."""

import dataclasses

import pytest
import yaml

from sim.calibrate import serving_coefficients
from sim.cluster import Cluster
from sim.costs import PROFILES_DIR, CostModel, load_costs
from sim.serving import overheads, transfer_fit
from sim.trace import Request

BARE = CostModel("bare", prefill_base_s=2**-4, prefill_per_token_s=2**-10, prefill_per_token_ctx_s=2**-20,
                 decode_base_s=2**-6, decode_per_seq_s=2**-7, decode_per_ctx_token_s=2**-12,
                 transfer_latency_s=2**-5, transfer_bytes_per_s=2.0**60, kv_bytes_per_token=1,
                 kv_capacity_tokens=4096, max_batch=8)
SERVED = dataclasses.replace(BARE, prefill_overhead=1.25, decode_overhead=1.5)


def test_overheads_multiply_every_compute_time_and_nothing_else():
    assert SERVED.prefill_s(512, 256) == pytest.approx(1.25 * BARE.prefill_s(512, 256))
    assert SERVED.attention_s([(64, 0), (128, 32)]) == pytest.approx(1.25 * BARE.attention_s([(64, 0), (128, 32)]))
    assert SERVED.decode_step_s(4, 2048) == pytest.approx(1.5 * BARE.decode_step_s(4, 2048))
    assert SERVED.decode_growth_s(4) == 1.5 * 4 * 2**-12
    assert SERVED.transfer_s(1000) == BARE.transfer_s(1000)
    # prefill_s = fixed + tokens + attention, with or without an overhead
    assert SERVED.prefill_s(100, 0) == pytest.approx(
        SERVED.prefill_fixed_s() + SERVED.prefill_tokens_s(100) + SERVED.attention_s([(100, 0)]))


def test_a_lone_request_pays_the_prefill_overhead_before_its_first_token_and_the_decode_one_after():
    request = Request("r", 0.0, 128, 3, tuple(range(8)), 16)
    [bare] = Cluster(BARE, 1, 1, "round_robin", block_size=16).run([request])
    [served] = Cluster(SERVED, 1, 1, "round_robin", block_size=16).run([request])
    prefill = 2**-4 + 128 * 2**-10 + 2**-20 * 128 * 64  # 0.0625 + 0.125 + 0.0078125
    assert bare.first_token_s == pytest.approx(prefill + 2**-5)
    assert served.first_token_s == pytest.approx(1.25 * prefill + 2**-5)
    # two decode steps at batch 1: contexts 129 and 130
    steps = sum(2**-6 + 2**-7 + 2**-12 * c for c in (129, 130))
    assert served.end_s - served.first_token_s == pytest.approx(1.5 * steps)


def test_overheads_must_be_positive():
    with pytest.raises(ValueError, match="overhead"):
        dataclasses.replace(BARE, decode_overhead=0.0)


def test_gpu_profiles_keep_no_overhead_and_cpu_local_carries_its_measurement():
    assert load_costs("h100-llama3-8b").prefill_overhead == load_costs("a100-llama3-8b").decode_overhead == 1.0
    spec = yaml.safe_load((PROFILES_DIR / "cpu-local.yaml").read_text())
    serving, cpu = spec["measured"]["serving"], load_costs("cpu-local")
    assert (cpu.prefill_overhead, cpu.decode_overhead) == (serving["prefill_overhead"], serving["decode_overhead"])
    assert cpu.transfer_bytes_per_s == serving["transfer"]["transfer_bytes_per_s"]
    assert "prefill_overhead, decode_overhead" in spec["sources"]


def mesh_point(n, ttft, pull, gap, decision="remote_prefill"):
    return {"prompt_tokens": n, "ttft_s": ttft, "kv_pull_s": pull, "decision": decision, "token_gap_s": gap}


def test_overheads_take_the_pull_and_two_hops_off_the_ttft_before_dividing():
    bare = [{"prompt_tokens": 256, "prefill_s": 0.4, "decode_step_s": 0.08},
            {"prompt_tokens": 1024, "prefill_s": 1.6, "decode_step_s": 0.10}]
    # served compute = 1.1 x bare + 0.05 s fixed; TTFT adds a pull and two 3 ms hops
    mesh = [mesh_point(256, 1.1 * 0.4 + 0.05 + 0.004 + 0.006, 0.004, 0.088),
            mesh_point(1024, 1.1 * 1.6 + 0.05 + 0.012 + 0.006, 0.012, 0.12)]
    out = overheads(mesh, bare, rpc_s=0.003)
    assert out["prefill_overhead"] == pytest.approx((1.1 * 2.0 + 0.1) / 2.0, abs=1e-3)
    assert out["prefill_affine_fit"] == pytest.approx({"fixed_s": 0.05, "factor": 1.1}, abs=1e-3)
    assert out["prefill_ratio_by_length"][256] > out["prefill_ratio_by_length"][1024]  # the fixed part
    assert out["decode_overhead"] == pytest.approx(0.104 / 0.09, abs=1e-3)  # median over median


def test_transfer_fit_recovers_latency_and_bandwidth_from_remote_pulls_only():
    mesh = [mesh_point(n, 1.0, 0.001 + n * 1e-5, 0.1) for n in (256, 512, 1024)]
    mesh.append(mesh_point(2048, 1.0, 0.0, 0.1, decision="local_prefill"))
    fit = transfer_fit(mesh, kv_bytes_per_token=36864)
    assert fit["transfer_latency_s"] == pytest.approx(0.001, abs=1e-5)
    assert fit["transfer_bytes_per_s"] == pytest.approx(36864 / 1e-5, rel=1e-3)
    assert transfer_fit(mesh[:1], 36864) is None  # one length: no fit


def test_serving_only_keeps_the_transfer_numbers_when_no_pull_fit_came_out():
    serving = {"prefill_overhead": 1.1, "decode_overhead": 1.2, "transfer": None}
    assert serving_coefficients(serving) == {"prefill_overhead": 1.1, "decode_overhead": 1.2}
    fitted = serving_coefficients(serving | {"transfer": {"transfer_latency_s": 0.001, "transfer_bytes_per_s": 3e9}})
    assert fitted["transfer_bytes_per_s"] == 3e9
