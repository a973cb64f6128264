"""NIXL transport: the puller READs leased blocks straight out of the holder's registered pool.

Costs are paid once, not per handoff: each side registers its whole pool once; the puller does
the gRPC handshake once per holder address and caches the remote agent and a prepared
descriptor list with one descriptor per remote block. A handoff is then one transfer request
(block indices into the two prepared lists), waited for in a worker thread so the event loop keeps
running, then a checksum pass.

Copy threads: on one host UCX reads with its `cma` transport, i.e. process_vm_readv in the thread
that posts the read, so one thread caps a handoff at one core's copy speed (~6 GB/s here, about
half of a 2-thread memcpy). With num_threads=N > 0 (default 2 on hosts with >= 2 cores) the
puller creates its UCX backend with NIXL's thread pool and a `split_batch_size` of 16, and keeps
one descriptor per block (no merging), so NIXL splits every handoff of >= 16 blocks into N chunks
read in parallel by N dedicated UCX workers (threads that sleep when idle). num_threads=0
restores the single posting thread. Two threads sharing one UCX worker do not scale: the worker
serializes its copies; 3 or 4 threads on 2 cores measured no faster than 2.

Waiting: with the thread pool, transfer() returns while the copy threads are still reading, and
the waiting thread polls. Polling every 20 us for the whole READ took a core's share from the two
copy threads on a 2-core host (0.62x a 2-thread memcpy at 2048 tokens); the puller now sleeps
through 85% of the READ's expected time (CopyRate, learnt per puller and size) and only then polls:
0.90x in the same run (2026-11-23, 7.5 -> 10.8 GB/s). Only READs split across the copy threads
wait that way: any other READ moves only while its waiter drives UCX progress (e.g. over TCP).

UCX reads its environment (UCX_TLS, UCX_NET_DEVICES, ...) when an agent is created, so set it
before constructing a KvSource or NixlPuller.
"""

import asyncio
import functools
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from kvtransfer.base import KvPuller, TransferResult
from kvtransfer.client import HolderClients, insecure_channel
from kvtransfer.errors import KvLeaseNotFound, KvTransferError
from kvtransfer.handle import KvHandle
from kvtransfer.layout import KvLayout

try:
    import nixl_cu12._api as _nixl_api
    from nixl_cu12 import nixl_agent, nixl_agent_config, nixl_thread_sync_t
except ImportError:  # the rest of kvtransfer works without NIXL
    _nixl_api = nixl_agent = nixl_agent_config = nixl_thread_sync_t = None

log = logging.getLogger(__name__)

DESCRIPTOR_MODES = ("prepped", "coalesced")
# The progress thread's wait between polls. nixl_agent hard-codes 0, which makes an idle agent spin
# a whole core: fatal on a 2-core worker that also runs the model. 100 us costs ~2% of a core.
DEFAULT_PROGRESS_DELAY_US = 100
# Parallel copy threads of a puller (see the module docstring); 0 = the posting thread copies.
DEFAULT_NUM_THREADS = 2 if (os.cpu_count() or 1) >= 2 else 0
SPLIT_MIN_DESCRIPTORS = 16  # smaller handoffs stay on one copy thread
# First look at a posted READ after this fraction of its expected copy time (see NixlPuller._wait).
EARLY_LOOK_FRACTION = 0.85
_construct_lock = threading.Lock()


@functools.cache
def nixl_available() -> bool:
    """True when nixl_cu12 imports and an agent with the UCX backend can be created here."""
    if nixl_agent is None:
        return False
    try:
        agent = _new_agent(f"pdmesh-probe-{uuid.uuid4().hex[:8]}", nixl_agent_config(backends=["UCX"]))
        return "UCX" in agent.backends
    except Exception as e:  # noqa: BLE001 -- any failure means "not usable here"
        log.info("NIXL unavailable: %s", e)
        return False


def _new_agent(name: str, config, progress_delay_us: int = DEFAULT_PROGRESS_DELAY_US):
    """nixl_agent(name, config) with the progress thread's delay set (the wrapper does not expose it)."""
    with _construct_lock:
        bound = _nixl_api.nixlBind.nixlAgent

        def with_delay(agent_name, agent_config):
            agent_config.pthrDelay = progress_delay_us
            return bound(agent_name, agent_config)

        _nixl_api.nixlBind.nixlAgent = with_delay
        try:
            return nixl_agent(name, config)
        finally:
            _nixl_api.nixlBind.nixlAgent = bound


def pool_memory(pool: torch.Tensor) -> tuple[str, int]:
    """NIXL memory type and device id of a pool: ("DRAM", 0) on host, ("VRAM", index) on CUDA."""
    if pool.device.type == "cuda":
        return "VRAM", pool.device.index or 0
    if pool.device.type == "cpu":
        return "DRAM", 0
    raise ValueError(f"NIXL cannot register a pool on {pool.device}")


def block_descs(base_address: int, block_ids, block_bytes: int, device_id: int) -> np.ndarray:
    """Nx3 (address, length, device) descriptors, one per listed block."""
    ids = np.asarray(block_ids, dtype=np.uint64)
    descs = np.empty((len(ids), 3), dtype=np.uint64)
    descs[:, 0] = np.uint64(base_address) + ids * np.uint64(block_bytes)
    descs[:, 1] = block_bytes
    descs[:, 2] = device_id
    return descs


def contiguous_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) runs where both sides advance by one block together."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


class CopyRate:
    """A puller's recent READ speed, to plan when to look at a transfer again. The plan should err
    short: an early look costs a few polls, a late one adds latency. A READ still running at the
    first look gives its exact time (a faster one raises the rate at once, a slower one pulls it
    down gradually); one already done may have finished long before, so the rate goes up a step.
    Races between concurrent pulls are benign (a float either way)."""

    def __init__(self, decay: float = 0.8, step_up: float = 2.0) -> None:
        self.bytes_per_s = 0.0
        self.decay = decay
        self.step_up = step_up

    def expected_s(self, num_bytes: int) -> float:
        """Seconds a READ of num_bytes should take; 0 before the first observation."""
        return num_bytes / self.bytes_per_s if self.bytes_per_s > 0 else 0.0

    def first_look_s(self, num_bytes: int) -> float:
        """Seconds after posting a READ of num_bytes to first look at it (0: at once)."""
        return self.expected_s(num_bytes) * EARLY_LOOK_FRACTION

    def learn(self, num_bytes: int, seconds: float, running_at_first_look: bool) -> None:
        """A READ of num_bytes was seen done `seconds` after posting: its exact time if it was
        still running at the first look (observe), else an upper bound (finished_within)."""
        (self.observe if running_at_first_look else self.finished_within)(num_bytes, seconds)

    def observe(self, num_bytes: int, seconds: float) -> None:
        """A READ of num_bytes took `seconds` (seen finishing, to within a poll)."""
        rate = num_bytes / max(seconds, 1e-9)
        self.bytes_per_s = rate if rate > self.bytes_per_s else self.decay * self.bytes_per_s + (1 - self.decay) * rate

    def finished_within(self, num_bytes: int, seconds: float) -> None:
        """A READ of num_bytes was already done when first looked at, `seconds` after posting."""
        self.bytes_per_s = max(self.bytes_per_s * self.step_up, num_bytes / max(seconds, 1e-9))


class NixlAgent:
    """A NIXL agent (UCX backend) with one KV pool registered once for its lifetime."""

    def __init__(self, pool: torch.Tensor, name: str, thread_safe: bool = False, progress_thread: bool = True,
                 progress_delay_us: int = DEFAULT_PROGRESS_DELAY_US, num_threads: int = 0) -> None:
        if nixl_agent is None:
            raise KvTransferError("nixl_cu12 is not installed")
        sync = nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT if thread_safe else None
        self.name = name
        self.num_threads = num_threads
        config = nixl_agent_config(enable_prog_thread=progress_thread, backends=[], sync_mode=sync)
        self.agent = _new_agent(name, config, progress_delay_us)
        # num_threads > 0: NIXL's UCX thread pool. It splits requests of >= split_batch_size
        # descriptors (its default, 1024, never splits a KV handoff); below 16 blocks (9 MiB here)
        # waking the copy threads cost more than it saved (128 tokens: 3.0 -> 2.5 GB/s).
        init = {"num_threads": str(num_threads), "split_batch_size": str(SPLIT_MIN_DESCRIPTORS)} if num_threads > 0 else {}
        try:
            self.agent.create_backend("UCX", init)
        except Exception as e:  # noqa: BLE001 -- NIXL raises its own types
            raise KvTransferError(f"NIXL UCX backend unavailable: {e}") from e
        if "UCX" not in self.agent.backends:
            raise KvTransferError("NIXL UCX backend unavailable")
        self.pool = pool
        self.memory_type, self.device_id = pool_memory(pool)
        self.base_address = pool.data_ptr()
        self.num_blocks = pool.shape[0]
        self._registration = self.agent.register_memory(pool)

    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def close(self) -> None:
        if self._registration is not None:
            self.agent.deregister_memory(self._registration)
            self._registration = None


@dataclass
class _Peer:
    agent_name: str
    dlist: object  # prepared descriptor list over all of the holder's blocks
    base_address: int
    num_blocks: int
    memory_type: str
    device_id: int


class NixlPuller(KvPuller):
    """KvPuller over NIXL READ. Options: descriptor_mode ("prepped", the default: one descriptor
    per block, selected by index from lists prepared once; "coalesced": one descriptor per
    contiguous run, built per handoff, and since NIXL merges contiguous descriptors a contiguous
    handoff is one descriptor on one copy thread: 0.49x memcpy vs 0.82x at 2048 tokens),
    num_threads (parallel copy threads, see the module docstring; 0 = one request on one thread),
    timeout_s for one transfer, poll_sleep_s between state checks once the planned first look found
    the READ running, progress_thread (off: the waiting thread drives UCX itself, which measured
    ~2x faster on a 2-core host than a competing progress thread).

    Leases: NIXL reads memory, not leases. A lease this puller released, or whose expiry time has
    passed, is refused with KvLeaseNotFound before reading; a lease that ends *during* the read
    can only hand back reused blocks, which the checksum pass turns into KvChecksumError."""

    name = "nixl"

    def __init__(self, pool: torch.Tensor, layout: KvLayout, descriptor_mode: str = "prepped",
                 timeout_s: float = 30.0, poll_sleep_s: float = 20e-6, agent_name: str | None = None,
                 progress_thread: bool = False, num_threads: int | None = None,
                 make_channel=insecure_channel) -> None:
        super().__init__(pool, layout)
        if num_threads is None:
            num_threads = DEFAULT_NUM_THREADS
        if descriptor_mode not in DESCRIPTOR_MODES:
            raise ValueError(f"unknown descriptor_mode {descriptor_mode!r}; known: {list(DESCRIPTOR_MODES)}")
        self.descriptor_mode = descriptor_mode
        self.timeout_s = timeout_s
        self.poll_sleep_s = poll_sleep_s
        self._copy_rates: defaultdict[int, CopyRate] = defaultdict(CopyRate)  # see _copy_rate
        self.local = NixlAgent(pool, agent_name or f"pdmesh-puller-{uuid.uuid4().hex[:12]}", thread_safe=True,
                               progress_thread=progress_thread, num_threads=num_threads)
        self._local_dlist = self.local.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", block_descs(self.local.base_address, range(self.local.num_blocks),
                                           layout.block_bytes, self.local.device_id), self.local.memory_type)
        self._clients = HolderClients(make_channel=make_channel)  # metadata, leases: over (m)TLS if set
        self._peers: dict[str, _Peer] = {}
        self._peer_locks: dict[str, asyncio.Lock] = {}
        self._released: OrderedDict[str, None] = OrderedDict()  # recent leases we released ourselves

    async def connect(self, transfer_address: str) -> None:
        await self._peer(transfer_address)

    async def pull(self, handle: KvHandle, dst_block_ids: list[int]) -> TransferResult:
        self.check_request(handle, dst_block_ids)
        start = time.perf_counter()
        self._check_lease_alive(handle)
        retries = 0
        while True:
            peer = await self._peer(handle.transfer_address)
            if max(handle.block_ids, default=0) >= peer.num_blocks:
                raise KvTransferError(f"block ids beyond the holder's {peer.num_blocks} blocks")
            state = await asyncio.to_thread(self._read, peer, list(handle.block_ids), list(dst_block_ids))
            if state == "DONE":
                break
            # The holder may have restarted under the same address: its cached metadata is stale.
            self._forget(handle.transfer_address)
            if retries:
                raise KvTransferError(f"NIXL READ from {handle.transfer_address} ended in state {state}")
            retries += 1
        return await self._verified(handle, dst_block_ids, start, retries)

    async def release(self, handle: KvHandle) -> bool:
        self._released[handle.lease_id] = None
        while len(self._released) > 4096:
            self._released.popitem(last=False)
        return await self._clients.get(handle.transfer_address).release(handle.lease_id)

    async def close(self) -> None:
        for address in list(self._peers):
            self._forget(address)
        self.local.agent.release_dlist_handle(self._local_dlist)
        self.local.close()
        await self._clients.close()

    def _check_lease_alive(self, handle: KvHandle) -> None:
        # NIXL reads memory, not leases: refuse leases known to be gone. A lease that ends during
        # the read can only hand us reused blocks, which the checksum pass rejects.
        if handle.lease_id in self._released:
            raise KvLeaseNotFound(handle.lease_id, "already released by this puller")
        if handle.lease_expires_unix_ms and handle.lease_expires_unix_ms < time.time() * 1000:
            raise KvLeaseNotFound(handle.lease_id, "expired")

    async def _peer(self, address: str) -> _Peer:
        lock = self._peer_locks.setdefault(address, asyncio.Lock())
        async with lock:
            if address not in self._peers:
                self._peers[address] = await self._handshake(address)
            return self._peers[address]

    async def _handshake(self, address: str) -> _Peer:
        reply = await self._clients.get(address).handshake(self.layout)
        if not reply.nixl_agent_name:
            raise KvTransferError(f"holder {address} does not serve NIXL")
        agent = self.local.agent
        try:  # a holder restarted under the same agent name: drop its stale metadata first
            agent.remove_remote_agent(reply.nixl_agent_name)
        except Exception:  # noqa: BLE001 -- the usual case: we never knew it
            pass
        name = agent.add_remote_agent(reply.nixl_agent_metadata)
        name = name.decode() if isinstance(name, bytes) else name
        descs = block_descs(reply.pool_base_address, range(reply.num_blocks), self.layout.block_bytes,
                            reply.device_id)
        dlist = agent.prep_xfer_dlist(name, descs, reply.memory_type)
        return _Peer(name, dlist, reply.pool_base_address, reply.num_blocks, reply.memory_type, reply.device_id)

    def _forget(self, address: str) -> None:
        peer = self._peers.pop(address, None)
        if peer is None:
            return
        try:
            self.local.agent.release_dlist_handle(peer.dlist)
            self.local.agent.remove_remote_agent(peer.agent_name)
        except Exception as e:  # noqa: BLE001 -- best effort: the peer is being dropped anyway
            log.warning("dropping NIXL peer %s: %s", address, e)

    def _read(self, peer: _Peer, src: list[int], dst: list[int]) -> str:
        """One READ request for all blocks; blocks this worker thread until DONE/ERR/timeout."""
        agent = self.local.agent
        try:
            xfer, on_copy_threads = self._make_request(peer, src, dst)
        except Exception as e:  # noqa: BLE001 -- a stale peer fails here; caller re-handshakes
            log.warning("NIXL request to %s failed: %s", peer.agent_name, e)
            return "ERR"
        num_bytes = len(src) * self.layout.block_bytes
        try:
            posted = time.monotonic()
            state = agent.transfer(xfer)  # DONE already when one thread copied while posting
            if state == "PROC":
                state = self._wait(xfer, num_bytes, posted, on_copy_threads)
            return state
        except KvTransferError:
            raise
        except Exception as e:  # noqa: BLE001 -- NIXL raises its own types; the caller retries once
            log.warning("NIXL READ from %s failed: %s", peer.agent_name, e)
            return "ERR"
        finally:
            try:
                agent.release_xfer_handle(xfer)
            except Exception as e:  # noqa: BLE001 -- an in-flight handle cannot be released; log it
                log.warning("releasing NIXL transfer handle: %s", e)

    def _copy_rate(self, num_bytes: int) -> CopyRate:
        """The rate learnt from READs of this size within 2x: per-READ costs make small READs
        slower per byte (7.0 GB/s at 18 MiB, 9.8 at 288 MiB here), so one rate for all sizes
        would plan each size from the others."""
        return self._copy_rates[num_bytes.bit_length()]

    def _wait(self, xfer, num_bytes: int, posted: float, on_copy_threads: bool) -> str:
        """Check every poll_sleep_s until the READ leaves PROC. A READ on the copy threads moves
        without us: sleep through most of its expected time first, because they need the cores (a
        waiter that woke every few tens of microseconds took CPU from them on a 2-core host). Any
        other READ moves only while we check (UCX progress, e.g. over TCP): no sleep there."""
        agent = self.local.agent
        deadline = posted + self.timeout_s
        rate = self._copy_rate(num_bytes) if on_copy_threads else None
        if rate is not None:
            time.sleep(max(0.0, min(posted + rate.first_look_s(num_bytes), deadline) - time.monotonic()))
        state = agent.check_xfer_state(xfer)
        running_at_first_look = state == "PROC"
        while state == "PROC":  # each check also drives UCX progress (no progress thread here)
            if time.monotonic() > deadline:
                raise KvTransferError(f"NIXL READ timed out after {self.timeout_s}s")
            time.sleep(self.poll_sleep_s)
            state = agent.check_xfer_state(xfer)
        if state == "DONE" and rate is not None:
            rate.learn(num_bytes, time.monotonic() - posted, running_at_first_look)
        return state

    def _make_request(self, peer: _Peer, src: list[int], dst: list[int]) -> tuple[object, bool]:
        """The READ request, and whether NIXL will split it across the copy threads (it does when
        it has >= SPLIT_MIN_DESCRIPTORS descriptors and the backend has a thread pool)."""
        agent = self.local.agent
        split = self.local.num_threads > 0
        if self.descriptor_mode == "prepped":
            local_ids, remote_ids = np.asarray(dst, dtype=np.int32), np.asarray(src, dtype=np.int32)
            xfer = agent.make_prepped_xfer("READ", self._local_dlist, local_ids, peer.dlist, remote_ids,
                                           skip_desc_merge=split)  # split: keep one descriptor per block
            return xfer, split and len(src) >= SPLIT_MIN_DESCRIPTORS
        # NIXL merges contiguous descriptors here (only prepped lists can skip that), so a
        # contiguous handoff is one descriptor: below the split threshold, on one thread.
        block_bytes = self.layout.block_bytes
        runs = contiguous_runs(src, dst)
        local = np.array([(self.local.base_address + d * block_bytes, n * block_bytes, self.local.device_id)
                          for _, d, n in runs], dtype=np.uint64)
        remote = np.array([(peer.base_address + s * block_bytes, n * block_bytes, peer.device_id)
                           for s, _, n in runs], dtype=np.uint64)
        xfer = agent.initialize_xfer("READ", agent.get_xfer_descs(local, self.local.memory_type),
                                     agent.get_xfer_descs(remote, peer.memory_type), peer.agent_name)
        return xfer, split and len(runs) >= SPLIT_MIN_DESCRIPTORS
