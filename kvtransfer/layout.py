"""What the bytes of a KV block mean. Two sides must agree on it before any byte moves.

The pool is one contiguous tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim];
block b is the byte range [b * block_bytes, (b + 1) * block_bytes) of the pool.
"""

import hashlib
from dataclasses import dataclass

import torch

from pdmesh.v1 import common_pb2

# Version of the transfer protocol; part of compat_hash, so peers of different versions refuse
# each other in the handshake instead of moving bytes they would misread.
# History:
#   1: pool layout [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], one block is
#      one contiguous byte range; xxh3-64 per block; the puller READs over NIXL (whole pool
#      registered once, per-block descriptors) or streams PullKv; the puller releases via ReleaseKv.
WIRE_VERSION = 1

_ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}


@dataclass(frozen=True)
class KvLayout:
    """Shape and meaning of one KV block. Immutable; compare peers with compat_hash."""

    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.dtype not in _ELEMENT_SIZE:
            raise ValueError(f"unsupported dtype {self.dtype!r}; known: {sorted(_ELEMENT_SIZE)}")
        if min(self.block_size, self.num_layers, self.num_kv_heads, self.head_dim) <= 0:
            raise ValueError(f"block_size, num_layers, num_kv_heads and head_dim must be positive: {self}")
        if not self.model_id:
            raise ValueError("model_id must not be empty")

    @property
    def element_size(self) -> int:
        return _ELEMENT_SIZE[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def compat_hash(self) -> str:
        """Hex digest of every field plus WIRE_VERSION: equal hashes mean the bytes mean the same."""
        fields = (WIRE_VERSION, self.model_id, self.dtype, self.block_size, self.num_layers,
                  self.num_kv_heads, self.head_dim)
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]

    @classmethod
    def from_pool(cls, pool: torch.Tensor, model_id: str) -> "KvLayout":
        """Layout of a pool tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]."""
        if pool.dim() != 6 or pool.shape[2] != 2:
            raise ValueError(f"pool must be [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
                             f"got {tuple(pool.shape)}")
        if not pool.is_contiguous():
            raise ValueError("pool must be contiguous")
        _, num_layers, _, block_size, num_kv_heads, head_dim = pool.shape
        return cls(model_id, str(pool.dtype).removeprefix("torch."), block_size, num_layers, num_kv_heads, head_dim)

    def check_pool(self, pool: torch.Tensor) -> None:
        """Raise ValueError unless pool is a contiguous pool of this layout."""
        if KvLayout.from_pool(pool, self.model_id) != self:
            raise ValueError(f"pool {tuple(pool.shape)} {pool.dtype} does not match {self}")

    def to_proto(self) -> common_pb2.KvLayout:
        return common_pb2.KvLayout(
            model_id=self.model_id, dtype=self.dtype, block_size=self.block_size, num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, block_bytes=self.block_bytes,
            wire_version=WIRE_VERSION, compat_hash=self.compat_hash)

    @classmethod
    def from_proto(cls, msg: common_pb2.KvLayout) -> "KvLayout":
        """The layout the message describes. Its wire_version/compat_hash are the sender's: compare
        msg.compat_hash (not the rebuilt layout's) with ours to detect a peer of another version."""
        return cls(msg.model_id, msg.dtype, msg.block_size, msg.num_layers, msg.num_kv_heads, msg.head_dim)
