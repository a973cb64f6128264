"""Contracts of the placement plugins. Plugins are pure: they read the views, never mutate them,
and do no I/O. The runner (not the plugin) fills each view's prefix match from the router's
prefix index, clamps scores to [0, 1], weights them, times each plugin and logs."""

from functools import cached_property
from typing import NamedTuple, Protocol

from engine.hashing import block_hashes


class LoadView(NamedTuple):
    """The worker's last load report, plus what this router sent it and saw finish since
    (reports lag by up to one interval: a burst placed in between must not all land on one
    worker, and a slot freed in between should be seen at once)."""

    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    queued_prefill_tokens: int = 0
    router_inflight: int = 0  # this router's requests on the worker right now
    router_inflight_tokens: int = 0  # their prompt tokens (prefill pool)
    max_running: int = 0  # sequences the worker runs at once at most (0: not reported)
    router_finished: int = 0  # this router's requests on the worker that ended since the report

    @property
    def queue_depth(self) -> int:
        """Sequences on the worker now: the report minus what ended since, never less than what
        this router has there (it knows its own exactly). (No max() call: this runs per worker per
        request.)"""
        reported = self.waiting + self.running - self.router_finished
        return reported if reported >= self.router_inflight else self.router_inflight

    @property
    def pending_prefill_tokens(self) -> int:
        queued = self.queued_prefill_tokens
        return queued if queued >= self.router_inflight_tokens else self.router_inflight_tokens


def with_router_counts(report: LoadView, inflight: int, inflight_tokens: int, finished: int) -> LoadView:
    """A worker's last load report plus what this router knows since: its requests there now (and
    their prompt tokens) and those that ended since the report. The router's registry and the
    simulator's router both build their views with this. (Spelled out, not _replace(): this runs
    per worker per request.)"""
    return LoadView(report.waiting, report.running, report.kv_blocks_used, report.kv_blocks_total,
                    report.queued_prefill_tokens, inflight, inflight_tokens, report.max_running, finished)


class WorkerView(NamedTuple):
    """What the router knows about one worker, rebuilt from its state stream."""

    worker_id: str
    address: str
    role: str  # "prefill" | "decode"
    healthy: bool
    load: LoadView = LoadView()
    # Leading blocks of this request's prompt the worker holds or is expected to hold soon
    # (filled in by the runner; scorers steer with it).
    prefix_blocks: int = 0
    # Of those, the blocks the worker has confirmed with KV events (what a decider may rely on:
    # an expected block still being computed elsewhere would be recomputed here).
    confirmed_prefix_blocks: int = 0


class PlacementRequest:
    """One request as placement sees it. Block hashes are computed on first use, with the very
    function the engine uses, so the router and the workers name blocks the same way."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], priority: str, block_size: int = 16):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.priority = priority  # "interactive" | "batch"
        self.block_size = block_size

    @cached_property
    def block_hashes(self) -> list[int]:
        return block_hashes(self.prompt_token_ids, self.block_size)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def cached_tokens(self, worker: WorkerView) -> int:
        """Prompt tokens the worker has confirmed it holds."""
        return min(worker.confirmed_prefix_blocks * self.block_size, self.num_prompt_tokens)


class Filter(Protocol):
    """Drops workers that must not get the request. Returns a subset, order kept."""

    name: str

    def filter(self, request: PlacementRequest, workers: list[WorkerView]) -> list[WorkerView]: ...


class Scorer(Protocol):
    """Scores each worker; higher is better. Values outside [0, 1] are clamped by the runner."""

    name: str

    def score(self, request: PlacementRequest, workers: list[WorkerView]) -> dict[str, float]: ...


class Picker(Protocol):
    """Chooses one worker from a non-empty list of (worker, total score), best-first not assumed."""

    name: str

    def pick(self, request: PlacementRequest, scored: list[tuple[WorkerView, float]]) -> WorkerView: ...


class Decision(NamedTuple):
    remote_prefill: bool
    reason: str


class Decider(Protocol):
    """Given the chosen decode worker (its prefix_blocks filled in), says whether prefilling on a
    prefill worker pays (conditional disaggregation); False: the decode worker prefills locally."""

    name: str

    def decide(self, request: PlacementRequest, decode: WorkerView) -> Decision: ...
