"""Chained hashes of full KV blocks: the key of the prefix cache and of the router's prefix index.

A block's hash covers its own tokens and, through `parent_hash`, every token before it, so equal
hashes mean equal prefixes. The encoding is fixed so every process and machine agrees:

    xxh3_64( b"\\x01" + parent as uint64 LE   (or b"\\x00" + 8 zero bytes for the first block)
             + each token id as int64 LE )

Never use Python's hash() here (it is salted per process). Only xxhash and the stdlib are imported
so the router can use this module without torch.
"""

import struct
from collections.abc import Sequence

import xxhash

_UINT64_MASK = (1 << 64) - 1


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """64-bit unsigned hash of one block given its parent's hash (None for the first block)."""
    if parent_hash is None:
        header = struct.pack("<BQ", 0, 0)
    else:
        header = struct.pack("<BQ", 1, parent_hash & _UINT64_MASK)
    body = struct.pack(f"<{len(token_ids)}q", *token_ids)
    return xxhash.xxh3_64_intdigest(header + body)


def block_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block is not hashed)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start:start + block_size])
        hashes.append(parent_hash)
    return hashes
