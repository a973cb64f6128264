"""gRPC fallback transport: the holder streams the leased blocks' bytes (PullKv), the puller writes
each chunk straight into its destination blocks.

The stream is read with a raw deserializer that returns a view into the received message instead
of a protobuf bytes field, so each byte is copied once from gRPC's buffer into the pool.

Both sides call keep_freed_buffers(): gRPC allocates and frees a few chunk-sized buffers per
message, and with glibc's default thresholds each one comes back from the kernel as fresh pages.
"""

import ctypes
import ctypes.util
import time

import grpc
import numpy as np
import torch

from pdmesh.v1 import kv_transfer_pb2

from kvtransfer.base import KvPuller, TransferResult
from kvtransfer.checksum import pool_bytes
from kvtransfer.client import HolderClient, HolderClients, domain_error, insecure_channel, trace_metadata
from kvtransfer.errors import KvTransferError
from kvtransfer.handle import KvHandle
from kvtransfer.layout import KvLayout

_PULL_METHOD = "/pdmesh.v1.KvTransferService/PullKv"
# A pull's first chunk crosses alone (the holder copies and encodes it, gRPC sends it whole, the
# puller joins it) before holder and puller overlap, so few large messages run mostly serial and
# many small ones pay per-message costs. Interleaved on this host (2026-11-23), ms per pull for
# chunks of 0.5/1/2/4 MiB: 128 tokens 4.9/4.3/4.4/5.0, 512 tokens 16.0/12.9/11.7/13.7,
# 2048 tokens 56/49/44/45.
PIPELINE_MESSAGES = 4
PIPELINE_CHUNK_BYTES = (1 << 20, 2 << 20)


def pipelined_chunk_bytes(num_bytes: int) -> int:
    """Chunk size for a pull of num_bytes: about PIPELINE_MESSAGES messages, within PIPELINE_CHUNK_BYTES."""
    low, high = PIPELINE_CHUNK_BYTES
    return min(max(num_bytes // PIPELINE_MESSAGES, low), high)


class GrpcPuller(KvPuller):
    """KvPuller over PullKv. Options: chunk_bytes per message (0: pipelined_chunk_bytes of the pull),
    timeout_s per call, max_retries of a stream that broke with UNAVAILABLE (restarted whole),
    make_channel(address, options) for the holder channels (plaintext by default)."""

    name = "grpc"

    def __init__(self, pool: torch.Tensor, layout: KvLayout, chunk_bytes: int = 0, timeout_s: float = 30.0,
                 max_retries: int = 1, make_channel=insecure_channel) -> None:
        super().__init__(pool, layout)
        keep_freed_buffers()
        self.chunk_bytes = chunk_bytes
        self.max_retries = max_retries
        self._clients = HolderClients(timeout_s, make_channel)
        self._compatible: set[str] = set()

    async def connect(self, transfer_address: str) -> None:
        if transfer_address not in self._compatible:
            await self._clients.get(transfer_address).handshake(self.layout)
            self._compatible.add(transfer_address)

    async def pull(self, handle: KvHandle, dst_block_ids: list[int]) -> TransferResult:
        self.check_request(handle, dst_block_ids)
        start = time.perf_counter()
        await self.connect(handle.transfer_address)
        client = self._clients.get(handle.transfer_address)
        retries = 0
        while True:
            try:
                await self._stream_into(client, handle, list(dst_block_ids))
                break
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or retries >= self.max_retries:
                    raise domain_error(e, handle.lease_id) from e
                retries += 1
        return await self._verified(handle, dst_block_ids, start, retries)

    async def release(self, handle: KvHandle) -> bool:
        return await self._clients.get(handle.transfer_address).release(handle.lease_id)

    async def close(self) -> None:
        await self._clients.close()

    async def _stream_into(self, client: HolderClient, handle: KvHandle, dst_block_ids: list[int]) -> None:
        on_host = self.pool.device.type == "cpu"
        target = pool_bytes(self.pool) if on_host else np.empty(handle.num_bytes, dtype=np.uint8)
        placement = _Placement(dst_block_ids if on_host else range(len(dst_block_ids)), self.layout.block_bytes)
        call = client.channel.unary_stream(
            _PULL_METHOD, request_serializer=kv_transfer_pb2.PullKvRequest.SerializeToString,
            response_deserializer=parse_pull_chunk)
        chunk_bytes = self.chunk_bytes or pipelined_chunk_bytes(handle.num_bytes)
        request = kv_transfer_pb2.PullKvRequest(lease_id=handle.lease_id, chunk_bytes=chunk_bytes)
        received = 0
        async for offset, data in call(request, timeout=client.timeout_s, metadata=trace_metadata()):
            placement.write(target, offset, data)
            received += len(data)
        if received != handle.num_bytes:
            raise KvTransferError(f"holder sent {received} bytes, expected {handle.num_bytes}")
        if not on_host:
            staged = torch.from_numpy(target).view(self.pool.dtype).view(len(dst_block_ids), *self.layout.block_shape)
            index = torch.tensor(dst_block_ids, dtype=torch.long, device=self.pool.device)
            self.pool.index_copy_(0, index, staged.to(self.pool.device))


class _Placement:
    """Maps offsets in the concatenated source blocks to offsets in the destination buffer."""

    def __init__(self, dst_block_ids, block_bytes: int) -> None:
        self.dst_block_ids = list(dst_block_ids)
        self.block_bytes = block_bytes

    def write(self, target: np.ndarray, offset: int, data: memoryview) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        if offset + len(src) > len(self.dst_block_ids) * self.block_bytes:
            raise KvTransferError(f"chunk at {offset}+{len(src)} runs past the leased blocks")
        done = 0
        while done < len(src):
            position, within = divmod(offset + done, self.block_bytes)
            n = min(self.block_bytes - within, len(src) - done)
            start = self.dst_block_ids[position] * self.block_bytes + within
            target[start:start + n] = src[done:done + n]
            done += n


def parse_pull_chunk(raw: bytes) -> tuple[int, memoryview]:
    """(offset, data) of a serialized PullKvResponse, data as a view into raw (no copy).
    Falls back to protobuf parsing for any encoding it does not expect."""
    view = memoryview(raw)
    pos, offset, data = 0, 0, view[0:0]
    try:
        while pos < len(view):
            tag, pos = _varint(view, pos)
            if tag == 0x08:  # field 1 (offset), varint
                offset, pos = _varint(view, pos)
            elif tag == 0x12:  # field 2 (data), length-delimited
                length, pos = _varint(view, pos)
                data, pos = view[pos:pos + length], pos + length
            else:
                raise ValueError(tag)
    except (ValueError, IndexError):
        msg = kv_transfer_pb2.PullKvResponse.FromString(raw)
        return msg.offset, memoryview(msg.data)
    return offset, data


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = view[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


# glibc mallopt parameters (malloc.h) and the values keep_freed_buffers() sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum; chunks are clamped to 32 MiB (source.py)
_TRIM_THRESHOLD_BYTES = 256 << 20
_kept_freed_buffers = False


def keep_freed_buffers() -> None:
    """Make glibc malloc reuse freed buffers of up to 32 MiB instead of unmapping them, and keep up
    to 256 MiB of free heap before returning it to the kernel. Per PullKv message gRPC Python
    allocates and frees several chunk-sized buffers (holder: the encoded message and core's copy of
    it; puller: core's read slices and the joined message); with the default thresholds each comes
    back as fresh pages, and the page faults were ~30% of the transfer's CPU (+40% GB/s measured).
    Side effect: process-wide; idempotent; a no-op where libc has no mallopt (not glibc)."""
    global _kept_freed_buffers
    if _kept_freed_buffers:
        return
    _kept_freed_buffers = True
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
