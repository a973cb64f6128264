"""Leases: how long a holder keeps lent blocks for a puller.

Invariant: a lease's blocks are handed back to their owner (on_free) exactly once, by whichever
comes first of release() and expire(); the holder must not reuse them before on_free ran.
"""

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Lease:
    lease_id: str
    request_id: str
    block_ids: tuple[int, ...]
    expires_at: float  # on the table's clock (monotonic seconds)
    expires_unix_ms: int


class LeaseTable:
    """Thread-safe table of live leases.

    on_free(lease) is called exactly once per lease, outside the table's lock (it may call back
    into the table), from the thread that released or expired it.
    """

    def __init__(self, ttl_s: float, on_free: Callable[[Lease], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self._on_free = on_free
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def grant(self, request_id: str, block_ids: list[int]) -> Lease:
        """Lease block_ids for ttl_s from now. The caller must not reuse them until on_free."""
        now = self._clock()
        lease = Lease(uuid.uuid4().hex, request_id, tuple(block_ids), now + self.ttl_s,
                      int((time.time() + self.ttl_s) * 1000))
        with self._lock:
            self._leases[lease.lease_id] = lease
        return lease

    def get(self, lease_id: str) -> Lease | None:
        """The live lease, or None when unknown, released, or past its expiry (even if not swept yet)."""
        with self._lock:
            lease = self._leases.get(lease_id)
        return lease if lease is not None and lease.expires_at > self._clock() else None

    def release(self, lease_id: str) -> bool:
        """End a lease early and free its blocks. False when it was unknown or already gone."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._on_free(lease)
        return True

    def expire(self, now: float | None = None) -> list[Lease]:
        """Remove every lease past its expiry, calling on_free for each; returns them."""
        now = self._clock() if now is None else now
        with self._lock:
            expired = [lease for lease in self._leases.values() if lease.expires_at <= now]
            for lease in expired:
                del self._leases[lease.lease_id]
        for lease in expired:
            self._on_free(lease)
        return expired

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)
