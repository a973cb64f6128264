"""Admission: a queue per (priority class, tenant) in front of a bounded number of requests in flight.

Invariants:
- a waiting interactive request is always dispatched before any waiting batch request, and an
  interactive request dispatches at once while fewer than `max_inflight` run;
- a batch request takes a slot only while fewer than `batch_max_inflight` requests run, no
  interactive request is still waiting for its first token (its prefill must not queue behind a
  batch prompt placed meanwhile; the request flow calls `first_token()`), and `headroom()` says
  the pools have room (services/router/headroom.py). A batch grant is followed
  by placement before the next headroom check (the granted request must show up in the load the
  rule reads); the router calls `capacity_changed()` on every load report and placement, which is
  when a waiting batch request re-checks: no polling;
- within a class, tenants share by token-weighted fair queuing (services/router/fair_queue.py);
- tenant limits are checked on arrival (services/router/tenants.py); over one, or beyond
  `max_queued` waiting requests: ResourceExhausted with a retry hint, never a silent drop.
"""

import asyncio
import contextlib
from collections.abc import Callable

from services.common.errors import ResourceExhausted
from services.router.fair_queue import FairQueue
from services.router.tenants import TenantLimiter, TenantPolicy

INTERACTIVE, BATCH = "interactive", "batch"


class Admission:
    def __init__(self, max_inflight: int, max_queued: int, batch_max_inflight: int | None = None,
                 headroom: Callable[[], bool] | None = None, limiter: TenantLimiter | None = None):
        if max_inflight <= 0 or max_queued < 0:
            raise ValueError("max_inflight must be positive and max_queued >= 0")
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self.batch_max_inflight = batch_max_inflight or max(1, max_inflight // 2)
        self._headroom = headroom
        self.limiter = limiter or TenantLimiter(TenantPolicy())
        self.inflight = 0
        self.inflight_by_class = {INTERACTIVE: 0, BATCH: 0}
        self._queues = {INTERACTIVE: FairQueue(self.limiter.weight), BATCH: FairQueue(self.limiter.weight)}
        self._unplaced_batch = 0  # batch waiters granted a slot that have not resumed yet
        self._before_first_token: set = set()  # tasks of admitted interactive requests with no token yet

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def queued_by_class(self, priority: str) -> int:
        return len(self._queues[priority])

    @contextlib.asynccontextmanager
    async def admit(self, priority: str, tenant: str = "", tokens: int = 0):
        """Waits for a slot; yields the queue wait in ms. Raises ResourceExhausted over a tenant limit
        or when the queue is full. `tokens` (prompt + max_tokens) is what fair share and limits count."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.limiter.acquire(tenant, tokens)
        try:
            if self._can_run(priority):
                self._start(priority, tenant, tokens)
            else:
                await self._wait(priority, tenant, tokens, loop)
            task = asyncio.current_task()
            if priority == INTERACTIVE:
                self._before_first_token.add(task)
            try:
                yield (loop.time() - start) * 1000
            finally:
                self._before_first_token.discard(task)
                self._finish(priority)
        finally:
            self.limiter.release(tenant)

    def first_token(self) -> None:
        """The calling request (the task that was admitted) has its first token."""
        if self._before_first_token:
            self._before_first_token.discard(asyncio.current_task())
            if not self._before_first_token:
                self._wake()

    def capacity_changed(self) -> None:
        """Load or placement changed: waiting batch requests re-check the headroom."""
        self._wake()

    async def _wait(self, priority: str, tenant: str, tokens: int, loop) -> None:
        if self.queued >= self.max_queued:
            raise ResourceExhausted(f"router is at capacity ({self.inflight} running, {self.queued} queued); "
                                    "retry shortly", retry_after_s=1.0)
        waiter = loop.create_future()
        item = (waiter, tokens)
        self._queues[priority].push(tenant, item)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._resumed(priority)
                self._finish(priority)  # granted a slot just as we were cancelled
            else:
                self._queues[priority].remove(tenant, item)
            raise
        self._resumed(priority)

    def _can_run(self, priority: str) -> bool:
        if self._queues[INTERACTIVE]:
            return False
        if priority == BATCH:
            return not self._queues[BATCH] and self._batch_may_start()
        return self.inflight < self.max_inflight

    def _batch_may_start(self) -> bool:
        return (self.inflight < min(self.batch_max_inflight, self.max_inflight) and self._unplaced_batch == 0
                and not self._before_first_token and (self._headroom is None or self._headroom()))

    def _start(self, priority: str, tenant: str, tokens: int) -> None:
        self.inflight += 1
        self.inflight_by_class[priority] += 1
        self._queues[priority].charge(tenant, tokens)

    def _resumed(self, priority: str) -> None:
        if priority == BATCH and self._headroom is not None:
            self._unplaced_batch -= 1

    def _finish(self, priority: str) -> None:
        self.inflight -= 1
        self.inflight_by_class[priority] -= 1
        self._wake()

    def _wake(self) -> None:
        interactive, batch = self._queues[INTERACTIVE], self._queues[BATCH]
        while interactive and self.inflight < self.max_inflight:
            self._grant(INTERACTIVE, *interactive.pop())
        while not interactive and batch and self._batch_may_start():
            self._grant(BATCH, *batch.pop())

    def _grant(self, priority: str, tenant: str, item) -> None:
        waiter, tokens = item
        if waiter.done():  # cancelled while queued
            return
        self._start(priority, tenant, tokens)
        if priority == BATCH and self._headroom is not None:
            self._unplaced_batch += 1
        waiter.set_result(None)
