"""Token-weighted fair queuing among tenants (one instance per priority class).

Each tenant has a FIFO of waiters and a `served` counter: tokens dispatched / the tenant's
weight. `pop()` takes the head of the tenant with the least weighted service (ties: the earliest
arrival), so over any busy period every backlogged tenant receives tokens in proportion to its
weight, however many requests it queues. A tenant that becomes backlogged starts level with the
least-served backlogged tenant (or the virtual clock when none is), so being idle banks no credit.
This is start-time fair queuing with the request's cost = prompt tokens + max_tokens.
"""

import itertools
from collections import deque
from collections.abc import Callable


class FairQueue:
    def __init__(self, weight_of: Callable[[str], float] = lambda tenant: 1.0):
        self._weight_of = weight_of
        self._queues: dict[str, deque] = {}
        self._served: dict[str, float] = {}
        self._clock = 0.0  # weighted service of the last tenant dispatched
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._queues)

    def push(self, tenant: str, item) -> None:
        if tenant not in self._queues:
            floor = min((self._served[t] for t in self._queues), default=self._clock)
            self._served[tenant] = max(self._served.get(tenant, 0.0), floor)
            self._queues[tenant] = deque()
        self._queues[tenant].append((next(self._arrivals), item))

    def pop(self):
        """The next item by fair share (the caller charges its cost with `charge`)."""
        tenant = min(self._queues, key=lambda t: (self._served[t], self._queues[t][0][0]))
        _, item = self._queues[tenant].popleft()
        if not self._queues[tenant]:
            del self._queues[tenant]
        return tenant, item

    def charge(self, tenant: str, tokens: int) -> None:
        """Counts `tokens` dispatched for tenant (queued or not)."""
        served = max(self._served.get(tenant, 0.0), self._clock if tenant not in self._queues else 0.0)
        self._served[tenant] = served + tokens / self._weight_of(tenant)
        self._clock = max(self._clock, min((self._served[t] for t in self._queues), default=self._served[tenant]))

    def remove(self, tenant: str, item) -> bool:
        """Drops a waiter that gave up; False when it is not queued."""
        queue = self._queues.get(tenant)
        for entry in queue or ():
            if entry[1] is item:
                queue.remove(entry)
                if not queue:
                    del self._queues[tenant]
                return True
        return False
