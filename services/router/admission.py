"""Admission: a queue per priority class in front of a bounded number of requests in flight.

Invariant: a waiting interactive request is always dispatched before any waiting batch request,
and batch requests only take a slot while fewer than `batch_max_inflight` requests run (the rest
is headroom kept for live traffic). Beyond `max_queued` waiting requests: ResourceExhausted with
a retry hint, never a silent drop.
"""

import asyncio
import contextlib
from collections import deque

from services.common.errors import ResourceExhausted

INTERACTIVE, BATCH = "interactive", "batch"


class Admission:
    def __init__(self, max_inflight: int, max_queued: int, batch_max_inflight: int | None = None):
        if max_inflight <= 0 or max_queued < 0:
            raise ValueError("max_inflight must be positive and max_queued >= 0")
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self.batch_max_inflight = batch_max_inflight or max(1, max_inflight // 2)
        self.inflight = 0
        self._queues: dict[str, deque] = {INTERACTIVE: deque(), BATCH: deque()}

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @contextlib.asynccontextmanager
    async def admit(self, priority: str):
        """Waits for a slot (raises ResourceExhausted when the queue is full); yields the queue wait in ms."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        if not self._can_run(priority):
            if self.queued >= self.max_queued:
                raise ResourceExhausted(f"router is at capacity ({self.inflight} running, {self.queued} queued); "
                                        "retry shortly", retry_after_s=1.0)
            waiter = loop.create_future()
            self._queues[priority].append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._finish()  # granted a slot just as we were cancelled
                else:
                    with contextlib.suppress(ValueError):
                        self._queues[priority].remove(waiter)
                raise
        else:
            self.inflight += 1
        try:
            yield (loop.time() - start) * 1000
        finally:
            self._finish()

    def _can_run(self, priority: str) -> bool:
        if priority == BATCH:
            return not self._queues[INTERACTIVE] and not self._queues[BATCH] and self.inflight < self.batch_max_inflight
        return not self._queues[INTERACTIVE] and self.inflight < self.max_inflight

    def _finish(self) -> None:
        self.inflight -= 1
        self._wake()

    def _wake(self) -> None:
        for priority, limit in ((INTERACTIVE, self.max_inflight), (BATCH, self.batch_max_inflight)):
            queue = self._queues[priority]
            while queue and self.inflight < limit:
                if priority == BATCH and self._queues[INTERACTIVE]:
                    return
                waiter = queue.popleft()
                if not waiter.done():
                    self.inflight += 1
                    waiter.set_result(None)
