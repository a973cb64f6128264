"""Contracts of the placement plugins. Plugins are pure: they read a Pool (one role's candidate
workers as columns, row i of every column is pool.ids[i]), never mutate it, and do no I/O. The
runner (not the plugin) fills the pool's prefix columns from the router's prefix index, narrows
the pool with each filter's mask, clamps scores to [0, 1], weights them, times each plugin and
logs. Plugins work on whole columns (numpy), not per worker: a pool can hold a thousand workers
and a decision should take well under a millisecond."""

from collections.abc import Sequence
from functools import cached_property
from typing import NamedTuple, Protocol

import numpy as np

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


# A Pool's (and the WorkerTable's) integer columns: the load fields, then this request's prefix
# match. (confirmed_prefix_blocks is no column: the runner asks the index for the chosen worker's.)
COLUMNS = (*LoadView._fields, "prefix_blocks")


def _column(name: str) -> property:
    i = COLUMNS.index(name)
    return property(lambda pool: pool.columns[i], doc=f"int64 array: each candidate's {name}")


class Pool:
    """One role's candidate workers for one request, as columns (built by the runner from a
    WorkerTable; plugins only read it). Row i of every column belongs to ids[i] and view(i). The
    prefix columns hold this request's match when the profile uses the prefix index."""

    def __init__(self, views: Sequence[WorkerView], rows: np.ndarray, ids: np.ndarray, columns: np.ndarray,
                 healthy: np.ndarray):
        self._views, self._rows = views, rows  # the table's views, and which of them each row is
        self._ids, self.columns, self.healthy = ids, columns, healthy

    def __len__(self) -> int:
        return len(self._rows)

    @cached_property
    def ids(self) -> list[str]:
        return self._ids.tolist()

    waiting = _column("waiting")
    running = _column("running")
    kv_blocks_used = _column("kv_blocks_used")
    kv_blocks_total = _column("kv_blocks_total")
    queued_prefill_tokens = _column("queued_prefill_tokens")
    router_inflight = _column("router_inflight")
    router_inflight_tokens = _column("router_inflight_tokens")
    max_running = _column("max_running")
    router_finished = _column("router_finished")
    prefix_blocks = _column("prefix_blocks")

    @property
    def queue_depth(self) -> np.ndarray:
        """LoadView.queue_depth for every candidate."""
        return np.maximum(self.waiting + self.running - self.router_finished, self.router_inflight)

    @property
    def kv_utilization(self) -> np.ndarray:
        """kv_blocks_used / kv_blocks_total for every candidate (0 where the total is unknown)."""
        total = self.kv_blocks_total
        return np.divide(self.kv_blocks_used, total, out=np.zeros(len(self)), where=total > 0)

    @property
    def pending_prefill_tokens(self) -> np.ndarray:
        """LoadView.pending_prefill_tokens for every candidate."""
        return np.maximum(self.queued_prefill_tokens, self.router_inflight_tokens)

    def take(self, keep: np.ndarray) -> "Pool":
        """The candidates where the boolean mask keep is True, order kept."""
        kept = np.flatnonzero(keep)  # (take() with indices: faster than indexing with the mask)
        return Pool(self._views, self._rows.take(kept), self._ids.take(kept), self.columns.take(kept, axis=1),
                    self.healthy.take(kept))

    def view(self, i: int) -> WorkerView:
        """Candidate i's view, its prefix_blocks this request's."""
        w = self._views[self._rows[i]]
        prefix = int(self.prefix_blocks[i])
        return w if prefix == w.prefix_blocks else w._replace(prefix_blocks=prefix)


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
    """Says which candidates may get the request: a boolean array, one entry per row of the pool
    (True: keep). The runner narrows the pool before the next filter."""

    name: str

    def filter(self, request: PlacementRequest, pool: Pool) -> np.ndarray: ...


class Scorer(Protocol):
    """Scores every candidate, higher is better: floats (a numpy array or a sequence), one per
    row of the pool. The runner clamps them into [0, 1] (NaN counts as 0)."""

    name: str

    def score(self, request: PlacementRequest, pool: Pool) -> np.ndarray: ...


class Picker(Protocol):
    """Chooses one row of a non-empty pool given each row's weighted total score; returns its index."""

    name: str

    def pick(self, request: PlacementRequest, pool: Pool, totals: np.ndarray) -> int: ...


class Decision(NamedTuple):
    remote_prefill: bool
    reason: str


class Decider(Protocol):
    """Given the chosen decode worker (its prefix_blocks filled in), says whether prefilling on a
    prefill worker pays (conditional disaggregation); False: the decode worker prefills locally."""

    name: str

    def decide(self, request: PlacementRequest, decode: WorkerView) -> Decision: ...
