"""xxh3-64 of KV blocks, read in place from the pool (no copy for host pools).

On the hot path of every handoff: the holder hashes when it lends, the puller when bytes land.
xxhash releases the GIL, so large batches are split across a small thread pool.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import xxhash

_PARALLEL_MIN_BYTES = 8 << 20
_executor: ThreadPoolExecutor | None = None


def pool_bytes(pool: torch.Tensor) -> np.ndarray:
    """The pool's storage as a flat uint8 array sharing its memory (host pools only)."""
    if pool.device.type != "cpu":
        raise ValueError("pool_bytes needs a host pool")
    if not pool.is_contiguous():
        raise ValueError("pool must be contiguous")
    return pool.detach().reshape(-1).view(torch.uint8).numpy()


def block_checksums(pool: torch.Tensor, block_ids: list[int]) -> list[int]:
    """xxh3-64 of each listed block's bytes, in the order given.

    Host pools are hashed in place; a device pool's blocks are first copied to host (one copy).
    """
    block_ids = list(block_ids)
    if pool.device.type != "cpu":
        host = pool[torch.tensor(block_ids, dtype=torch.long, device=pool.device)].cpu().contiguous()
        return block_checksums(host, list(range(len(block_ids))))
    data = pool_bytes(pool)
    block_bytes = data.nbytes // pool.shape[0]
    views = [data[b * block_bytes:(b + 1) * block_bytes] for b in _checked(block_ids, pool.shape[0])]
    if len(views) < 2 or len(views) * block_bytes < _PARALLEL_MIN_BYTES:
        return _hash_all(views)
    parts = _split(views, _num_workers())
    return [h for part in _get_executor().map(_hash_all, parts) for h in part]


def mismatched_positions(actual: list[int], expected: list[int]) -> list[int]:
    """Positions where two checksum lists differ (a length mismatch marks the tail as bad)."""
    bad = [i for i, (a, e) in enumerate(zip(actual, expected)) if a != e]
    return bad + list(range(min(len(actual), len(expected)), max(len(actual), len(expected))))


def _hash_all(views: list[np.ndarray]) -> list[int]:
    return [xxhash.xxh3_64_intdigest(v) for v in views]


def _checked(block_ids: list[int], num_blocks: int) -> list[int]:
    for b in block_ids:
        if not 0 <= b < num_blocks:
            raise IndexError(f"block id {b} outside pool of {num_blocks} blocks")
    return block_ids


def _split(items: list, n: int) -> list[list]:
    size = -(-len(items) // n)
    return [items[i:i + size] for i in range(0, len(items), size)]


def _num_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(_num_workers(), thread_name_prefix="kv-checksum")
    return _executor
