"""The simulated router: the router's own placement objects fed with simulated worker state.

It mirrors services/router/workers.py: a PrefixIndex rebuilt only from the workers' KV events
(stored / removed, as they happen), a LoadView per worker from its last load report plus this
router's in-flight counts (WorkerEndpoint.view), kept in a WorkerTable as the registry keeps its
own, and `load_profile(name).place(...)` — the very runner, filters, scorers, pickers and decider
the router uses. Load reports are periodic in the real mesh (every report_interval_s); here a
report is refreshed when the router looks at a worker at least report_interval_s after the
previous one, so it is at most that stale.
"""

from collections.abc import Callable

from services.router.placement.base import LoadView, PlacementRequest, WorkerView, with_router_counts
from services.router.placement.runner import Placement, PlacementProfile
from services.router.placement.table import WorkerTable
from services.router.prefix_index import PrefixIndex


class TraceRequest(PlacementRequest):
    """A PlacementRequest named by its block hashes (a trace has no token ids)."""

    def __init__(self, request_id: str, block_hashes, num_prompt_tokens: int, block_size: int):
        super().__init__(request_id, [], "interactive", block_size)
        self.__dict__["block_hashes"] = list(block_hashes)  # fills the cached_property
        self._num_prompt_tokens = num_prompt_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt_tokens


class SimRouter:
    def __init__(self, profile: PlacementProfile, roles: dict[str, str], load_of: Callable[[str], LoadView],
                 clock: Callable[[], float], report_interval_s: float = 0.2):
        self.profile = profile
        self.index = PrefixIndex(clock=clock)
        self._roles, self._load_of, self._clock = roles, load_of, clock
        self._interval = report_interval_s
        self._reports = dict.fromkeys(roles, LoadView())
        self._reported_at = dict.fromkeys(roles, -1e18)
        self.inflight = dict.fromkeys(roles, 0)
        self.inflight_tokens = dict.fromkeys(roles, 0)
        self.finished = dict.fromkeys(roles, 0)  # requests that ended since the worker's last report
        self.table = WorkerTable.of(WorkerView(w, w, role, True) for w, role in roles.items())  # (in roles' order)
        self._changed: set[str] = set()  # workers whose row is rewritten before the router next reads the table

    def on_kv_event(self, worker_id: str, kind: str, block_hashes: list[int]) -> None:
        if kind == "stored":
            self.index.stored(worker_id, block_hashes)
        elif kind == "removed":
            self.index.removed(worker_id, block_hashes)
        else:
            self.index.cleared(worker_id)

    def views(self) -> list[WorkerView]:
        """WorkerRegistry.views(): each worker's last report plus this router's in-flight counts."""
        self._refresh_table()
        return self.table.views()

    def place(self, request: PlacementRequest) -> Placement:
        self._refresh_table()
        return self.profile.place(request, self.table, self.index)

    def track(self, worker_id: str, prompt_tokens: int, sign: int = 1) -> None:
        """A request (with prompt_tokens to prefill there) starts (+1) or ends (-1) on worker_id."""
        self.inflight[worker_id] += sign
        self.inflight_tokens[worker_id] += sign * prompt_tokens
        if sign < 0:
            self.finished[worker_id] += 1
        self._changed.add(worker_id)

    def _refresh_table(self) -> None:
        """A worker's report arrives when the router looks at least report_interval_s after the
        last; then the rows of the workers that changed since the last look are rewritten (the
        registry rewrites a row at each change: the same rows when placement reads them)."""
        now = self._clock()
        for worker_id in self._roles:
            if now - self._reported_at[worker_id] >= self._interval:
                self._reports[worker_id] = self._load_of(worker_id)
                self._reported_at[worker_id] = now
                self.finished[worker_id] = 0
                self._changed.add(worker_id)
        for worker_id in self._changed:
            load = with_router_counts(self._reports[worker_id], self.inflight[worker_id],
                                      self.inflight_tokens[worker_id], self.finished[worker_id])
            self.table.put(WorkerView(worker_id, worker_id, self._roles[worker_id], True, load))
        self._changed.clear()
