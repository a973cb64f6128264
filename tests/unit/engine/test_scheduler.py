"""The scheduler alone (no model): budgets, admission order and preemption."""

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import PRIORITY_BATCH, Sequence
from tests.unit.engine.steps import finish_step, run_steps

BS = 4


def _scheduler(num_blocks=32, max_num_seqs=4, max_batched=64):
    return Scheduler(SchedulerConfig(max_num_seqs, 256, max_batched), BlockManager(num_blocks, BS))


def _seq(rid, n):
    return Sequence(rid, list(range(100, 100 + n)), SamplingParams(), max_tokens=50)


def test_prompts_are_chunked_to_the_token_budget():
    s = _scheduler(max_batched=10)
    s.add(_seq("a", 8))
    s.add(_seq("b", 8))
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["a", "b"] and batch.query_lens == [8, 2]
    finish_step(batch)
    batch = s.schedule()  # a decodes (1 token), b continues its prompt
    assert batch.query_lens == [1, 6]


def test_max_num_seqs_limits_admission():
    s = _scheduler(max_num_seqs=2)
    for rid in "abc":
        s.add(_seq(rid, 3))
    assert [q.request_id for q in s.schedule().seqs] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"]


def test_preempts_newest_when_decode_cannot_grow():
    s = _scheduler(num_blocks=2)
    a, b = _seq("a", 4), _seq("b", 4)
    s.add(a)
    s.add(b)
    finish_step(s.schedule())  # both fill their only block and get a 5th token
    batch = s.schedule()  # a needs a new block: b is preempted to make room
    assert batch.seqs == [a] and len(a.block_table) == 2
    assert list(s.waiting) == [b] and b.block_table == [] and b.num_computed_tokens == 0


def test_import_holding_blocks_passes_a_blocked_prompt():
    s = _scheduler(num_blocks=4)
    big = _seq("big", 16)  # needs all 4 blocks
    imported = _seq("imp", 4)
    imported.block_table = s.block_manager.allocate_blocks(1)
    imported.num_computed_tokens = 4
    imported.token_ids.append(7)
    s.add(big)
    s.add(imported)
    batch = s.schedule()
    assert batch.seqs == [imported] and batch.query_lens == [1]
    assert list(s.waiting) == [big]


# -- prompts first (max_prompt_only_steps) ----------------------------------------------------

def _prompts_first(max_steps, max_batched=8, max_num_seqs=8, prompts_first="always"):
    config = SchedulerConfig(max_num_seqs, 256, max_batched, max_prompt_only_steps=max_steps,
                             prompts_first=prompts_first)
    return Scheduler(config, BlockManager(64, BS))


def _taught(s, fixed_s, per_decode_s):
    """s's step cost model after decode steps of 1 to 16 sequences that cost fixed + n * per_decode."""
    for n in [*range(1, 17)] * 2:
        s.step_costs.observe(n, n, fixed_s + n * per_decode_s)
    return s


def _a_decodes_then(s, arrivals: str):
    """a's prompt and first token are done (it decodes from now on); then 8-token prompts arrive."""
    s.add(_seq("a", 4))
    run_steps(s, 1)
    for rid in arrivals:
        s.add(_seq(rid, 8))
    return s


def test_decodes_first_by_default_every_step_carries_the_running_decodes():
    s = _a_decodes_then(_scheduler(max_batched=8), "bc")
    assert run_steps(s, 2) == [[("a", 1), ("b", 7)], [("a", 1), ("b", 1), ("c", 6)]]


def test_prompts_first_computes_waiting_prompts_alone_while_running_sequences_wait():
    s = _a_decodes_then(_prompts_first(max_steps=8), "bc")
    # b and c take whole steps; a (decoding) waits until no prompt is left
    assert run_steps(s, 3) == [[("b", 8)], [("c", 8)], [("a", 1), ("b", 1), ("c", 1)]]


def test_prompts_first_decodes_everyone_after_max_prompt_only_steps_in_a_row():
    s = _a_decodes_then(_prompts_first(max_steps=2), "bcde")
    steps = run_steps(s, 6)
    assert steps[:2] == [[("b", 8)], [("c", 8)]]
    assert steps[2] == [("a", 1), ("b", 1), ("c", 1), ("d", 5)]  # the bound: a mixed step, decodes first
    assert steps[3:5] == [[("d", 3), ("e", 5)], [("e", 3)]]  # prompts first again
    assert steps[5] == [("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)]  # no prompt left: all decode


def test_prompts_first_never_puts_a_batch_prompt_before_a_live_decode():
    s = _prompts_first(max_steps=8)
    s.add(_seq("live", 4))
    run_steps(s, 1)
    s.add(Sequence("batch", list(range(100, 108)), SamplingParams(), max_tokens=50, priority=PRIORITY_BATCH))
    # the live decode runs in every step; the batch prompt shares what is left
    # (max_prompt_tokens_beside_urgent, 16 by default, caps it per step)
    assert run_steps(s, 1) == [[("live", 1), ("batch", 7)]]


def test_prompts_first_with_nothing_waiting_to_decode_is_the_usual_step():
    s, usual = _prompts_first(max_steps=4, max_batched=4), _scheduler(max_num_seqs=8, max_batched=4)
    for scheduler in (s, usual):
        scheduler.add(_seq("a", 6))
    assert run_steps(s, 3) == run_steps(usual, 3) == [[("a", 4)], [("a", 2)], [("a", 1)]]


# -- prompts first by cost (the default) --------------------------------------------------------

def test_by_cost_decodes_first_until_the_engine_has_measured_its_steps():
    s = _a_decodes_then(_prompts_first(max_steps=4, prompts_first="by_cost"), "bc")
    assert run_steps(s, 1) == [[("a", 1), ("b", 7)]]  # no step costs yet: the usual mixed step


def test_by_cost_prompts_go_first_when_their_decode_share_outweighs_a_steps_fixed_cost():
    # tiny-model-like costs: fixed 3 ms, 2 ms per decode; 2 waiting prompts x 2 ms > 3 ms
    s = _a_decodes_then(_taught(_prompts_first(max_steps=4, prompts_first="by_cost"), 0.003, 0.002), "bc")
    assert run_steps(s, 1) == [[("b", 8)]]


def test_by_cost_one_prompt_rides_in_the_decodes_step_when_a_step_costs_more_than_a_decode():
    # 1 waiting prompt x 2 ms < 3 ms fixed: computing it alone would cost the decodes a step
    s = _a_decodes_then(_taught(_prompts_first(max_steps=4, prompts_first="by_cost"), 0.003, 0.002), "b")
    assert run_steps(s, 1) == [[("a", 1), ("b", 7)]]


def test_by_cost_weight_bound_steps_keep_a_few_prompts_in_the_mixed_step():
    # the real model on this CPU (sim/profiles/cpu-local.yaml): fixed ~85 ms, ~7.4 ms per decode;
    # 3 waiting prompts save 3 x 7.4 ms each decode step they skip, against 85 ms for the decodes
    s = _a_decodes_then(_taught(_prompts_first(max_steps=4, prompts_first="by_cost"), 0.085, 0.0074), "bcd")
    assert run_steps(s, 1)[0][0] == ("a", 1)
