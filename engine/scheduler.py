"""Continuous batching: which sequences advance in the next step, and by how many tokens.

Invariant: every running sequence holds blocks covering its computed tokens; a step advances
each scheduled sequence's num_computed_tokens by its query length, and a sequence samples a new
token exactly when that reaches num_tokens. Sequences join (admission) and leave (finish, abort,
preemption) only between steps. `running` and `waiting` are both ordered by priority (lower
rank first: interactive before batch), then by arrival.

One step is one mixed batch under max_num_batched_tokens:
  1. a waiting sequence more urgent than some running one takes a slot and blocks first,
     preempting the least urgent, newest running sequences (never one as urgent as itself);
  2. running sequences, most urgent first (a decoding one needs 1 token, one mid-prompt takes
     the next chunk);
  3. waiting sequences are admitted while there is budget, a slot and KV room.
While a sequence more urgent than some running one still has prompt tokens to compute, the
step carries only sequences as urgent as it (`urgent_floor`): a live prompt runs without the
batch decodes beside it, so its first token comes as fast as on an idle worker; the batch
sequences lose that one step. A step that carries less urgent work and no prompt of the
arrival's class may be abandoned mid-way when a more urgent request arrives
(`interruptible_by`; the engine runs it again): the arrival's prompt runs next instead of
after it. A step carrying such a prompt always completes, so a stream of arrivals cannot stall
the engine: each cut is followed by a step that completes. While a more urgent sequence runs,
less urgent prompts share max_prompt_tokens_beside_urgent tokens a step (chunked), so the live
decode steps stay short.
Prompts first: a step carries prompt work alone while sequences wait to decode, but only prompts
at least as urgent as every waiting decode (a batch prompt never holds up a live decode), at most
max_prompt_only_steps such steps in a row (then one step is mixed as above; 0: never), and, by
default (prompts_first="by_cost"), only when it lowers the summed latency by the engine's own
measured step costs (engine/step_cost.py: W waiting prompts go first when W times a decode's cost
exceeds a step's fixed cost). A burst arriving while others decode then gets its first tokens
sooner on a model whose decodes cost much per sequence (the tiny model: ~0.5-1 ms each for the
262k-entry LM head), and the usual mixed step runs where a step's fixed cost dominates (the real
model on a CPU reads all its weights per step, so a prompt computed alone pays for a step the
decodes' step would have carried). prompts_first="always" skips the cost test.
When a running sequence cannot grow, the least urgent, newest running one is preempted.
A preempted sequence's KV is swapped to the host tier when it has room (it resumes with the
same bytes, so its output is exactly what it would have been), else its blocks are freed and
it is recomputed later (its full blocks usually survive in the prefix cache).
"""

from collections import deque
from itertools import chain
from typing import NamedTuple

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sequence import Sequence, SequenceStatus
from engine.step_cost import StepCostModel
from engine.swap import HostSwapTier


class ScheduledBatch(NamedTuple):
    """seqs[i] computes its tokens [num_computed_tokens, num_computed_tokens + query_lens[i])."""

    seqs: list[Sequence]
    query_lens: list[int]


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, swap: HostSwapTier | None = None):
        self.config = config
        self.block_manager = block_manager
        self.swap = swap
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._beside_urgent_left = 0  # less urgent prompt tokens the step being built may still take
        self._prompt_only_steps = 0  # prompt-only steps in a row that left a decode waiting
        self.step_costs = StepCostModel()  # the engine reports each step's cost (observe)

    def add(self, seq: Sequence) -> None:
        """Queues seq (it may already hold blocks, e.g. an imported prompt)."""
        seq.status = SequenceStatus.WAITING
        _insert(self.waiting, seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Takes an unfinished seq out of the queues (the caller frees or keeps its blocks)."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
            if self.swap is not None:
                self.swap.discard(seq)

    def schedule(self) -> ScheduledBatch:
        """Picks the next step's batch; admits and preempts as a side effect."""
        batch = ScheduledBatch([], [])
        self._admit_urgent()
        floor = self.urgent_floor()
        self._beside_urgent_left = self.config.max_prompt_tokens_beside_urgent
        budget = self.config.max_num_batched_tokens
        cap = self._prompts_first_cap(floor)
        if cap is not None:
            self._admit_waiting(batch, self._schedule_running(batch, budget, cap, prompts_only=True), cap)
            if batch.seqs:
                self._prompt_only_steps += 1
                return batch
        self._prompt_only_steps = 0
        budget = self._schedule_running(batch, budget, floor)
        self._admit_waiting(batch, budget, floor)
        return batch

    @property
    def prompt_only_step(self) -> bool:
        """Whether the batch schedule() returned last carries prompts first."""
        return self._prompt_only_steps > 0

    def urgent_floor(self) -> int | None:
        """The least urgent rank the next step may carry: the rank of the most urgent sequence
        with prompt tokens to compute when some running sequence is less urgent than it, else
        None (no limit)."""
        prompts = [s.priority for s in chain(self.running, self.waiting) if _computes_prompt(s)]
        if not prompts or not self.running or min(prompts) >= self.running[-1].priority:
            return None
        return min(prompts)

    def _prompts_first_cap(self, floor: int | None) -> int | None:
        """The least urgent rank a prompt-only step may carry: no less urgent than any sequence
        waiting to decode (nor than floor). None, and a mixed step, when prompts first is off, its
        steps in a row are used up, nothing waits to decode, or (by cost) the prompts it would
        carry save less latency than the decodes would lose (StepCostModel.prompts_first_pays)."""
        if self._prompt_only_steps >= self.config.max_prompt_only_steps:
            return None
        cap = min((s.priority for s in self.running if not _computes_prompt(s)), default=None)
        if cap is None:
            return None
        cap = cap if floor is None else min(floor, cap)
        if self.config.prompts_first == "by_cost":
            prompts = self._prompts_within(cap)
            if not prompts or not self.step_costs.prompts_first_pays(prompts):
                return None
        return cap

    def _prompts_within(self, cap: int) -> int:
        """Sequences at least as urgent as cap that a prompt-only step could carry: the running
        ones mid-prompt, and waiting ones up to the free sequence slots."""
        running = sum(1 for s in self.running if s.priority <= cap and _computes_prompt(s))
        room = self.config.max_num_seqs - len(self.running)
        waiting = 0
        for seq in self.waiting:  # ordered by rank: stop at the first less urgent one
            if waiting >= room or seq.priority > cap:
                break
            waiting += 1
        return running + waiting

    @staticmethod
    def interruptible_by(batch: ScheduledBatch, priority: int) -> bool:
        """Whether a request of rank `priority` arriving now may abandon this step (asked before
        the step advances anything): when it carries work less urgent than the arrival and no
        sequence at least as urgent is computing prompt tokens. (Decodes as urgent as the
        arrival lose the step too: they run again with the arrival's prompt.)"""
        return any(s.priority > priority for s in batch.seqs) and not any(
            s.priority <= priority and (n > 1 or _computes_prompt(s)) for s, n in zip(batch.seqs, batch.query_lens))

    def free_blocks_for(self, num_blocks: int, priority: int) -> bool:
        """Preempts running sequences less urgent than `priority` until num_blocks blocks are
        free beside one per running sequence (room for decodes to grow). For KV imports."""
        while num_blocks + len(self.running) > self.block_manager.num_free_blocks:
            if not self.running or self.running[-1].priority <= priority:
                return False
            self._preempt(self.running[-1])
        return True

    def _admit_urgent(self) -> None:
        for seq in list(self.waiting):
            if not self.running or self.running[-1].priority <= seq.priority:
                return  # nothing less urgent to make room from; normal admission handles seq
            while not (len(self.running) < self.config.max_num_seqs and self._admit(seq)):
                if not self.running or self.running[-1].priority <= seq.priority:
                    return
                self._preempt(self.running[-1])
            self.waiting.remove(seq)
            _insert(self.running, seq)

    def _schedule_running(self, batch: ScheduledBatch, budget: int, floor: int | None,
                          prompts_only: bool = False) -> int:
        for seq in list(self.running):
            if budget == 0 or (floor is not None and seq.priority > floor):
                break
            if prompts_only and not _computes_prompt(seq):
                continue
            if seq in self.running and self._make_room(seq):  # else seq itself was preempted
                budget -= self._take(batch, seq, budget)
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int, floor: int | None) -> None:
        blocked = False
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs or \
                    (floor is not None and seq.priority > floor):
                return
            # First come first served within a class, except that sequences already holding
            # their blocks (imports) may pass a blocked one: they free blocks by finishing.
            if (blocked and not seq.block_table) or not self._admit(seq):
                blocked = True
                continue
            self.waiting.remove(seq)
            _insert(self.running, seq)
            budget -= self._take(batch, seq, budget)

    def _take(self, batch: ScheduledBatch, seq: Sequence, budget: int) -> int:
        take = min(seq.num_uncomputed_tokens, budget)
        if _computes_prompt(seq) and self.running[0].priority < seq.priority:  # running[0]: most urgent
            take = min(take, self._beside_urgent_left)
            self._beside_urgent_left -= take
        if take:
            batch.seqs.append(seq)
            batch.query_lens.append(take)
        return take

    def finish(self, seq: Sequence) -> None:
        """Removes a finished running seq (the caller frees or keeps its blocks)."""
        self.running.remove(seq)

    def _admit(self, seq: Sequence) -> bool:
        bm = self.block_manager
        if self.swap is not None and self.swap.holds(seq):
            needed = -(-seq.num_tokens // bm.block_size)
            if needed > bm.num_free_blocks:
                return False
            self.swap.swap_in(seq, bm.allocate_blocks(needed))
        elif seq.block_table:
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
        """Grows seq's blocks to cover its tokens, preempting the least urgent, newest running
        sequences; False when seq itself had to be preempted."""
        while not self.block_manager.may_append(seq):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.block_manager.append_slot(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if self.swap is not None and seq.num_computed_tokens:
            self.swap.swap_out(seq, self.block_manager.block_size)  # False: no room, recompute instead
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        _insert(self.waiting, seq, ahead_of_equals=True)


def _computes_prompt(seq: Sequence) -> bool:
    """Whether seq's next step computes prompt tokens (or recomputes several), not one decode."""
    return seq.num_computed_tokens < seq.num_prompt_tokens or seq.num_uncomputed_tokens > 1


def _insert(queue, seq: Sequence, ahead_of_equals: bool = False) -> None:
    """Inserts seq after every less-or-equally urgent entry (before equals if ahead_of_equals:
    a preempted sequence resumes first within its class)."""
    index = len(queue)
    while index > 0 and (queue[index - 1].priority > seq.priority or
                         (ahead_of_equals and queue[index - 1].priority == seq.priority)):
        index -= 1
    queue.insert(index, seq)
