"""The puller contract: how a decode worker gets a prompt's KV from the worker that holds it.

Who calls what, and who owns which block when:
  1. The holder calls KvSource.lend() after prefill; from then the lent blocks belong to the lease.
  2. The decode worker allocates dst blocks in its own pool, then `await puller.pull(handle, dst)`.
     During pull the puller writes dst blocks and nothing else; the caller must not touch them.
  3. After pull returns or raises, the caller calls `await puller.release(handle)` exactly once
     (also on failure: the holder keeps the blocks until release or lease expiry).
  4. If pull raised, the dst blocks hold garbage: free them or recompute the prompt into them.
"""

import asyncio
import importlib
import time
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from kvtransfer.checksum import block_checksums, mismatched_positions
from kvtransfer.errors import KvChecksumError, KvIncompatibleError
from kvtransfer.handle import KvHandle
from kvtransfer.layout import KvLayout


class TransferResult(NamedTuple):
    transport: str
    num_bytes: int
    # Wall time of the whole pull() call: handshake (if not cached), bytes, checksum verification.
    seconds: float
    # Attempts beyond the first (e.g. re-handshake after the holder restarted).
    retries: int
    # Part of `seconds` spent verifying checksums.
    verify_seconds: float = 0.0


class KvPuller(ABC):
    """Pulls leased blocks from a holder into the local pool. One instance per local pool,
    shared by all requests; pulls may run concurrently on one event loop."""

    name: str = ""

    def __init__(self, pool: torch.Tensor, layout: KvLayout) -> None:
        layout.check_pool(pool)
        self.pool = pool
        self.layout = layout

    async def connect(self, transfer_address: str) -> None:
        """Optional warm-up: do (and cache) the handshake with a holder before the first pull.
        Raises KvIncompatibleError when the layouts differ."""

    @abstractmethod
    async def pull(self, handle: KvHandle, dst_block_ids: list[int]) -> TransferResult:
        """Write handle.block_ids[i]'s bytes into local block dst_block_ids[i] for every i, then
        verify them against handle.block_checksums.

        Raises KvIncompatibleError (layout/version mismatch; nothing moved), KvLeaseNotFound
        (released or expired), KvChecksumError (bytes landed wrong: recompute, do not decode),
        KvTransferError (anything else). Never releases the lease.
        """

    @abstractmethod
    async def release(self, handle: KvHandle) -> bool:
        """Tell the holder it may reuse the blocks (ReleaseKv). False if the lease was already gone."""

    async def close(self) -> None:
        """Drop connections and registrations. The pool itself stays the caller's."""

    def check_request(self, handle: KvHandle, dst_block_ids: list[int]) -> None:
        """Validate a pull before moving anything (raises KvIncompatibleError / ValueError)."""
        if handle.compat_hash != self.layout.compat_hash:
            raise KvIncompatibleError(f"handle layout {handle.compat_hash} ({handle.layout}) != local "
                                      f"{self.layout.compat_hash} ({self.layout})")
        if len(dst_block_ids) != len(handle.block_ids):
            raise ValueError(f"{len(dst_block_ids)} dst blocks for {len(handle.block_ids)} source blocks")
        if len(set(dst_block_ids)) != len(dst_block_ids):
            raise ValueError("dst_block_ids must be distinct")
        num_blocks = self.pool.shape[0]
        if any(not 0 <= b < num_blocks for b in dst_block_ids):
            raise ValueError(f"dst block ids must be in [0, {num_blocks})")

    async def _verified(self, handle: KvHandle, dst_block_ids: list[int], start: float,
                        retries: int) -> TransferResult:
        """The bytes have landed: check them (off the event loop) and report the transfer."""
        verify_start = time.perf_counter()
        await asyncio.to_thread(self.verify, handle, dst_block_ids)
        end = time.perf_counter()
        return TransferResult(self.name, handle.num_bytes, end - start, retries, end - verify_start)

    def verify(self, handle: KvHandle, dst_block_ids: list[int]) -> None:
        """Raise KvChecksumError unless the dst blocks hash to the handle's checksums."""
        actual = block_checksums(self.pool, dst_block_ids)
        bad = mismatched_positions(actual, list(handle.block_checksums))
        if bad:
            raise KvChecksumError(bad, [dst_block_ids[i] for i in bad])


# name -> "module:Class"; imported on first use so a missing transport costs nothing.
_PULLERS = {
    "nixl": "kvtransfer.nixl_transport:NixlPuller",
    "grpc": "kvtransfer.grpc_transport:GrpcPuller",
}


def make_puller(name: str, pool: torch.Tensor, layout: KvLayout, **opts) -> KvPuller:
    """Build the puller registered under `name`. Unknown names raise ValueError listing the known."""
    if name not in _PULLERS:
        raise ValueError(f"unknown KV transport {name!r}; known: {sorted(_PULLERS)}")
    module_name, class_name = _PULLERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(pool, layout, **opts)


def known_transports() -> list[str]:
    return sorted(_PULLERS)


def available_transports() -> list[str]:
    """Transports usable in this process, best first: "nixl" only if nixl_cu12 imports and an
    agent with the UCX backend can be created; "grpc" always."""
    from kvtransfer.nixl_transport import nixl_available
    return (["nixl"] if nixl_available() else []) + ["grpc"]
