"""The router's prefix index: chained block hash -> workers holding that block, rebuilt only from
the workers' KV events (stored / removed / cleared) and dropped with a worker when it goes away.

Because block hashes are chained (engine/hashing.py), a worker holding block i of a prompt also
held blocks 0..i-1 when it stored it; the index still checks every block in order, so an evicted
middle block ends a worker's match.

Between placing a request and the worker's KV events arriving there is a gap (a prefill takes a
while); requests sharing the prefix that arrive in that gap should still go to the same worker.
So placement records what it *expects* a worker to store (`expect`); an expectation counts like
a held block until the worker confirms it with a stored event, or until it expires (ttl_s).
Expectations live apart from the confirmed index, which stays exactly what the workers said.
"""

import time
from collections.abc import Callable, Container, Iterable


class PrefixIndex:
    def __init__(self, expect_ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self._holders: dict[int, set[str]] = {}
        self._blocks_of: dict[str, set[int]] = {}
        self._expected: dict[int, dict[str, float]] = {}  # hash -> worker -> expiry
        self._expect_ttl_s, self._clock = expect_ttl_s, clock
        self._expect_calls = 0

    def expect(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Placement sent work to worker_id that will store these blocks."""
        expiry = self._clock() + self._expect_ttl_s
        for h in block_hashes:
            self._expected.setdefault(h, {})[worker_id] = expiry
        self._expect_calls += 1
        if self._expect_calls % 256 == 0:
            self._purge_expired()

    def _purge_expired(self) -> None:
        now = self._clock()
        for h in list(self._expected):
            live = {w: t for w, t in self._expected[h].items() if t > now}
            if live:
                self._expected[h] = live
            else:
                del self._expected[h]

    def _unexpect(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        for h in block_hashes:
            pending = self._expected.get(h)
            if pending is not None and pending.pop(worker_id, None) is not None and not pending:
                del self._expected[h]

    def stored(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        blocks = self._blocks_of.setdefault(worker_id, set())
        block_hashes = list(block_hashes)
        for h in block_hashes:
            self._holders.setdefault(h, set()).add(worker_id)
            blocks.add(h)
        self._unexpect(worker_id, block_hashes)

    def removed(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        blocks = self._blocks_of.get(worker_id, set())
        for h in block_hashes:
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._holders[h]
            blocks.discard(h)

    def cleared(self, worker_id: str) -> None:
        """The worker's cache is empty (also: the worker is gone). Its expectations go too."""
        self.removed(worker_id, list(self._blocks_of.pop(worker_id, ())))
        self._unexpect(worker_id, [h for h, pending in self._expected.items() if worker_id in pending])

    def num_blocks(self, worker_id: str) -> int:
        return len(self._blocks_of.get(worker_id, ()))

    def holders(self, block_hash: int) -> set[str]:
        return set(self._holders.get(block_hash, ()))

    def matched_blocks(self, block_hashes: list[int], worker_ids: Iterable[str],
                       include_expected: bool = True) -> dict[str, int]:
        """For each worker, how many leading blocks of the prompt it holds or (with
        include_expected) is expected to hold; 0 when none."""
        worker_ids = list(worker_ids)
        found = self.prefix_matches(block_hashes, set(worker_ids), include_expected)
        return {w: found.get(w, 0) for w in worker_ids}

    def prefix_matches(self, block_hashes: list[int], among: Container[str],
                       include_expected: bool = True) -> dict[str, int]:
        """The workers among `among` that hold (or, with include_expected, are expected to hold)
        at least the prompt's first block -> how many leading blocks. Only those: most of a large
        pool matches nothing, and this walk costs per block what the workers still matching cost,
        never the pool's size."""
        matched: dict[str, int] = {}
        alive: set[str] = set()  # workers holding every block so far
        now = self._clock()
        for i, h in enumerate(block_hashes):
            holders = self._holders.get(h, ())
            still = alive.intersection(holders) if i else {w for w in holders if w in among}
            pending = self._expected.get(h) if include_expected else None
            if pending:
                still |= {w for w, expiry in pending.items() if expiry > now and (w in alive if i else w in among)}
            for w in alive - still:
                matched[w] = i
            alive = still
            if not alive:
                break
        for w in alive:
            matched[w] = len(block_hashes)
        return matched

    def confirmed_blocks(self, block_hashes: list[int], worker_id: str) -> int:
        """How many leading blocks of the prompt the worker has confirmed with KV events."""
        held = self._blocks_of.get(worker_id, ())
        for i, h in enumerate(block_hashes):
            if h not in held:
                return i
        return len(block_hashes)

    def snapshot(self) -> dict[str, frozenset[int]]:
        """worker id -> blocks it holds (tests compare a rebuilt index with this)."""
        return {w: frozenset(b) for w, b in self._blocks_of.items() if b}
