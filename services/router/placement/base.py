"""Contracts of the placement plugins. Plugins are pure: they read the views, never mutate them,
and do no I/O. The runner (not the plugin) clamps scores to [0, 1], weights them, times each
plugin and logs."""

from typing import NamedTuple, Protocol


class LoadView(NamedTuple):
    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    queued_prefill_tokens: int = 0


class WorkerView(NamedTuple):
    """What the router knows about one worker, rebuilt from its state stream."""

    worker_id: str
    address: str
    role: str  # "prefill" | "decode"
    healthy: bool
    load: LoadView = LoadView()


class PlacementRequest(NamedTuple):
    request_id: str
    prompt_token_ids: list[int]
    priority: str  # "interactive" | "batch"


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


class Decider(Protocol):
    """Given the chosen decode worker, says whether prefilling on a prefill worker pays
    (conditional disaggregation); False means the decode worker prefills locally."""

    name: str

    def remote_prefill(self, request: PlacementRequest, decode: WorkerView, prefill_pool: list[WorkerView]) -> bool: ...
