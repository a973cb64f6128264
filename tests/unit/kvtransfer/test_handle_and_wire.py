import pytest
import torch

from pdmesh.v1 import kv_transfer_pb2

from kvtransfer.grpc_transport import parse_pull_chunk, pipelined_chunk_bytes
from kvtransfer.handle import KvHandle
from kvtransfer.layout import KvLayout
from kvtransfer.leases import Lease
from kvtransfer.nixl_transport import contiguous_runs
from kvtransfer.source import KvSource

LAYOUT = KvLayout("m", "float32", 4, 2, 1, 8)  # 512-byte blocks


def _handle(**overrides):
    fields = dict(worker_id="w", transfer_address="127.0.0.1:1", lease_id="L", block_ids=(4, 2), num_tokens=7,
                  layout=LAYOUT, block_checksums=(2**64 - 1, 5), lease_expires_unix_ms=123, transports=("nixl", "grpc"))
    return KvHandle(**{**fields, **overrides})


def test_handle_proto_round_trip_keeps_full_64_bit_checksums():
    handle = _handle()
    assert KvHandle.from_proto(handle.to_proto()) == handle
    assert handle.num_bytes == 2 * LAYOUT.block_bytes


def test_handle_rejects_inconsistent_fields():
    with pytest.raises(ValueError):
        _handle(block_checksums=(1,))
    with pytest.raises(ValueError):
        _handle(num_tokens=9)


def test_engine_held_kv_has_parameters_and_no_pdmesh_blocks():
    params = b'{"do_remote_prefill": true, "remote_block_ids": [[3, 4]]}'
    handle = _handle(block_ids=(), block_checksums=(), num_tokens=200, transports=("vllm-nixl",),
                     engine_kv_params=params)
    assert KvHandle.from_proto(handle.to_proto()) == handle
    assert handle.engine_kv_params_dict() == {"do_remote_prefill": True, "remote_block_ids": [[3, 4]]}
    with pytest.raises(ValueError, match="no pdmesh block ids"):
        _handle(engine_kv_params=params)


@pytest.mark.parametrize("params", [b"not json", b"[1, 2]", b"\xff"])
def test_engine_kv_params_must_be_a_json_object(params):
    handle = _handle(block_ids=(), block_checksums=(), num_tokens=3, engine_kv_params=params)
    with pytest.raises(ValueError, match="engine_kv_params"):
        handle.engine_kv_params_dict()


@pytest.mark.parametrize("offset, data", [(0, b""), (0, b"abc"), (2**40 + 3, bytes(range(256)) * 300)])
def test_raw_chunk_parser_agrees_with_protobuf(offset, data):
    raw = kv_transfer_pb2.PullKvResponse(offset=offset, data=data).SerializeToString()
    parsed_offset, view = parse_pull_chunk(raw)
    assert (parsed_offset, bytes(view)) == (offset, data)


def test_contiguous_runs_coalesce_only_when_both_sides_advance():
    assert contiguous_runs([5, 6, 7, 9], [0, 1, 3, 4]) == [(5, 0, 2), (7, 3, 1), (9, 4, 1)]


def test_source_chunks_cover_the_lease_in_order_across_runs():
    pool = torch.rand(8, *LAYOUT.block_shape)
    source = KvSource(pool, LAYOUT, "w", "addr", enable_nixl=False, chunk_bytes=64 << 10)
    lease = Lease("L", "r", (6, 1, 2, 3), 1e18, 0)
    pieces = list(source.chunks(lease, chunk_bytes=1))  # clamped to the 64 KiB minimum
    joined = b"".join(data for _, data in sorted(pieces))
    expected = b"".join(pool[b].numpy().tobytes() for b in (6, 1, 2, 3))
    assert joined == expected and [offset for offset, _ in pieces] == [0, LAYOUT.block_bytes]


def test_lend_fills_checksums_lease_and_transports():
    freed = []
    pool = torch.rand(8, *LAYOUT.block_shape)
    source = KvSource(pool, LAYOUT, "w", "addr:1", lease_ttl_s=5, on_free=freed.append, enable_nixl=False)
    handle = source.lend("req", [3, 5], num_tokens=6)
    assert handle.transports == ("grpc",) and len(handle.block_checksums) == 2
    assert source.lease(handle.lease_id).block_ids == (3, 5)
    assert source.release(handle.lease_id) and [lease.block_ids for lease in freed] == [(3, 5)]


@pytest.mark.parametrize("offset, length", [(0, 0), (0, 5), (300, 0), (2**40 + 3, 70_000)])
def test_encoded_chunk_is_a_valid_pull_kv_response(offset, length):
    from kvtransfer.source import encode_pull_chunk_header
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    msg = kv_transfer_pb2.PullKvResponse.FromString(encode_pull_chunk_header(offset, length) + data)
    assert (msg.offset, msg.data) == (offset, data)


@pytest.mark.parametrize("num_bytes, chunk_bytes", [
    (4_718_592, 1_179_648),   # 128 tokens of the real model: 4 messages, not 2 of up to 4 MiB
    (2_359_296, 1 << 20),     # small pulls: never below 1 MiB (per-message costs)
    (18_874_368, 2 << 20),    # 512 tokens and up: 2 MiB
    (0, 1 << 20),
])
def test_pipelined_chunk_bytes(num_bytes, chunk_bytes):
    assert pipelined_chunk_bytes(num_bytes) == chunk_bytes
