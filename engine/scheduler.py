"""Continuous batching: which sequences advance in the next step, and by how many tokens.

Invariant: every running sequence holds blocks covering its computed tokens; a step advances
each scheduled sequence's num_computed_tokens by its query length, and a sequence samples a new
token exactly when that reaches num_tokens. Sequences join (admission) and leave (finish, abort,
preemption) only between steps.

One step is one mixed batch under max_num_batched_tokens: running sequences first, in arrival
order (a decoding one needs 1 token, one mid-prompt takes the next chunk), then waiting ones are
admitted while there is budget, a sequence slot and KV room. When a running sequence cannot
grow, the most recently admitted one is preempted: its blocks are freed and it is recomputed
later (its cached prefix blocks usually survive in the prefix cache).
"""

from collections import deque
from typing import NamedTuple

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sequence import Sequence, SequenceStatus


class ScheduledBatch(NamedTuple):
    """seqs[i] computes its tokens [num_computed_tokens, num_computed_tokens + query_lens[i])."""

    seqs: list[Sequence]
    query_lens: list[int]


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queues seq (it may already hold blocks, e.g. an imported prompt)."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Takes an unfinished seq out of the queues (the caller frees or keeps its blocks)."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)

    def schedule(self) -> ScheduledBatch:
        """Picks the next step's batch; admits and preempts as a side effect."""
        batch = ScheduledBatch([], [])
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
        self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq in self.running and self._make_room(seq):  # else seq itself was preempted
                budget -= self._take(batch, seq, budget)
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        blocked = False
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                return
            # First come first served, except that sequences already holding their blocks
            # (imports) may pass a blocked one: they free blocks by finishing.
            if (blocked and not seq.block_table) or not self._admit(seq):
                blocked = True
                continue
            self.waiting.remove(seq)
            self.running.append(seq)
            budget -= self._take(batch, seq, budget)

    @staticmethod
    def _take(batch: ScheduledBatch, seq: Sequence, budget: int) -> int:
        take = min(seq.num_uncomputed_tokens, budget)
        batch.seqs.append(seq)
        batch.query_lens.append(take)
        return take

    def finish(self, seq: Sequence) -> None:
        """Removes a finished running seq (the caller frees or keeps its blocks)."""
        self.running.remove(seq)

    def _admit(self, seq: Sequence) -> bool:
        bm = self.block_manager
        if seq.block_table:
            if not bm.may_append(seq):
                return False
            bm.append_slot(seq)
        elif bm.can_allocate(seq):
            bm.allocate(seq)
        else:
            return False
        seq.status = SequenceStatus.RUNNING
        return True

    def _make_room(self, seq: Sequence) -> bool:
        """Grows seq's blocks to cover its tokens, preempting the newest running sequences;
        False when seq itself had to be preempted."""
        while not self.block_manager.may_append(seq):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.block_manager.append_slot(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
