"""The router's prefix index: chained block hash -> workers holding that block, rebuilt only from
the workers' KV events (stored / removed / cleared) and dropped with a worker when it goes away.

Because block hashes are chained (engine/hashing.py), a worker holding block i of a prompt also
held blocks 0..i-1 when it stored it; the index still checks every block in order, so an evicted
middle block ends a worker's match.
"""

from collections.abc import Iterable


class PrefixIndex:
    def __init__(self):
        self._holders: dict[int, set[str]] = {}
        self._blocks_of: dict[str, set[int]] = {}

    def stored(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        blocks = self._blocks_of.setdefault(worker_id, set())
        for h in block_hashes:
            self._holders.setdefault(h, set()).add(worker_id)
            blocks.add(h)

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
        """The worker's cache is empty (also: the worker is gone)."""
        self.removed(worker_id, list(self._blocks_of.pop(worker_id, ())))

    def num_blocks(self, worker_id: str) -> int:
        return len(self._blocks_of.get(worker_id, ()))

    def holders(self, block_hash: int) -> set[str]:
        return set(self._holders.get(block_hash, ()))

    def matched_blocks(self, block_hashes: list[int], worker_ids: Iterable[str]) -> dict[str, int]:
        """For each worker, how many leading blocks of the prompt it holds (0 when none)."""
        matched = {w: 0 for w in worker_ids}
        alive = set(matched)
        for i, h in enumerate(block_hashes):
            if not alive:
                break
            holders = self._holders.get(h)
            still = alive & holders if holders else set()
            for w in alive - still:
                matched[w] = i
            alive = still
        for w in alive:
            matched[w] = len(block_hashes)
        return matched

    def snapshot(self) -> dict[str, frozenset[int]]:
        """worker id -> blocks it holds (tests compare a rebuilt index with this)."""
        return {w: frozenset(b) for w, b in self._blocks_of.items() if b}
