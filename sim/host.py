"""Compute on a host shared by workers: processor sharing with a measured slowdown.

A worker's computation is `work` seconds long when it runs alone (what the cost model says).
While n of the workers on one host compute at the same time, each advances at 1 / slowdown(n)
of that speed: on a machine with fewer cores than busy workers they take turns, and even with
a core each they share memory bandwidth and caches. slowdown(1) is 1.0 by definition; a host
whose slowdown is 1 for every n is a dedicated device per worker (a GPU each).

Invariant: every computation's remaining work is exact as of `_last`; whenever the number of
computing workers changes, remaining work is brought up to date first, then every end event is
rescheduled at the new rate (stale end events are recognised by their version and ignored).
"""

from collections.abc import Callable, Sequence


def slowdown_curve(measured: Sequence[float], cores: float, background: float = 0.0) -> Callable[[int], float]:
    """slowdown(n) from factors measured with 1..len(measured) workers computing together; past
    the table, processor sharing of the cores grows it in proportion to n (never below the
    last measured factor).

    background: cores' worth of CPU that other processes on the host use meanwhile (other
    tenants, the router, a client). The workers then share what is left: the measured factor's
    core-sharing part, max(1, n / cores), becomes max(1, n / (cores - background)); the rest of it
    (memory bandwidth, caches) stays. At least a quarter of a core is left to the workers."""
    if not measured or measured[0] != 1.0 or cores <= 0:
        raise ValueError("host_slowdown must start at 1.0 (one worker alone) and host_cores must be positive")
    if background < 0:
        raise ValueError("background cores cannot be negative")
    last = len(measured)
    left = max(0.25, cores - background)

    def table(n: int) -> float:
        if n <= last:
            return measured[max(n, 1) - 1]
        return max(measured[-1], measured[-1] * n / max(last, cores))

    def slowdown(n: int) -> float:
        return table(n) * max(1.0, n / left) / max(1.0, n / cores)
    return slowdown


def dedicated(n: int) -> float:
    return 1.0


class Host:
    """The workers of one host. `at(t, fn, *args)` schedules an event on the simulation clock."""

    def __init__(self, clock: Callable[[], float], at, slowdown: Callable[[int], float] = dedicated):
        self._clock, self._at, self._slowdown = clock, at, slowdown
        self._active: dict[str, list] = {}  # worker id -> [remaining work, fn, args, version, work]
        self._last = 0.0
        self._version = 0

    @property
    def rate(self) -> float:
        """Work seconds done per second by each computing worker right now."""
        return 1.0 / self._slowdown(len(self._active))

    def start(self, worker_id: str, work_s: float, fn, *args) -> None:
        """worker_id computes for work_s seconds of work, then fn(*args) runs (one computation
        per worker at a time)."""
        if worker_id in self._active:
            raise RuntimeError(f"{worker_id} is already computing")
        self._advance()
        self._active[worker_id] = [work_s, fn, args, 0, work_s]
        self._reschedule()

    def work_done(self, worker_id: str) -> float:
        """Work seconds done so far in worker_id's current computation."""
        self._advance()
        entry = self._active[worker_id]
        return entry[4] - entry[0]

    def resize(self, worker_id: str, work_s: float) -> None:
        """Changes the total work of worker_id's current computation (not below what is done)."""
        self._advance()
        entry = self._active[worker_id]
        entry[0] = max(0.0, work_s - (entry[4] - entry[0]))
        entry[4] = work_s
        self._schedule(worker_id, entry, self.rate)

    def _advance(self) -> None:
        now = self._clock()
        if self._active and now > self._last:
            done = (now - self._last) * self.rate
            for entry in self._active.values():
                entry[0] = max(0.0, entry[0] - done)
        self._last = now

    def _reschedule(self) -> None:
        rate = self.rate
        for worker_id, entry in self._active.items():
            self._schedule(worker_id, entry, rate)

    def _schedule(self, worker_id: str, entry: list, rate: float) -> None:
        self._version += 1
        entry[3] = self._version
        self._at(self._last + entry[0] / rate, self._end, worker_id, self._version)

    def _end(self, worker_id: str, version: int) -> None:
        entry = self._active.get(worker_id)
        if entry is None or entry[3] != version:
            return  # superseded: the rate or the work changed since this was scheduled
        self._advance()
        del self._active[worker_id]
        if self._active:
            self._reschedule()
        entry[1](*entry[2])
