"""A real holder in another process (grpc.aio on port 0, NIXL-registered pool of seeded random
data), pulled from this process over every transport into a different pool at different ids."""

import asyncio
import dataclasses
import time

import grpc
import pytest
import torch

from kvtransfer import (KvChecksumError, KvIncompatibleError, KvLayout, KvLeaseNotFound, available_transports,
                        make_puller)
from kvtransfer.holder_process import HolderProcess, seeded_pool

LAYOUT = KvLayout("test-model", "float32", 16, 18, 1, 256)  # real-model block: 589,824 bytes
HOLDER_BLOCKS, LOCAL_BLOCKS, SEED = 48, 40, 0
SRC = [3, 4, 5, 10, 20, 7, 8]
DST = [30, 31, 2, 0, 11, 12, 13]
TRANSPORTS = [pytest.param("nixl", marks=pytest.mark.skipif("nixl" not in available_transports(),
                                                             reason="NIXL not usable here")), "grpc"]


@pytest.fixture(scope="module")
def holder():
    process = HolderProcess(num_blocks=HOLDER_BLOCKS, seed=SEED)
    yield process
    process.close()


@pytest.fixture(scope="module")
def holder_data():
    return seeded_pool(LAYOUT, HOLDER_BLOCKS, SEED)


def _local_pool() -> torch.Tensor:
    return torch.full((LOCAL_BLOCKS, *LAYOUT.block_shape), -7.0)


async def _pull(transport, handle, dst, pool, layout=LAYOUT, **opts):
    puller = make_puller(transport, pool, layout, **opts)
    try:
        return await puller.pull(handle, dst), await puller.release(handle)
    finally:
        await puller.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pull_is_byte_exact_and_release_frees(holder, holder_data, transport):
    pool = _local_pool()
    handle, _ = holder.lend(SRC, num_tokens=len(SRC) * 16 - 5)
    result, released = asyncio.run(_pull(transport, handle, DST, pool))
    assert torch.equal(pool[DST], holder_data[SRC])
    untouched = [b for b in range(LOCAL_BLOCKS) if b not in DST]
    assert bool((pool[untouched] == -7.0).all())
    assert (result.transport, result.num_bytes) == (transport, len(SRC) * LAYOUT.block_bytes)
    assert released and handle.lease_id in holder.freed()


def test_grpc_with_the_generated_servicer_registration(holder_data):
    holder = HolderProcess(num_blocks=HOLDER_BLOCKS, seed=SEED, no_nixl=True, generated_registration=True)
    try:
        pool = _local_pool()
        handle, _ = holder.lend(SRC)
        asyncio.run(_pull("grpc", handle, DST, pool))
        assert torch.equal(pool[DST], holder_data[SRC])
    finally:
        holder.close()


@pytest.mark.skipif("nixl" not in available_transports(), reason="NIXL not usable here")
def test_nixl_coalesced_descriptor_mode_is_byte_exact(holder, holder_data):
    pool = _local_pool()
    handle, _ = holder.lend(SRC)
    asyncio.run(_pull("nixl", handle, DST, pool, descriptor_mode="coalesced"))
    assert torch.equal(pool[DST], holder_data[SRC])


@pytest.mark.skipif("nixl" not in available_transports(), reason="NIXL not usable here")
@pytest.mark.parametrize("descriptor_mode", ["prepped", "coalesced"])
def test_nixl_split_across_copy_threads_is_byte_exact(holder, holder_data, descriptor_mode):
    pool = _local_pool()
    src = [*SRC, *range(21, 42)]  # 28 blocks (>= 16 descriptors: split between 2 threads)
    dst = [*DST, *range(14, 30), 32, 33, 34, 35, 36]
    handle, _ = holder.lend(src)
    asyncio.run(_pull("nixl", handle, dst, pool, descriptor_mode=descriptor_mode, num_threads=2))
    assert torch.equal(pool[dst], holder_data[src])
    untouched = [b for b in range(LOCAL_BLOCKS) if b not in dst]
    assert bool((pool[untouched] == -7.0).all())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrent_pulls_on_one_puller(holder, holder_data, transport):
    pool = _local_pool()

    async def both():
        puller = make_puller(transport, pool, LAYOUT)
        handles = [holder.lend([1, 2, 3])[0], holder.lend([9, 8])[0]]
        await asyncio.gather(puller.pull(handles[0], [5, 6, 7]), puller.pull(handles[1], [20, 1]))
        for handle in handles:
            await puller.release(handle)
        await puller.close()

    asyncio.run(both())
    assert torch.equal(pool[[5, 6, 7, 20, 1]], holder_data[[1, 2, 3, 9, 8]])


def test_cancelled_grpc_pull_writes_nothing_after_it_returns(holder):
    """The caller may hand the dst blocks to another request as soon as pull() raises, so a
    cancelled pull must stop writing before it returns (a reader thread that outlives the
    cancellation fails this: measured against one that did not wait)."""
    src = list(range(36))
    handle, _ = holder.lend(src)

    async def cancel_mid_stream():
        pool = _local_pool()
        puller = make_puller("grpc", pool, LAYOUT, chunk_bytes=64 << 10)  # ~340 messages: slow enough
        try:
            pull = asyncio.ensure_future(puller.pull(handle, src))
            while bool((pool[0] == -7.0).all()) and not pull.done():
                await asyncio.sleep(0.0005)
            pull.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pull
            after_return = pool.clone()
            await asyncio.sleep(0.3)
            return after_return, pool, await puller.release(handle)
        finally:
            await puller.close()

    after_return, pool, released = asyncio.run(cancel_mid_stream())
    assert torch.equal(pool, after_return)
    assert bool((pool[src[-1]] == -7.0).all())  # cancelled before the last block landed
    assert released and handle.lease_id in holder.freed()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_block_corrupted_after_lend_is_detected(holder, transport):
    src = [40 + i for i in range(len(DST))]  # blocks no other test reads: the corruption stays
    handle, _ = holder.lend(src, corrupt=True)
    with pytest.raises(KvChecksumError) as error:
        asyncio.run(_pull(transport, handle, DST, _local_pool()))
    assert error.value.bad_positions == [len(src) // 2]
    assert error.value.bad_dst_block_ids == [DST[len(src) // 2]]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mismatched_layout_is_refused_by_the_holder(holder, transport):
    other = dataclasses.replace(LAYOUT, model_id="another-model")
    puller = make_puller(transport, torch.zeros(2, *other.block_shape), other)

    async def connect():
        try:
            await puller.connect(holder.address)
        finally:
            await puller.close()

    with pytest.raises(KvIncompatibleError) as error:
        asyncio.run(connect())
    assert other.compat_hash in str(error.value) and LAYOUT.compat_hash in str(error.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pull_after_release_is_lease_not_found(holder, transport):
    handle, _ = holder.lend([1, 2])

    async def release_then_pull():
        puller = make_puller(transport, _local_pool(), LAYOUT)
        try:
            assert await puller.release(handle) is True
            assert await puller.release(handle) is False
            await puller.pull(handle, [0, 1])
        finally:
            await puller.close()

    with pytest.raises(KvLeaseNotFound):
        asyncio.run(release_then_pull())


def test_expired_lease_is_freed_by_the_holder_and_not_served():
    holder = HolderProcess(num_blocks=8, lease_ttl_s=0.3, no_nixl=True)
    try:
        assert holder.transports == ["grpc"]
        handle, _ = holder.lend([1, 2])
        time.sleep(0.6)
        assert handle.lease_id in holder.freed()
        with pytest.raises(KvLeaseNotFound):
            asyncio.run(_pull("grpc", handle, [0, 1], _local_pool()))
    finally:
        holder.close()


@pytest.mark.skipif("nixl" not in available_transports(), reason="NIXL not usable here")
def test_nixl_over_tcp_only(monkeypatch, holder_data):
    monkeypatch.setenv("UCX_TLS", "tcp,self")  # read by UCX when the puller's agent is created
    holder = HolderProcess(num_blocks=HOLDER_BLOCKS, seed=SEED, env={"UCX_TLS": "tcp,self"})
    try:
        pool = _local_pool()
        handle, _ = holder.lend(SRC)
        result, _ = asyncio.run(_pull("nixl", handle, DST, pool))
        assert result.transport == "nixl" and torch.equal(pool[DST], holder_data[SRC])
    finally:
        holder.close()


@pytest.mark.skipif("nixl" not in available_transports(), reason="NIXL not usable here")
def test_nixl_stale_peer_is_re_handshaken_once(holder, holder_data):
    pool = _local_pool()
    handle, _ = holder.lend(SRC)

    async def pull_with_stale_peer():
        puller = make_puller("nixl", pool, LAYOUT, descriptor_mode="coalesced")
        try:
            await puller.connect(holder.address)
            peer = puller._peers[holder.address]
            # What a restarted holder looks like from here: cached metadata naming an agent that is gone.
            puller._peers[holder.address] = dataclasses.replace(peer, agent_name="holder-that-restarted")
            return await puller.pull(handle, DST)
        finally:
            await puller.release(handle)
            await puller.close()

    result = asyncio.run(pull_with_stale_peer())
    assert result.retries == 1 and torch.equal(pool[DST], holder_data[SRC])


def test_prefill_server_serves_pull_kv_pre_encoded_and_still_rejects_undecodable(holder_data):
    """The binding a prefill worker serves, on the server every service is built with: bytes arrive
    exact through the pre-encoded PullKv, and the guard every registered handler gets still covers that method."""
    from kvtransfer.source import KvSource
    from services.common.server import start_server
    from services.prefill.main import kv_transfer_binding

    async def scenario():
        source = KvSource(holder_data.clone(), LAYOUT, "prefill-test", "", enable_nixl=False)
        running = await start_server(lambda port: [kv_transfer_binding(source)], "127.0.0.1", 0)
        source.advertise_address = f"127.0.0.1:{running.port}"
        pool = _local_pool()
        try:
            handle = source.lend("req", SRC, len(SRC) * 16)
            await _pull("grpc", handle, DST, pool)
            async with grpc.aio.insecure_channel(source.advertise_address) as channel:
                call = channel.unary_stream("/pdmesh.v1.KvTransferService/PullKv")(b"\xff\xff\xff")
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    async for _ in call:
                        pass
        finally:
            await running.server.stop(0)
            await source.close()
        return pool, handle, error.value

    pool, handle, error = asyncio.run(scenario())
    assert torch.equal(pool[DST], holder_data[SRC])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "PullKvRequest" in error.details()
