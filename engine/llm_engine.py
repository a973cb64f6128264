"""LLMEngine: the facade the prefill and decode services drive.

Not thread-safe: callers serialise every call (the services run all of them, step() included,
on one engine thread). Request ids are the caller's; an id is busy from add_request /
reserve_for_import until the request finishes (or, with keep_kv, until release) or is aborted.

The step loop, top to bottom: hand out outputs decided between steps (aborts, imports that were
already finished) -> schedule one mixed batch -> run the model on the batch's new tokens ->
take logits only at each sequence's last new token where its prompt/decode is fully computed ->
sample -> append tokens, register newly full blocks in the prefix cache, retire finished ones.
Invariant: after a step, every unfinished sequence's blocks cover its computed tokens, and the
cache holds the K/V of exactly its first num_computed_tokens tokens. An interrupted step (a more
urgent request was announced while a step carrying less urgent work ran) advances nothing: it
only wrote K/V past computed tokens, which the step that computes them overwrites.
"""

import time
from collections.abc import Callable
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass
from itertools import chain
from numbers import Integral
from typing import NamedTuple

import torch

from engine.attention_metadata import AttentionMetadata
from engine.block_manager import BlockManager, KvEvent
from engine.config import EngineConfig
from engine.errors import CapacityError, InvalidRequestError, StepInterrupted, UnknownRequestError
from engine.sampling import SamplingParams, sample
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import PRIORITY_INTERACTIVE, Sequence
from engine.swap import HostSwapTier


class TokenOutput(NamedTuple):
    """One event of one request. token_id is None only on a finish without a new token ("abort",
    or an imported request whose first token already ended it). finish_reason is None while
    the request goes on, else "length" | "stop" | "abort"."""

    request_id: str
    token_id: int | None
    finish_reason: str | None
    num_cached_tokens: int
    # Time from add_request/add_imported to the first step that scheduled the request (set on
    # its first token's output, 0 on later ones).
    queue_ms: float = 0.0


class LoadSnapshot(NamedTuple):
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    queued_prefill_tokens: int  # prompt tokens admitted or queued but not computed yet
    max_running: int = 0  # sequences run at once at most (max_num_seqs)


@dataclass
class EngineStats:
    """Monotonic counters. Imported prompts count in neither prompt counter."""

    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    steps: int = 0
    interrupted_steps: int = 0  # abandoned for a more urgent arrival (counted in steps too)
    prompt_only_steps: int = 0  # prompts computed while running sequences waited (counted in steps too)


class LLMEngine:
    def __init__(self, config: EngineConfig, model=None):
        """Loads the model (engine.weights.load_model) unless given one, and allocates the KV pool
        (`kv_cache`, [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]); the engine
        owns the pool, kvtransfer reads/writes blocks of it through block ids from this API."""
        from engine.kv_pool import allocate_kv_pool
        if model is None:
            from engine.weights import load_model
            model = load_model(config.model, config.device)
        self.config = config
        self.model = model
        self.kv_cache = allocate_kv_pool(config.model, config.cache, config.device)
        self.block_manager = BlockManager(config.cache.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        swap = HostSwapTier(self.kv_cache, config.cache.swap_blocks) if config.cache.swap_blocks else None
        self.scheduler = Scheduler(config.scheduler, self.block_manager, swap)
        self.stats = EngineStats()
        self._unfinished: dict[str, Sequence] = {}
        self._kept: dict[str, Sequence] = {}  # finished with keep_kv: blocks pinned until release
        self._reserved: dict[str, list[int]] = {}  # import reservations
        self._pending: list[TokenOutput] = []  # decided between steps, handed out by the next step

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    max_tokens: int, ignore_eos: bool = False, keep_kv: bool = False,
                    priority: int = PRIORITY_INTERACTIVE, resume_token_ids: Sequence_[int] = ()) -> None:
        """Queues a prompt: prefill, then decode until max_tokens or an EOS id
        (config.model.eos_token_ids, unless ignore_eos). keep_kv=True: when it finishes its blocks
        stay pinned (block_ids_of works) until release(request_id). A lower priority rank runs
        first and may preempt less urgent running requests (see engine/scheduler.py).
        resume_token_ids: tokens this request already generated elsewhere (failover); their KV is
        computed with the prompt's, they count toward max_tokens and seeded sampling continues
        exactly where it stopped.
        Raises InvalidRequestError (bad input, busy id) or CapacityError (can never fit the pool)."""
        self._check_new_id(request_id)
        self._check_prompt(prompt_token_ids, max_tokens, sampling)
        if len(resume_token_ids) >= max_tokens:
            raise InvalidRequestError(f"{len(resume_token_ids)} resumed tokens leave nothing to generate "
                                      f"(max_tokens {max_tokens})")
        for i, token in enumerate(resume_token_ids):
            self._check_token(token, f"resume_token_ids[{i}]")
        seq = Sequence(request_id, prompt_token_ids, sampling, max_tokens, ignore_eos, keep_kv, priority)
        seq.token_ids += [int(t) for t in resume_token_ids]
        self._unfinished[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stops a request now and frees its blocks; the next step() reports it with
        finish_reason "abort" (token_id None). Kept KV is released and an import reservation
        cancelled (no output for those). Returns False when the id is unknown."""
        seq = self._unfinished.pop(request_id, None)
        if seq is None:
            return self.release(request_id) or self.cancel_import(request_id)
        self.scheduler.remove(seq)
        self.block_manager.free(seq)
        seq.finish("abort")
        self._pending.append(TokenOutput(request_id, None, "abort", seq.num_cached_tokens))
        return True

    def release(self, request_id: str) -> bool:
        """Unpins the KV of a finished keep_kv request; its full blocks stay in the prefix cache
        (evictable). Returns False when nothing is kept under that id."""
        seq = self._kept.pop(request_id, None)
        if seq is None:
            return False
        self.block_manager.free(seq)
        return True

    def block_ids_of(self, request_id: str) -> list[int]:
        """Block ids (in token order) of a kept, unfinished or reserved request; the engine keeps
        owning them. Raises UnknownRequestError."""
        seq = self._kept.get(request_id) or self._unfinished.get(request_id)
        if seq is not None:
            return list(seq.block_table)
        if request_id in self._reserved:
            return list(self._reserved[request_id])
        raise UnknownRequestError(f"no running, kept or reserved request {request_id!r}")

    # -- KV import (decode side) ----------------------------------------------------------------

    def reserve_for_import(self, request_id: str, num_prompt_tokens: int,
                           priority: int = PRIORITY_INTERACTIVE) -> list[int] | None:
        """Reserves blocks for a prompt's KV that the caller will write into kv_cache; returns
        their ids in token order, or None: no room now, ask again later. Less urgent running
        requests are preempted to make room. The reservation holds the id until add_imported
        or cancel_import. Raises InvalidRequestError / CapacityError."""
        self._check_new_id(request_id)
        if not 0 < num_prompt_tokens < self.config.scheduler.max_model_len:
            raise InvalidRequestError(f"num_prompt_tokens must be in [1, max_model_len="
                                      f"{self.config.scheduler.max_model_len}), got {num_prompt_tokens}")
        needed = self._blocks_for(num_prompt_tokens)
        self._check_fits(needed)
        # Leave one block per running sequence so decodes can grow without preempting.
        if not self.scheduler.free_blocks_for(needed, priority):
            return None
        self._reserved[request_id] = self.block_manager.allocate_blocks(needed)
        return list(self._reserved[request_id])

    def add_imported(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                     sampling: SamplingParams, max_tokens: int, ignore_eos: bool = False,
                     priority: int = PRIORITY_INTERACTIVE) -> None:
        """Turns a filled reservation into a decoding request: the prompt's KV is in the reserved
        blocks, first_token_id (sampled elsewhere) is generated token 0, decoding continues from
        it without recomputing the prompt. The prompt's full blocks enter the prefix cache.
        If the first token already ends the request, the next step() reports it finished with
        token_id None. On InvalidRequestError the reservation stays (cancel_import it);
        UnknownRequestError when nothing is reserved under the id."""
        blocks = self._reserved.get(request_id)
        if blocks is None:
            raise UnknownRequestError(f"no import reservation {request_id!r} (call reserve_for_import first)")
        self._check_prompt(prompt_token_ids, max_tokens, sampling)
        self._check_token(first_token_id, "first_token_id")
        if len(blocks) != self._blocks_for(len(prompt_token_ids)):
            raise InvalidRequestError(f"{len(prompt_token_ids)} prompt tokens do not match the "
                                      f"{len(blocks)} blocks reserved for {request_id!r}")
        del self._reserved[request_id]
        seq = Sequence(request_id, prompt_token_ids, sampling, max_tokens, ignore_eos, priority=priority)
        seq.block_table, seq.num_computed_tokens = blocks, len(prompt_token_ids)
        self.block_manager.cache_full_blocks(seq)
        seq.append_token(first_token_id, self.config.model.eos_token_ids)
        if seq.is_finished:
            self.block_manager.free(seq)
            self._pending.append(TokenOutput(request_id, None, seq.finish_reason, 0))
            return
        self._unfinished[request_id] = seq
        self.scheduler.add(seq)

    def cancel_import(self, request_id: str) -> bool:
        """Frees an import reservation; False when there is none under that id."""
        blocks = self._reserved.pop(request_id, None)
        if blocks is None:
            return False
        self.block_manager.free_blocks(blocks)
        return True

    # -- the step -------------------------------------------------------------------------------

    def step_cost(self) -> tuple[float, float, float] | None:
        """The fitted cost of a step on this machine: (fixed, per sequence, per token) seconds, or
        None before enough steps (engine/step_cost.py)."""
        return self.scheduler.step_costs.coefficients()

    def has_unfinished(self) -> bool:
        """Whether step() has work: queued or running requests, or outputs not handed out yet."""
        return self.scheduler.has_unfinished() or bool(self._pending)

    @torch.inference_mode()
    def step(self, arrival: Callable[[], int | None] | None = None) -> list[TokenOutput]:
        """Runs one scheduler step; returns this step's outputs (at most one per request, plus
        the outputs decided since the last step). `arrival()` (asked between layers, from this
        thread) is the rank of the most urgent request announced but not added yet, or None: a
        step that request may interrupt (Scheduler.interruptible_by) is abandoned, and the
        caller adds the request before the next step."""
        outputs, self._pending = self._pending, []
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        self.stats.steps += 1
        self.stats.prompt_only_steps += self.scheduler.prompt_only_step
        if batch.seqs:
            try:
                sampled = self._run_model(batch, self._interrupt(batch, arrival))
            except StepInterrupted:
                self.stats.interrupted_steps += 1
                return outputs
            outputs += self._advance(batch, sampled)
            rows = len(sampled) - sampled.count(None)  # sequences whose logits the step computed
            self.scheduler.step_costs.observe(rows, sum(batch.query_lens), time.perf_counter() - started)
        return outputs

    def _interrupt(self, batch: ScheduledBatch, arrival) -> Callable[[], bool] | None:
        if arrival is None:
            return None

        def arrived() -> bool:
            rank = arrival()
            return rank is not None and self.scheduler.interruptible_by(batch, rank)
        return arrived

    def _run_model(self, batch: ScheduledBatch, interrupt: Callable[[], bool] | None = None) -> list[int | None]:
        """Forward pass over the batch's new tokens; a sampled token for each sequence whose
        tokens are all computed after this step, None for one still mid-prompt. Raises
        StepInterrupted when `interrupt()` says so between two layers or before the LM head."""
        seqs, query_lens = batch.seqs, batch.query_lens
        context_lens = [s.num_computed_tokens + n for s, n in zip(seqs, query_lens)]
        input_ids = [t for s, c, n in zip(seqs, context_lens, query_lens) for t in s.token_ids[c - n:c]]
        meta = AttentionMetadata.build(query_lens, context_lens, [s.block_table for s in seqs],
                                       self.config.cache.block_size)
        device = self.config.device
        hidden = self.model.forward(torch.tensor(input_ids, dtype=torch.long, device=device),
                                    meta.positions().to(device), self.kv_cache, meta, interrupt)
        if interrupt is not None and interrupt():
            raise StepInterrupted("a more urgent request arrived")
        done = [i for i, (s, c) in enumerate(zip(seqs, context_lens)) if c == s.num_tokens]
        tokens: list[int | None] = [None] * len(seqs)
        if done:
            rows = meta.last_token_indices()[done].to(device)
            params = [seqs[i].sampling for i in done]
            logits = self._logits(hidden[rows], params)
            picked = sample(logits, params, [seqs[i].num_generated_tokens for i in done])
            for i, token in zip(done, picked):
                tokens[i] = token
        return tokens

    def _logits(self, hidden: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Float32 logits per row. A reduced-precision LM head is exact only where greedy looks
        (its top candidates), so rows that sample from the whole distribution get exact logits."""
        logits = self.model.compute_logits(hidden).float()
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled and hasattr(self.model, "compute_exact_logits"):
            logits[sampled] = self.model.compute_exact_logits(hidden[sampled]).float()
        return logits.cpu()

    def _advance(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[TokenOutput]:
        outputs = []
        for seq, n, token in zip(batch.seqs, batch.query_lens, sampled):
            start = seq.num_computed_tokens
            self.stats.prompt_tokens_computed += max(0, min(start + n, seq.num_prompt_tokens) - start)
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
            if token is None:
                continue
            if seq.num_generated_tokens == 0:
                self.stats.prompt_tokens_cached += seq.num_cached_tokens
            seq.append_token(token, self.config.model.eos_token_ids)
            self.stats.generated_tokens += 1
            queue_ms, seq.queue_reported = (0.0 if seq.queue_reported else seq.queue_ms), True
            outputs.append(TokenOutput(seq.request_id, token, seq.finish_reason, seq.num_cached_tokens, queue_ms))
            if seq.is_finished:
                self._retire(seq)
        return outputs

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        del self._unfinished[seq.request_id]
        if seq.keep_kv:
            self._kept[seq.request_id] = seq
        else:
            self.block_manager.free(seq)

    # -- observability --------------------------------------------------------------------------

    def load(self) -> LoadSnapshot:
        queued = sum(max(0, s.num_prompt_tokens - s.num_computed_tokens)
                     for s in chain(self.scheduler.waiting, self.scheduler.running))
        bm = self.block_manager
        return LoadSnapshot(len(self.scheduler.waiting), len(self.scheduler.running),
                            bm.num_used_blocks, bm.num_total_blocks, queued, self.config.scheduler.max_num_seqs)

    def drain_kv_events(self) -> list[KvEvent]:
        """Prefix-cache events since the last drain, oldest first (see BlockManager)."""
        return self.block_manager.drain_events()

    def cached_block_hashes(self) -> list[int]:
        """Snapshot of every block hash in the prefix cache."""
        return self.block_manager.cached_block_hashes()

    # -- validation -----------------------------------------------------------------------------

    def _check_new_id(self, request_id: str) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string")
        if request_id in self._unfinished or request_id in self._kept or request_id in self._reserved:
            raise InvalidRequestError(f"request id {request_id!r} is already in use; pick a unique id")

    def _check_prompt(self, prompt_token_ids: list[int], max_tokens: int, sampling: SamplingParams) -> None:
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        if not prompt_token_ids:
            raise InvalidRequestError("prompt_token_ids is empty; send at least one token")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, Integral) or max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        limit = self.config.scheduler.max_model_len
        if len(prompt_token_ids) + max_tokens > limit:
            raise InvalidRequestError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({max_tokens}) "
                                      f"exceeds max_model_len {limit}; shorten the prompt or lower max_tokens")
        for i, token in enumerate(prompt_token_ids):
            self._check_token(token, f"prompt_token_ids[{i}]")
        self._check_fits(self._blocks_for(len(prompt_token_ids) + max_tokens - 1))

    def _check_token(self, token: int, what: str) -> None:
        vocab = self.config.model.vocab_size
        if isinstance(token, bool) or not isinstance(token, Integral) or not 0 <= token < vocab:
            raise InvalidRequestError(f"{what} = {token!r} is not a token id in [0, {vocab})")

    def _check_fits(self, num_blocks: int) -> None:
        total = self.block_manager.num_total_blocks
        if num_blocks > total:
            raise CapacityError(f"request needs {num_blocks} KV blocks but the pool has {total}; "
                                f"send a shorter request or use a worker with more KV blocks")

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.cache.block_size)
