"""The holder side: lend KV blocks under a lease and serve them to pullers.

Ownership: blocks passed to lend() belong to the lease until on_free(lease) is called (after
ReleaseKv or expiry); only then may the engine reuse them. The whole pool is registered with NIXL
once, here, so a puller's READ needs nothing from this process per handoff.
"""

import asyncio
import logging
import uuid
from typing import Callable, Iterator

import grpc
import numpy as np
import torch
from opentelemetry import propagate, trace

from pdmesh.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

from kvtransfer.checksum import block_checksums, pool_bytes
from kvtransfer.grpc_transport import keep_freed_buffers
from kvtransfer.handle import KvHandle
from kvtransfer.layout import KvLayout
from kvtransfer.leases import Lease, LeaseTable
from kvtransfer.nixl_transport import NixlAgent, nixl_available

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
_MIN_CHUNK_BYTES, _MAX_CHUNK_BYTES = 64 << 10, 32 << 20


class KvSource:
    """Lends blocks of one pool. lend/release/lease are thread-safe; on_free(lease) runs in the
    thread that released or expired the lease: the event loop for RPCs and the expiry task, or the
    thread calling lend() (which sweeps expired leases first)."""

    def __init__(self, pool: torch.Tensor, layout: KvLayout, worker_id: str, advertise_address: str,
                 lease_ttl_s: float = 30.0, on_free: Callable[[Lease], None] | None = None,
                 enable_nixl: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        layout.check_pool(pool)
        self.pool = pool
        self.layout = layout
        self.worker_id = worker_id
        self.advertise_address = advertise_address
        self.chunk_bytes = chunk_bytes
        self._on_free = on_free or (lambda lease: None)
        self.leases = LeaseTable(lease_ttl_s, self._on_free)
        self.nixl = NixlAgent(pool, f"{worker_id}-{uuid.uuid4().hex[:8]}") if enable_nixl and nixl_available() else None
        self.transports = ("nixl", "grpc") if self.nixl else ("grpc",)
        self._expiry_task: asyncio.Task | None = None

    def lend(self, request_id: str, block_ids: list[int], num_tokens: int) -> KvHandle:
        """Checksum block_ids (prompt order), lease them, and describe them for a puller.
        The caller gives up the blocks until on_free(lease)."""
        self.leases.expire()  # opportunistic sweep, in case no expiry task runs
        checksums = block_checksums(self.pool, block_ids)
        lease = self.leases.grant(request_id, block_ids)
        return KvHandle(worker_id=self.worker_id, transfer_address=self.advertise_address, lease_id=lease.lease_id,
                        block_ids=tuple(block_ids), num_tokens=num_tokens, layout=self.layout,
                        block_checksums=tuple(checksums), lease_expires_unix_ms=lease.expires_unix_ms,
                        transports=self.transports)

    def release(self, lease_id: str) -> bool:
        """End a lease and hand its blocks back (on_free). False when unknown or already gone."""
        return self.leases.release(lease_id)

    def lease(self, lease_id: str) -> Lease | None:
        return self.leases.get(lease_id)

    def chunks(self, lease: Lease, chunk_bytes: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, uint8 view) pieces of the lease's blocks concatenated in lease order. Views of a
        host pool alias it: copy them out before the lease can end."""
        chunk_bytes = min(max(chunk_bytes or self.chunk_bytes, _MIN_CHUNK_BYTES), _MAX_CHUNK_BYTES)
        block_bytes = self.layout.block_bytes
        for run_offset, first_block, num_blocks in _runs(lease.block_ids):
            run = self._run_bytes(first_block, num_blocks)
            for start in range(0, num_blocks * block_bytes, chunk_bytes):
                yield run_offset * block_bytes + start, run[start:start + chunk_bytes]

    def transfer_metadata(self) -> kv_transfer_pb2.GetTransferMetadataResponse:
        reply = kv_transfer_pb2.GetTransferMetadataResponse(layout=self.layout.to_proto(),
                                                            num_blocks=self.pool.shape[0])
        if self.nixl:
            reply.nixl_agent_name = self.nixl.name
            reply.nixl_agent_metadata = self.nixl.metadata()
            reply.pool_base_address = self.nixl.base_address
            reply.memory_type = self.nixl.memory_type
            reply.device_id = self.nixl.device_id
        return reply

    def start(self, interval_s: float | None = None) -> None:
        """Start the background task that expires leases (needs a running event loop; idempotent)."""
        if self._expiry_task is None or self._expiry_task.done():
            interval_s = interval_s or min(1.0, self.leases.ttl_s / 4)
            self._expiry_task = asyncio.get_running_loop().create_task(self._expire_forever(interval_s))

    async def close(self) -> None:
        """Stop the expiry task and deregister the pool. Live leases are not freed."""
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            await asyncio.gather(self._expiry_task, return_exceptions=True)
            self._expiry_task = None
        if self.nixl:
            self.nixl.close()

    async def _expire_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                for lease in self.leases.expire():
                    log.info("lease %s of request %s expired", lease.lease_id, lease.request_id)
            except Exception:  # keep sweeping: one failing on_free must not leak every later lease
                log.exception("expiring leases")

    def _run_bytes(self, first_block: int, num_blocks: int):
        block_bytes = self.layout.block_bytes
        if self.pool.device.type == "cpu":
            return pool_bytes(self.pool)[first_block * block_bytes:(first_block + num_blocks) * block_bytes]
        return pool_bytes(self.pool[first_block:first_block + num_blocks].cpu())


def _runs(block_ids: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(position in lease, first block, length) of runs of consecutive block ids."""
    runs: list[tuple[int, int, int]] = []
    for position, block in enumerate(block_ids):
        if runs and block == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((position, block, 1))
    return runs


class KvTransferServicer(kv_transfer_pb2_grpc.KvTransferServiceServicer):
    """pdmesh.v1.KvTransferService for grpc.aio over one KvSource. Maps domain state to status
    codes: layout mismatch -> FAILED_PRECONDITION, unknown/expired lease -> NOT_FOUND.
    Starts the source's expiry task on its first RPC if nobody called source.start()."""

    def __init__(self, source: KvSource) -> None:
        self.source = source

    async def GetTransferMetadata(self, request, context):
        self.source.start()
        mine = self.source.layout.compat_hash
        if request.layout.compat_hash != mine:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"KV layout mismatch: puller compat_hash {request.layout.compat_hash or '(none)'} "
                                f"(wire v{request.layout.wire_version}) != holder {mine}; "
                                f"holder layout {self.source.layout}")
        return self.source.transfer_metadata()

    async def PullKv(self, request, context):
        async for offset, data in self._leased_chunks(request, context):
            yield kv_transfer_pb2.PullKvResponse(offset=offset, data=bytes(data))

    async def PullKvEncoded(self, request, context):
        """PullKv yielding each PullKvResponse already encoded: one copy per byte instead of three
        (bytes(), message construction, serialization). Served by add_kv_transfer_service."""
        async for offset, data in self._leased_chunks(request, context):
            yield b"".join((encode_pull_chunk_header(offset, len(data)), data))

    async def _leased_chunks(self, request, context):
        self.source.start()
        keep_freed_buffers()
        caller = propagate.extract(dict(context.invocation_metadata() or ()))
        with trace.get_tracer("pdmesh").start_as_current_span(
                "kv.serve", context=caller, kind=trace.SpanKind.SERVER,
                attributes={"pdmesh.kv.lease_id": request.lease_id, "pdmesh.kv.transport": "grpc"}) as span:
            lease = self.source.lease(request.lease_id)
            if lease is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"lease {request.lease_id!r} unknown or expired")
            sent = 0
            for offset, data in self.source.chunks(lease, request.chunk_bytes):
                if self.source.lease(request.lease_id) is None:
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"lease {request.lease_id!r} ended during the pull")
                sent += len(data)
                yield offset, data
            if span.is_recording():
                span.set_attribute("pdmesh.kv.bytes", sent)

    async def ReleaseKv(self, request, context):
        self.source.start()
        return kv_transfer_pb2.ReleaseKvResponse(released=self.source.release(request.lease_id))


def add_kv_transfer_service(servicer: KvTransferServicer, server: grpc.aio.Server) -> None:
    """Register servicer like kv_transfer_pb2_grpc.add_KvTransferServiceServicer_to_server (which
    also works), but with PullKv sending pre-encoded messages: the fallback transport's holder
    side then copies each byte once instead of three times."""
    pb = kv_transfer_pb2
    handlers = {
        "GetTransferMetadata": grpc.unary_unary_rpc_method_handler(
            servicer.GetTransferMetadata, request_deserializer=pb.GetTransferMetadataRequest.FromString,
            response_serializer=pb.GetTransferMetadataResponse.SerializeToString),
        "PullKv": grpc.unary_stream_rpc_method_handler(
            servicer.PullKvEncoded, request_deserializer=pb.PullKvRequest.FromString,
            response_serializer=_already_encoded),
        "ReleaseKv": grpc.unary_unary_rpc_method_handler(
            servicer.ReleaseKv, request_deserializer=pb.ReleaseKvRequest.FromString,
            response_serializer=pb.ReleaseKvResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)


_SERVICE = "pdmesh.v1.KvTransferService"


def _already_encoded(message: bytes) -> bytes:
    return message


def encode_pull_chunk_header(offset: int, length: int) -> bytes:
    """Wire bytes of PullKvResponse{offset, data} up to the data itself (fields 1 and 2)."""
    head = (b"\x08" + _varint(offset)) if offset else b""
    return head + b"\x12" + _varint(length) if length else head


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
