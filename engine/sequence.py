"""One request inside the engine: its tokens, how many of them have KV in the cache, its blocks."""

import time
from enum import Enum

from engine.sampling import SamplingParams


# Priority ranks: lower runs first. Interactive requests preempt batch ones; room for more classes.
PRIORITY_INTERACTIVE = 0
PRIORITY_BATCH = 1


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued; may hold blocks (an imported sequence) or not
    RUNNING = "running"  # holds blocks covering its computed tokens; scheduled every step
    FINISHED = "finished"


class Sequence:
    """Mutable state of one request. Owned by the scheduler while unfinished.

    Token layout: token_ids = prompt + generated. num_computed_tokens counts the leading tokens
    whose K/V is in the cache; the last token's K/V is only computed by the step that feeds it,
    which also samples the next token. block_hashes holds the chained hashes of the leading full
    blocks that are computed (filled in by the block manager).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                 max_tokens: int, ignore_eos: bool = False, keep_kv: bool = False,
                 priority: int = PRIORITY_INTERACTIVE):
        self.request_id = request_id
        self.priority = priority
        self.token_ids = [int(t) for t in prompt_token_ids]
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.max_tokens = int(max_tokens)
        self.ignore_eos = ignore_eos
        self.keep_kv = keep_kv
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at (last) allocation
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.queue_reported = False  # the first output carries queue_ms
        self.num_preemptions = 0

    @property
    def queue_ms(self) -> float:
        """Waiting time before the first step that scheduled this sequence."""
        if self.first_scheduled_time is None:
            return (time.monotonic() - self.arrival_time) * 1000
        return (self.first_scheduled_time - self.arrival_time) * 1000

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table}, {self.status.value})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int, eos_token_ids: tuple[int, ...]) -> None:
        """Adds a generated token and finishes the sequence on EOS ("stop") or max_tokens ("length")."""
        self.token_ids.append(token_id)
        if not self.ignore_eos and token_id in eos_token_ids:
            self.finish("stop")
        elif self.num_generated_tokens >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
