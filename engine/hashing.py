"""Chained hashes of full KV blocks: the key of the prefix cache and of the router's prefix index.

A block's hash covers its own tokens and, through `parent_hash`, every token before it, so equal
hashes mean equal prefixes. The encoding is fixed so every process and machine agrees:

    xxh3_64( b"\\x01" + parent as uint64 LE   (or b"\\x00" + 8 zero bytes for the first block)
             + each token id as int64 LE )

Never use Python's hash() here (it is salted per process). Only xxhash and the stdlib are imported
so the router can use this module without torch.
"""

import struct
import sys
from array import array
from collections.abc import Sequence

import xxhash

_UINT64_MASK = (1 << 64) - 1
_HEADER = struct.Struct("<BQ")
_FIRST_HEADER = _HEADER.pack(0, 0)


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """64-bit unsigned hash of one block given its parent's hash (None for the first block)."""
    return xxhash.xxh3_64_intdigest(_header(parent_hash) + _int64_le_bytes(token_ids))


def block_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block is not hashed)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    end = len(token_ids) - len(token_ids) % block_size
    data = _int64_le_bytes(token_ids[:end])  # one pack for the whole prompt, sliced per block
    step = block_size * 8
    hashes = []
    for offset in range(0, len(data), step):
        parent_hash = xxhash.xxh3_64_intdigest(_header(parent_hash) + data[offset:offset + step])
        hashes.append(parent_hash)
    return hashes


def _header(parent_hash: int | None) -> bytes:
    return _FIRST_HEADER if parent_hash is None else _HEADER.pack(1, parent_hash & _UINT64_MASK)


def _int64_le_bytes(token_ids: Sequence[int]) -> bytes:
    packed = array("q", token_ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()
