"""Priority classes in the engine: interactive sequences go first, running batch sequences are
preempted for them (KV swapped to the host tier) and resume with exactly the tokens they would
have produced without the interruption."""

import random

import pytest

from engine.block_manager import BlockManager
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import PRIORITY_BATCH, PRIORITY_INTERACTIVE, Sequence
from tests.unit.engine.steps import finish_step, run_steps

BS = 4
GREEDY = SamplingParams()


def _prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 5000) for _ in range(n)]


def _engine(model, model_cfg, num_blocks=64, max_num_seqs=8, swap_blocks=256):
    return LLMEngine(EngineConfig(model=model_cfg, cache=CacheConfig(BS, num_blocks, swap_blocks=swap_blocks),
                                  scheduler=SchedulerConfig(max_num_seqs, 128, 256)), model=model)


def _step(engine, tokens):
    for out in engine.step():
        if out.token_id is not None:
            tokens.setdefault(out.request_id, []).append(out.token_id)


def _run(engine, tokens, max_steps=1000):
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return tokens
        _step(engine, tokens)
    raise AssertionError("engine did not finish")


def _alone(model, model_cfg, prompt, n):
    engine = _engine(model, model_cfg)
    engine.add_request("solo", prompt, GREEDY, n, ignore_eos=True)
    return _run(engine, {})["solo"]


# -- the scheduler alone ---------------------------------------------------------------------

def _seq(rid, n, priority):
    return Sequence(rid, list(range(100, 100 + n)), SamplingParams(), max_tokens=50, priority=priority)


def test_interactive_is_admitted_ahead_of_a_queued_batch_backlog():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_model_len=256, max_num_batched_tokens=64), BlockManager(64, BS))
    for i in range(4):
        s.add(_seq(f"batch{i}", 6, PRIORITY_BATCH))
    s.add(_seq("live", 6, PRIORITY_INTERACTIVE))
    assert [q.request_id for q in s.waiting] == ["live", "batch0", "batch1", "batch2", "batch3"]
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["live", "batch0"]


def test_a_running_batch_sequence_gives_its_slot_to_interactive():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_model_len=256, max_num_batched_tokens=64), BlockManager(64, BS))
    s.add(_seq("batch0", 6, PRIORITY_BATCH))
    s.add(_seq("batch1", 6, PRIORITY_BATCH))
    s.schedule()
    s.add(_seq("live", 6, PRIORITY_INTERACTIVE))
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["live"]  # its prompt runs alone (see below)
    assert [q.request_id for q in s.running] == ["live", "batch0"]
    assert [q.request_id for q in s.waiting] == ["batch1"] and s.num_preemptions == 1


def test_an_interactive_prompt_runs_alone_then_decodes_beside_batch():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64), BlockManager(64, BS))
    for i in range(2):
        s.add(_seq(f"batch{i}", 6, PRIORITY_BATCH))
    finish_step(s.schedule())  # both batch prompts, then they decode
    s.add(_seq("live", 10, PRIORITY_INTERACTIVE))
    s.add(_seq("batch2", 6, PRIORITY_BATCH))
    assert s.urgent_floor() == PRIORITY_INTERACTIVE
    first = s.schedule()
    assert [q.request_id for q in first.seqs] == ["live"] and first.query_lens == [10]
    finish_step(first)
    assert s.urgent_floor() is None  # live decodes now: batch shares the step again
    second = s.schedule()
    assert [q.request_id for q in second.seqs] == ["live", "batch0", "batch1", "batch2"]
    assert second.query_lens == [1, 1, 1, 6] and s.num_preemptions == 0


def test_a_chunked_interactive_prompt_keeps_batch_out_until_its_last_chunk():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=8), BlockManager(64, BS))
    s.add(_seq("batch", 4, PRIORITY_BATCH))
    finish_step(s.schedule())
    s.add(_seq("live", 20, PRIORITY_INTERACTIVE))
    steps = run_steps(s, 4)
    assert steps == [[("live", 8)], [("live", 8)], [("live", 4)], [("live", 1), ("batch", 1)]]


def _in_step(kind: str, i: int) -> tuple[Sequence, int]:
    """A sequence as a step would carry it: "<class> prompt" (8 prompt tokens to compute) or
    "<class> decode" (one token), and its query length."""
    klass, phase = kind.split()
    seq = _seq(f"{klass}{i}", 8, {"batch": PRIORITY_BATCH, "live": PRIORITY_INTERACTIVE}[klass])
    if phase == "decode":
        seq.num_computed_tokens = 8
        seq.token_ids.append(7)
    return seq, seq.num_uncomputed_tokens


@pytest.mark.parametrize("step, arrival, cut", [
    (["batch decode", "batch prompt"], PRIORITY_INTERACTIVE, True),  # a live arrival cuts batch work
    (["live decode", "batch decode"], PRIORITY_INTERACTIVE, True),   # ... beside live decodes too
    (["live prompt", "batch decode"], PRIORITY_INTERACTIVE, False),  # a step with a live prompt completes
    (["live decode", "live decode"], PRIORITY_INTERACTIVE, False),   # nothing less urgent to postpone
    (["batch decode", "batch decode"], PRIORITY_BATCH, False),       # batch never cuts batch
    ([], PRIORITY_INTERACTIVE, False),
])
def test_which_steps_an_arrival_may_interrupt(step, arrival, cut):
    seqs, query_lens = zip(*(_in_step(kind, i) for i, kind in enumerate(step))) if step else ((), ())
    assert Scheduler.interruptible_by(ScheduledBatch(list(seqs), list(query_lens)), arrival) is cut


def test_interactive_never_preempted_for_batch():
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_model_len=256, max_num_batched_tokens=64), BlockManager(64, BS))
    s.add(_seq("live", 6, PRIORITY_INTERACTIVE))
    s.schedule()
    s.add(_seq("batch", 6, PRIORITY_BATCH))
    assert [q.request_id for q in s.schedule().seqs] == ["live"] and s.num_preemptions == 0


# -- the engine: exact output after preemption -----------------------------------------------

@pytest.mark.parametrize("swap_blocks", [256, 0], ids=["swap", "recompute"])
def test_preempted_batch_resumes_with_identical_tokens(tiny_model, tiny_config, swap_blocks):
    """Two batch requests fill both slots; an interactive burst of two preempts them mid-decode."""
    prompts = {f"batch{i}": _prompt(9 + 4 * i, i) for i in range(2)}
    live = {f"live{i}": _prompt(7 + i, 10 + i) for i in range(2)}
    engine = _engine(tiny_model, tiny_config, max_num_seqs=2, swap_blocks=swap_blocks)
    tokens = {}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY, 24, ignore_eos=True, priority=PRIORITY_BATCH)
    for _ in range(6):
        _step(engine, tokens)
    assert all(len(tokens[rid]) >= 4 for rid in prompts), "both batch requests are mid-decode"
    for rid, prompt in live.items():
        engine.add_request(rid, prompt, GREEDY, 6, ignore_eos=True, priority=PRIORITY_INTERACTIVE)
    _step(engine, tokens)
    assert engine.scheduler.num_preemptions == 2
    assert {s.request_id for s in engine.scheduler.running} == set(live)
    _run(engine, tokens)
    for rid, prompt in {**prompts, **live}.items():
        n = 24 if rid.startswith("batch") else 6
        assert tokens[rid] == _alone(tiny_model, tiny_config, prompt, n), rid
    if swap_blocks:
        assert engine.scheduler.swap.num_swaps_out == 2 and engine.scheduler.swap.num_used_blocks == 0
    assert engine.block_manager.num_used_blocks == 0


def test_kv_pressure_preempts_batch_for_an_interactive_prompt(tiny_model, tiny_config):
    """No free blocks for the interactive prompt: the batch request's KV goes to the host tier."""
    engine = _engine(tiny_model, tiny_config, num_blocks=12, max_num_seqs=4)
    tokens = {}
    batch_prompt, live_prompt = _prompt(30, 1), _prompt(21, 2)
    engine.add_request("batch", batch_prompt, GREEDY, 12, ignore_eos=True, priority=PRIORITY_BATCH)
    for _ in range(4):
        _step(engine, tokens)
    engine.add_request("live", live_prompt, GREEDY, 8, ignore_eos=True)
    _step(engine, tokens)
    assert [s.request_id for s in engine.scheduler.running] == ["live"]
    assert engine.scheduler.swap.holds(engine._unfinished["batch"])
    _run(engine, tokens)
    assert tokens["batch"] == _alone(tiny_model, tiny_config, batch_prompt, 12)
    assert tokens["live"] == _alone(tiny_model, tiny_config, live_prompt, 8)


def test_interactive_import_reservation_preempts_batch(tiny_model, tiny_config):
    engine = _engine(tiny_model, tiny_config, num_blocks=12, max_num_seqs=4)
    engine.add_request("batch", _prompt(30, 1), GREEDY, 12, ignore_eos=True, priority=PRIORITY_BATCH)
    engine.step()
    assert engine.reserve_for_import("low", 20, priority=PRIORITY_BATCH) is None  # batch waits its turn
    blocks = engine.reserve_for_import("live", 20, priority=PRIORITY_INTERACTIVE)
    assert blocks is not None and len(blocks) == 5
    assert engine.scheduler.num_preemptions == 1


def test_aborting_a_swapped_out_request_frees_its_host_copy(tiny_model, tiny_config):
    engine = _engine(tiny_model, tiny_config, max_num_seqs=1)
    engine.add_request("batch", _prompt(9, 1), GREEDY, 20, ignore_eos=True, priority=PRIORITY_BATCH)
    engine.step()
    engine.step()
    engine.add_request("live", _prompt(9, 2), GREEDY, 4, ignore_eos=True)
    engine.step()
    assert engine.scheduler.swap.num_used_blocks > 0
    assert engine.abort("batch")
    assert engine.scheduler.swap.num_used_blocks == 0
    _run(engine, {})
    assert engine.block_manager.num_used_blocks == 0


class _ArrivalAfter:
    """An arrival probe announcing an interactive request at its n-th question (0: at once)."""

    def __init__(self, n):
        self.n, self.asked = n, 0

    def __call__(self):
        self.asked += 1
        return PRIORITY_INTERACTIVE if self.asked > self.n else None


def test_an_interrupted_batch_step_advances_nothing_and_output_stays_exact(tiny_model, tiny_config):
    """Batch steps cut at every layer boundary (and before the LM head) are run again later;
    the batch requests still produce exactly their uninterrupted tokens."""
    prompts = {f"batch{i}": _prompt(9 + 5 * i, 30 + i) for i in range(2)}
    engine = _engine(tiny_model, tiny_config)
    tokens = {}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY, 12, ignore_eos=True, priority=PRIORITY_BATCH)
    layers = tiny_config.num_layers
    for cut_at in [0, layers // 2, layers] * 3:  # before the first layer, mid-way, before the LM head
        before = {rid: s.num_computed_tokens for rid, s in engine._unfinished.items()}
        assert engine.step(_ArrivalAfter(cut_at)) == []
        assert {rid: s.num_computed_tokens for rid, s in engine._unfinished.items()} == before
        _step(engine, tokens)  # the same step, not cut
    assert engine.stats.interrupted_steps == 9
    _run(engine, tokens)
    for rid, prompt in prompts.items():
        assert tokens[rid] == _alone(tiny_model, tiny_config, prompt, 12), rid


def test_a_step_with_a_live_prompt_completes_and_a_cut_live_decode_stays_exact(tiny_model, tiny_config):
    engine = _engine(tiny_model, tiny_config)
    prompts = {"batch": _prompt(9, 1), "live": _prompt(9, 2)}
    engine.add_request("batch", prompts["batch"], GREEDY, 6, ignore_eos=True, priority=PRIORITY_BATCH)
    engine.add_request("live", prompts["live"], GREEDY, 6, ignore_eos=True)
    tokens = {}
    for out in engine.step(_ArrivalAfter(0)):  # both prompts: the live one must not be cut
        tokens[out.request_id] = [out.token_id]
    assert set(tokens) == {"batch", "live"} and engine.stats.interrupted_steps == 0
    assert engine.step(_ArrivalAfter(0)) == [] and engine.stats.interrupted_steps == 1  # decodes: cut
    _run(engine, tokens)
    for rid, prompt in prompts.items():
        assert tokens[rid] == _alone(tiny_model, tiny_config, prompt, 6), rid


def test_batch_prompts_are_chunked_small_while_a_live_sequence_decodes():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64,
                                  max_prompt_tokens_beside_urgent=16), BlockManager(64, BS))
    s.add(_seq("live", 6, PRIORITY_INTERACTIVE))
    finish_step(s.schedule())  # live decodes from now on
    s.add(_seq("batch0", 20, PRIORITY_BATCH))
    s.add(_seq("batch1", 10, PRIORITY_BATCH))
    steps = run_steps(s, 4)
    assert steps == [[("live", 1), ("batch0", 16)],                  # 16 prompt tokens beside it
                     [("live", 1), ("batch0", 4), ("batch1", 10)],
                     [("live", 1), ("batch0", 1), ("batch1", 1)],
                     [("live", 1), ("batch0", 1), ("batch1", 1)]]


def test_without_a_live_sequence_batch_prompts_are_not_held_back():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64,
                                  max_prompt_tokens_beside_urgent=16), BlockManager(64, BS))
    s.add(_seq("batch0", 20, PRIORITY_BATCH))
    s.add(_seq("batch1", 10, PRIORITY_BATCH))
    assert s.schedule().query_lens == [20, 10]


def test_prompts_first_changes_when_tokens_come_not_which(tiny_model, tiny_config):
    """Arrivals while one request decodes: with prompts first, the decoder waits (its tokens are
    computed after the arrivals' first tokens, not in the same steps), and every request's tokens
    are exactly those it gets alone."""
    prompts = {f"r{i}": _prompt(20 + 3 * i, 30 + i) for i in range(6)}
    decoded_before_all_first = {}
    for max_prompt_only_steps in (0, 8):
        scheduler = SchedulerConfig(8, 128, 24, max_prompt_only_steps=max_prompt_only_steps, prompts_first="always")
        engine = LLMEngine(EngineConfig(model=tiny_config, cache=CacheConfig(BS, 64, swap_blocks=0), scheduler=scheduler),
                           model=tiny_model)
        tokens = {}
        engine.add_request("r0", prompts["r0"], GREEDY, 12, ignore_eos=True)
        _step(engine, tokens)  # r0's prompt and first token: it decodes from now on
        for rid in list(prompts)[1:]:
            engine.add_request(rid, prompts[rid], GREEDY, 8, ignore_eos=True)
        while not all(rid in tokens for rid in prompts):
            _step(engine, tokens)
        decoded_before_all_first[max_prompt_only_steps] = len(tokens["r0"]) - 1
        _run(engine, tokens)
        for rid, prompt in prompts.items():
            assert tokens[rid] == _alone(tiny_model, tiny_config, prompt, 12 if rid == "r0" else 8), rid
    # decodes first: r0 decodes in each of the arrivals' prompt steps; prompts first: in none
    assert decoded_before_all_first[0] >= 5 and decoded_before_all_first[8] == 0
