"""The scheduler alone (no model): budgets, admission order and preemption."""

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from tests.unit.engine.steps import finish_step

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
