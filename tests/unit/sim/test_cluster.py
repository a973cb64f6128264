"""The event loop against hand-computed answers, and determinism with a seed.

Costs are powers of two so every time below is exact in floating point."""

import dataclasses

import pytest

from sim.cluster import Cluster
from sim.costs import CostModel
from sim.metrics import Slo, summarize
from sim.trace import Request, shared_prefix

FIXED = CostModel("fixed", prefill_base_s=0.0, prefill_per_token_s=2**-10, prefill_per_token_ctx_s=0.0,
                  decode_base_s=2**-7, decode_per_seq_s=2**-7, decode_per_ctx_token_s=0.0,
                  transfer_latency_s=2**-5, transfer_bytes_per_s=2.0**60, kv_bytes_per_token=1,
                  kv_capacity_tokens=4096, max_batch=8)


def request(i, arrival, prompt, output):
    return Request(f"r{i}", arrival, prompt, output, tuple(range(1000 * i, 1000 * i + prompt // 16)), 16)


def test_one_request_ttft_is_prefill_plus_transfer():
    cluster = Cluster(FIXED, 1, 1, "round_robin", block_size=16)
    [job] = cluster.run([request(1, 0.0, 128, 3)])
    assert job.first_token_s == pytest.approx(128 * 2**-10 + 2**-5)  # 0.125 + 0.03125
    assert job.end_s == pytest.approx(job.first_token_s + 2 * 2**-6)  # two decode steps at batch 1
    assert job.prefill_id == "prefill-0" and job.decode_id == "decode-0"


def test_two_arrivals_queue_on_prefill_then_batch_on_decode():
    costs = dataclasses.replace(FIXED, transfer_latency_s=3 * 2**-7)  # a pull is 1.5 decode steps
    cluster = Cluster(costs, 1, 1, "round_robin", block_size=16)
    first, second = cluster.run([request(1, 0.0, 96, 41), request(2, 0.26, 136, 5)])
    steps_from = 96 * 2**-10 + 3 * 2**-7  # the first's first token; its decode steps of 1/64 s follow
    assert first.first_token_s == pytest.approx(steps_from)
    # The second prefills alone (until 0.3928125, in the first's 18th step); the decode engine
    # reserves its blocks when that step ends, the pull ends in the 20th step, and add_imported
    # runs when that one ends: the run is cut there and the second joins the next step.
    joined = steps_from + 20 * 2**-6
    assert second.first_token_s == pytest.approx(joined)
    # 4 steps at batch 2 (3/128 s each) finish the second; the first needs 16 more at batch 1.
    assert second.end_s == pytest.approx(joined + 4 * 3 * 2**-7)
    assert first.end_s == pytest.approx(joined + 4 * 3 * 2**-7 + 16 * 2**-6)
    stats = summarize([first, second], cluster, Slo(ttft_s=0.15, tpot_s=1.0))
    assert stats["completed"] == 2 and stats["slo_attainment"] == 0.5  # the second's TTFT is 0.17


def test_a_finished_prompts_collect_runs_with_the_calls_queued_during_its_step():
    # The prefill service collects a finished prompt's blocks with a call into the engine thread
    # a moment after the step; the thread first runs the calls queued meanwhile (the second
    # prompt's add_request), and the collect makes it into that batch: no wait.
    cluster = Cluster(FIXED, 1, 1, "round_robin", block_size=16)
    first, second = cluster.run([request(1, 0.0, 128, 2), request(2, 0.0625, 136, 2)])
    assert first.first_token_s == pytest.approx(128 * 2**-10 + 2**-5)
    assert second.first_token_s == pytest.approx(264 * 2**-10 + 2**-5)


def test_a_finished_prompts_collect_waits_when_the_engine_steps_on_without_calls():
    # The second prompt was queued before the first's step (no room in its token budget), so
    # nothing is queued for the engine thread when that step ends: it goes straight into the
    # second's step, and the first's collect (its RPC's return) waits for that step to end.
    costs = dataclasses.replace(FIXED, prefill_chunk_tokens=128)
    cluster = Cluster(costs, 1, 1, "round_robin", block_size=16)
    first, second = cluster.run([request(1, 0.0, 128, 2), request(2, 0.0, 64, 2)])
    both_prefilled = 192 * 2**-10
    assert first.first_token_s == pytest.approx(both_prefilled + 2**-5)
    assert second.first_token_s == pytest.approx(both_prefilled + 2 * 2**-5)  # its pull waits for the link


def test_an_imported_prompt_waits_for_the_decode_step_in_flight_twice():
    # reserve_for_import and add_imported are calls into the decode engine thread: each runs
    # only between two steps, so the pull starts, and the first token goes out, at step ends.
    costs = dataclasses.replace(FIXED, transfer_latency_s=3 * 2**-7)  # a pull is 1.5 decode steps
    cluster = Cluster(costs, 1, 1, "round_robin", block_size=16)
    a, b = cluster.run([request(1, 0.0, 128, 21), request(2, 0.2, 64, 2)])
    steps_from = 0.125 + 3 * 2**-7  # a's first token: its decode steps of 1/64 s start here
    assert a.first_token_s == pytest.approx(steps_from)
    prefilled = 0.2 + 64 * 2**-10  # 0.2625, in a's 8th step (ends 0.2734375)
    reserved = steps_from + 8 * 2**-6
    assert reserved > prefilled
    pulled = reserved + 3 * 2**-7  # 0.296875, in the 10th step (ends 0.3046875)
    assert b.first_token_s == pytest.approx(steps_from + 10 * 2**-6)
    assert b.first_token_s > pulled


def test_local_prefill_reuses_the_decode_workers_cache():
    # prefix_aware prefills on the decode worker when < 128 uncached tokens: a 96-token prompt.
    cluster = Cluster(FIXED, 1, 1, "prefix_aware", block_size=16)
    a = Request("a", 0.0, 96, 2, tuple(range(6)), 16)
    b = Request("b", 1.0, 96, 2, tuple(range(6)), 16)
    ja, jb = cluster.run([a, b])
    assert ja.prefill_id == "" and ja.first_token_s == pytest.approx(96 * 2**-10)
    assert jb.cached_tokens == 80  # 5 of 6 blocks: the last token is always computed
    assert jb.first_token_s == pytest.approx(1.0 + 16 * 2**-10)


def run_shared(profile, seed):
    reqs = shared_prefix(groups=6, per_group=8, shared_tokens=2048, unique_tokens=256, output_tokens=16,
                         rate_per_s=40.0, block_size=16, seed=1)
    cluster = Cluster(FIXED, 3, 3, profile, block_size=16, seed=seed)
    jobs = cluster.run(reqs)
    return [(j.decode_id, j.prefill_id, j.first_token_s, j.end_s) for j in jobs], \
        summarize(jobs, cluster, Slo(1.0, 1.0))


def test_deterministic_with_a_seed():
    assert run_shared("random", 3) == run_shared("random", 3)
    assert run_shared("random", 3)[0] != run_shared("random", 4)[0]
    assert run_shared("prefix_aware", 5) == run_shared("prefix_aware", 5)


def test_prefix_aware_reuses_more_than_round_robin():
    _, aware = run_shared("prefix_aware", 0)
    _, rr = run_shared("round_robin", 0)
    assert aware["prefix_hit_rate"] > rr["prefix_hit_rate"] + 0.2
    assert aware["ttft_p50_s"] < rr["ttft_p50_s"]


def test_prompts_arriving_together_prefill_in_one_step():
    cluster = Cluster(FIXED, 1, 1, "round_robin", block_size=16)
    a, b = cluster.run([request(1, 0.0, 128, 2), request(2, 0.0, 64, 2)])
    assert a.first_token_s == pytest.approx(192 * 2**-10 + 2**-5)  # one step of 192 tokens, then the pull
    assert b.first_token_s == pytest.approx(192 * 2**-10 + 2 * 2**-5)  # its pull waits for the link


def test_long_prompts_are_chunked_at_the_token_budget():
    costs = dataclasses.replace(FIXED, prefill_chunk_tokens=128)
    cluster = Cluster(costs, 1, 1, "round_robin", block_size=16)
    a, b = cluster.run([request(1, 0.0, 256, 2), request(2, 0.0, 64, 2)])
    # a's two full chunks, then b's step (admitted once the budget allows), which a's collect
    # waits for; b's pull waits for a's on the link.
    assert a.first_token_s == pytest.approx(320 * 2**-10 + 2**-5)
    assert b.first_token_s == pytest.approx(320 * 2**-10 + 2 * 2**-5)


def test_a_local_prefill_joining_a_decoding_batch_pays_the_steps_fixed_cost_once():
    costs = dataclasses.replace(FIXED, prefill_base_s=2**-4)
    cluster = Cluster(costs, 1, 1, "prefix_aware", block_size=16)  # prompts < 128 tokens prefill locally
    a = Request("a", 0.0, 96, 10, tuple(range(6)), 16)
    b = Request("b", 0.15625 + 2.5 * 2**-6, 32, 2, (100, 101), 16)  # mid-way through a's third decode step
    ja, jb = cluster.run([a, b])
    assert ja.first_token_s == pytest.approx(2**-4 + 96 * 2**-10)  # alone: the prefill's fixed cost
    # b waits for the step in progress (ends 0.203125), then one pass: a's decode step at batch 1
    # (1/64 s) plus b's 32 prompt tokens (1/32 s); no second fixed cost.
    assert jb.prefill_id == "" and jb.first_token_s == pytest.approx(0.203125 + 2**-6 + 2**-5)


def test_prompts_waiting_beside_decodes_go_first_when_the_engines_rule_says_it_pays():
    # FIXED: a decode costs its step's fixed cost (2**-7 each), so 2 waiting prompts pay for a
    # prompt-only step (engine/step_cost.py); 1 rides in the decodes' mixed step.
    cluster = Cluster(FIXED, 1, 1, "prefix_aware", block_size=16)  # prompts < 128 tokens prefill locally
    a = Request("a", 0.0, 96, 10, tuple(range(6)), 16)
    b = Request("b", 0.09375 + 2.5 * 2**-6, 32, 2, (100, 101), 16)  # mid-way through a's third decode step
    c = Request("c", b.arrival_s, 32, 2, (200, 201), 16)
    ja, jb, jc = cluster.run([a, b, c])
    assert ja.first_token_s == pytest.approx(0.09375)
    # the step in flight ends at 0.140625; b alone (32 tokens, 1/32 s) while a waits; then c, the
    # only prompt left, in one mixed step with a's and b's decodes (3/128 s + 1/32 s)
    assert jb.first_token_s == pytest.approx(0.140625 + 2**-5)
    assert jc.first_token_s == pytest.approx(0.140625 + 2**-5 + 3 * 2**-7 + 2**-5)
    # decodes first would have given b its token after a mixed step (1/64 + 1/32 s), c after another
    assert jb.first_token_s < 0.140625 + 2**-6 + 2**-5


def test_a_request_no_decode_worker_can_take_is_rejected_not_a_crash():
    # The first request fills the only decode worker's KV cache past has_capacity's 95% while it
    # decodes; the real router answers the second with RESOURCE_EXHAUSTED, the simulator rejects it.
    cluster = Cluster(FIXED, 1, 1, "prefix_aware", block_size=16)
    big, small = cluster.run([request(1, 0.0, 4000, 64), request(2, 4.5, 64, 4)])
    assert not big.rejected and big.end_s is not None
    assert "none passed the filters" in small.rejected and small.first_token_s is None
    assert summarize([big, small], cluster, Slo(ttft_s=10.0, tpot_s=1.0))["rejected"] == 1
