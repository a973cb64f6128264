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

Each block's holders are a bitmask over worker slots (a slot per worker, freed when its cache is
cleared), so matching a prompt costs one AND per block however many workers hold it; only a
worker dropping out of the match (once per worker) costs a Python step.
"""

import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator


class PrefixIndex:
    def __init__(self, expect_ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self._holders: dict[int, int] = {}  # hash -> bitmask of the slots of the workers holding it
        self._blocks_of: dict[str, set[int]] = {}
        self._expected: dict[int, dict[str, float]] = {}  # hash -> worker -> expiry
        # (expiry, worker, hashes) per expect call, oldest first (one ttl: expiries only grow)
        self._expiring: deque[tuple[float, str, list[int]]] = deque()
        self._bit: dict[str, int] = {}  # worker -> 1 << its slot
        self._worker_at: list[str | None] = []  # slot -> worker (None: free)
        self._expect_ttl_s, self._clock = expect_ttl_s, clock

    def expect(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Placement sent work to worker_id that will store these blocks."""
        self._bit_of(worker_id)
        now = self._clock()
        self._purge_expired(now)
        expiry, block_hashes = now + self._expect_ttl_s, list(block_hashes)
        for h in block_hashes:
            self._expected.setdefault(h, {})[worker_id] = expiry
        self._expiring.append((expiry, worker_id, block_hashes))

    def _purge_expired(self, now: float) -> None:
        """Drops the expectations that expired by now: only those (an expect call's are visited
        once), never a walk over every expectation."""
        while self._expiring and self._expiring[0][0] <= now:
            expiry, worker_id, block_hashes = self._expiring.popleft()
            for h in block_hashes:
                pending = self._expected.get(h)
                if pending is not None and pending.get(worker_id) == expiry:  # not renewed since
                    del pending[worker_id]
                    if not pending:
                        del self._expected[h]

    def _unexpect(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        for h in block_hashes:
            pending = self._expected.get(h)
            if pending is not None and pending.pop(worker_id, None) is not None and not pending:
                del self._expected[h]

    def stored(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        bit, holders = self._bit_of(worker_id), self._holders
        block_hashes = list(block_hashes)
        for h in block_hashes:
            holders[h] = holders.get(h, 0) | bit
        self._blocks_of.setdefault(worker_id, set()).update(block_hashes)
        self._unexpect(worker_id, block_hashes)

    def removed(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        bit, blocks = self._bit.get(worker_id, 0), self._blocks_of.get(worker_id, set())
        for h in block_hashes:
            held = self._holders.get(h, 0)
            if held & bit:
                if held == bit:
                    del self._holders[h]
                else:
                    self._holders[h] = held ^ bit
            blocks.discard(h)

    def cleared(self, worker_id: str) -> None:
        """The worker's cache is empty (also: the worker is gone). Its expectations go too, and
        its slot is free for the next worker."""
        if worker_id not in self._bit:  # no slot: it holds and is expected to hold nothing
            return
        self.removed(worker_id, list(self._blocks_of.pop(worker_id, ())))
        self._unexpect(worker_id, [h for h, pending in self._expected.items() if worker_id in pending])
        bit = self._bit.pop(worker_id, 0)
        if bit:
            self._worker_at[bit.bit_length() - 1] = None

    def num_blocks(self, worker_id: str) -> int:
        return len(self._blocks_of.get(worker_id, ()))

    def num_expected(self) -> int:
        """(block, worker) expectations held; the expired ones go on the next expect call."""
        return sum(map(len, self._expected.values()))

    def holders(self, block_hash: int) -> set[str]:
        return set(self._workers_in(self._holders.get(block_hash, 0)))

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
        pool matches nothing. Costs one AND per block plus a step per worker that matched."""
        matched: dict[str, int] = {}
        if not block_hashes:
            return matched
        holders, expected, bits = self._holders, self._expected if include_expected else {}, self._bit
        alive, now = -1, self._clock()  # alive: the slots matching every block so far; at first all
        for i, h in enumerate(block_hashes):
            still = holders.get(h, 0) & alive
            dropped = alive & ~still
            pending = expected.get(h) if dropped else None
            if pending:  # an expected block keeps its worker in the match until it expires
                for w, expiry in pending.items():
                    bit = bits[w]
                    if dropped & bit and expiry > now:
                        still |= bit
                        dropped ^= bit
            if dropped and i:  # (at block 0 nobody matched anything yet)
                for w in self._workers_in(dropped):
                    matched[w] = i
            alive = still
            if not alive:
                break
        else:
            for w in self._workers_in(alive):
                matched[w] = len(block_hashes)
        return {w: n for w, n in matched.items() if w in among}

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

    def _bit_of(self, worker_id: str) -> int:
        bit = self._bit.get(worker_id)
        if bit is None:
            slot = next((s for s, w in enumerate(self._worker_at) if w is None), len(self._worker_at))
            if slot == len(self._worker_at):
                self._worker_at.append(None)
            self._worker_at[slot] = worker_id
            bit = self._bit[worker_id] = 1 << slot
        return bit

    def _workers_in(self, bits: int) -> Iterator[str]:
        while bits:
            low = bits & -bits
            yield self._worker_at[low.bit_length() - 1]
            bits ^= low
