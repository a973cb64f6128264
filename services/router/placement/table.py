"""Worker state as columns, so a placement decision over a thousand workers is a few numpy
operations instead of Python touching every worker in every plugin.

WorkerTable holds every worker the router knows, one row each, in the order they were first put
(the order placement breaks ties in). Its writers put a worker's whole view when something about
that worker changes (the router's registry on a load report, a health change or a placement of
its own; the simulator's router likewise), so the cost is paid once per change, not once per
request. A Pool is one role's rows for one request: the runner takes it from the table with this
request's prefix columns, and narrows it with each filter; scorers and pickers read its columns.
"""

from collections.abc import Iterable, Mapping

import numpy as np

from services.router.placement.base import COLUMNS, Pool, WorkerView


class WorkerTable:
    def __init__(self, capacity: int = 16) -> None:
        self._views: list[WorkerView] = []
        self._row: dict[str, int] = {}  # worker id -> row
        self._ids = np.empty(capacity, dtype=object)
        self._columns = np.zeros((len(COLUMNS), capacity), dtype=np.int64)
        self._healthy = np.zeros(capacity, dtype=bool)
        self._role_rows: dict[str | None, np.ndarray] | None = None  # None: rows or roles changed

    @classmethod
    def of(cls, views: Iterable[WorkerView]) -> "WorkerTable":
        table = cls()
        for view in views:
            table.put(view)
        return table

    def __len__(self) -> int:
        return len(self._views)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._row

    def put(self, view: WorkerView) -> None:
        """Writes the worker's row (a new worker goes last). The table keeps the view object: pools
        hand it back for the chosen worker."""
        row = self._row.get(view.worker_id)
        if row is None:
            row = self._append(view.worker_id)
        elif self._views[row].role != view.role:
            self._role_rows = None
        self._views[row] = view
        self._columns[:, row] = (*view.load, view.prefix_blocks)
        self._healthy[row] = view.healthy

    def rename(self, old_id: str, view: WorkerView) -> None:
        """The worker known as old_id is now view.worker_id (it said its id): it keeps its row, so
        the order does not change. Just a put when old_id is not in the table."""
        if old_id != view.worker_id and old_id in self._row:
            self.remove(view.worker_id)  # another row under the new id (the id moved address)
            row = self._row[view.worker_id] = self._row.pop(old_id)
            self._ids[row] = view.worker_id
        self.put(view)

    def remove(self, worker_id: str) -> None:
        """Drops the worker's row; the rows after it move up one (order kept). No-op if unknown."""
        row = self._row.pop(worker_id, None)
        if row is None:
            return
        n = len(self._views)
        del self._views[row]
        for column in (self._ids, self._healthy):
            column[row:n - 1] = column[row + 1:n]
        self._columns[:, row:n - 1] = self._columns[:, row + 1:n]
        self._row = {w: r - (r > row) for w, r in self._row.items()}
        self._role_rows = None

    def views(self) -> list[WorkerView]:
        return list(self._views)

    @property
    def rows(self) -> Mapping[str, int]:
        """worker id -> its row (read only)."""
        return self._row

    def pool(self, role: str | None = None, prefix_blocks: np.ndarray | None = None) -> Pool:
        """The rows of one role (None: every row), in table order. prefix_blocks: this request's
        match, one entry per row of the table; without it the pool keeps what the views said."""
        rows = self._rows_of(role)
        columns = self._columns.take(rows, axis=1)  # a copy: the request's prefix never reaches the table
        if prefix_blocks is not None:
            columns[COLUMNS.index("prefix_blocks")] = prefix_blocks.take(rows)
        return Pool(self._views, rows, self._ids.take(rows), columns, self._healthy.take(rows))

    def _rows_of(self, role: str | None) -> np.ndarray:
        if self._role_rows is None:
            roles = [v.role for v in self._views]
            self._role_rows = {r: np.flatnonzero([x == r for x in roles]) for r in set(roles)}
            self._role_rows[None] = np.arange(len(roles))
        return self._role_rows.get(role, np.empty(0, dtype=np.intp))

    def _append(self, worker_id: str) -> int:
        row = len(self._views)
        if row == len(self._ids):  # full: double the capacity
            grow = max(row, 16)
            self._ids = np.concatenate([self._ids, np.empty(grow, dtype=object)])
            self._columns = np.concatenate([self._columns, np.zeros((len(COLUMNS), grow), dtype=np.int64)], axis=1)
            self._healthy = np.concatenate([self._healthy, np.zeros(grow, dtype=bool)])
        self._views.append(None)
        self._row[worker_id] = row
        self._ids[row] = worker_id
        self._role_rows = None
        return row
