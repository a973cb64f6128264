"""DecodeSession against a real decode worker process (tiny model): many requests on one stream
behave exactly like one Decode call each (tokens, status codes), and a request cancelled or timed
out on the session frees its KV while the others go on."""

import asyncio
import contextlib
import time

import grpc
import pytest

from bench import common as bench_common
from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.router.decode_session import DecodeSession

PROMPTS = [[2, 651, 6037, 529, 7001, 563], [2] + list(range(1000, 1070)), [2] + list(range(3000, 3020))]


@pytest.fixture(scope="module")
def decode_worker(tmp_path_factory):
    spec = MeshSpec(num_prefill=0, num_decode=1, router_port=0, model="tiny", profile="round_robin",
                    kv_transports="grpc", num_blocks=128, torch_threads=1, max_model_len=512)
    mesh = start_mesh(spec, str(tmp_path_factory.mktemp("session")), progress=lambda *_: None)
    yield mesh.workers("decode")[0]
    mesh.stop()


def request(prompt, max_tokens=8, **fields) -> decode_pb2.DecodeRequest:
    return decode_pb2.DecodeRequest(request_id=f"s-{len(prompt)}-{max_tokens}", prompt_token_ids=prompt,
                                    max_tokens=max_tokens, sampling=common_pb2.SamplingParams(temperature=0.0),
                                    ignore_eos=True, **fields)


def run(worker, coroutine_fn):
    async def main():
        async with grpc.aio.insecure_channel(worker.info["address"]) as channel:
            return await coroutine_fn(decode_pb2_grpc.DecodeServiceStub(channel))
    return asyncio.run(main())


async def tokens_of(stream) -> list[int]:
    return [t async for m in stream for t in m.token_ids]


def blocks_used(worker) -> float:
    metrics = bench_common.scrape(worker.info["metrics_address"])
    return next(v for k, v in metrics.items() if k.startswith("pdmesh_kv_blocks_used{"))


def test_concurrent_requests_on_one_session_equal_one_call_each(decode_worker):
    async def both(stub):
        singles = [await tokens_of(stub.Decode(request(p))) for p in PROMPTS]
        session = DecodeSession(stub, "decode-0")
        together = await asyncio.gather(*(tokens_of(session.decode(request(p), timeout=30)) for p in PROMPTS))
        return singles, together, session
    singles, together, session = run(decode_worker, both)
    assert together == singles and all(len(t) == 8 for t in singles)
    assert session.in_flight == 0


def test_a_bad_request_fails_alone_with_its_status(decode_worker):
    async def mixed(stub):
        session = DecodeSession(stub, "decode-0")
        return await asyncio.gather(tokens_of(session.decode(request(PROMPTS[0]), timeout=30)),
                                    tokens_of(session.decode(request(PROMPTS[1], max_tokens=0), timeout=30)),
                                    tokens_of(session.decode(request([2, 10 ** 9]), timeout=30)),
                                    return_exceptions=True)
    good, no_tokens, unknown_id = run(decode_worker, mixed)
    assert len(good) == 8
    for error, words in ((no_tokens, "max_tokens"), (unknown_id, "token id")):
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in error.details()


def test_closing_a_request_early_cancels_it_and_frees_its_kv(decode_worker):
    async def cancel_one(stub):
        session = DecodeSession(stub, "decode-0")
        long = session.decode(request(PROMPTS[1], max_tokens=400), timeout=60)
        async with contextlib.aclosing(long):
            async for message in long:
                if message.token_ids:
                    break
        # the session keeps serving the others while the cancelled one is freed
        after = await tokens_of(session.decode(request(PROMPTS[0]), timeout=30))
        deadline = time.monotonic() + 10
        while blocks_used(decode_worker) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return after
    assert len(run(decode_worker, cancel_one)) == 8
    assert blocks_used(decode_worker) == 0


def test_a_request_past_its_deadline_ends_with_deadline_exceeded(decode_worker):
    async def too_slow(stub):
        session = DecodeSession(stub, "decode-0")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await tokens_of(session.decode(request(PROMPTS[1], max_tokens=400), timeout=0.2))
        deadline = time.monotonic() + 10
        while blocks_used(decode_worker) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return raised.value
    error = run(decode_worker, too_slow)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert blocks_used(decode_worker) == 0


def test_raw_session_answers_every_stream_id_and_rejects_a_duplicate(decode_worker):
    async def raw(stub):
        calls = [decode_pb2.DecodeSessionCall(stream_id=7, request=request(PROMPTS[0], max_tokens=3)),
                 decode_pb2.DecodeSessionCall(stream_id=7, request=request(PROMPTS[2], max_tokens=3))]

        async def requests():
            yield decode_pb2.DecodeSessionRequest(calls=calls)
        return [e async for m in stub.DecodeSession(requests(), timeout=30) for e in m.events]
    events = run(decode_worker, raw)
    rejected = [e for e in events if e.status_code]
    assert len(rejected) == 1 and rejected[0].stream_id == 7
    assert rejected[0].status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "already in flight" in rejected[0].status_message
    served = [e for e in events if not e.status_code]
    assert sum(len(e.response.token_ids) for e in served) == 3
    assert served[-1].response.finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_a_worker_without_decode_session_gets_one_decode_call_per_request(tiny_model):
    """Mid rolling upgrade a router may meet a decode worker that predates DecodeSession: its
    requests go as Decode calls and give the same tokens."""
    from engine.config import CacheConfig, EngineConfig, ModelConfig
    from engine.llm_engine import LLMEngine
    from services.common.engine_runner import EngineRunner
    from services.common.server import start_server
    from services.decode.decode_worker import DecodeWorker
    from services.decode.server import DecodeServicer

    def add_decode_only(servicer, server):  # registers Decode alone, as a worker before DecodeSession did
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pdmesh.v1.DecodeService", {
            "Decode": grpc.unary_stream_rpc_method_handler(
                servicer.Decode, request_deserializer=decode_pb2.DecodeRequest.FromString,
                response_serializer=decode_pb2.DecodeResponse.SerializeToString)}),))

    async def scenario():
        config = EngineConfig(model=ModelConfig.tiny(), cache=CacheConfig(num_blocks=64))
        runner = EngineRunner(LLMEngine(config, model=tiny_model), asyncio.get_running_loop())
        runner.start()
        servicer = DecodeServicer(DecodeWorker(runner, {}), config.model.vocab_size, config.scheduler.max_model_len)
        running = await start_server(lambda port: [(add_decode_only, servicer, "pdmesh.v1.DecodeService")],
                                     "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = decode_pb2_grpc.DecodeServiceStub(channel)
                session = DecodeSession(stub, "old-decode")
                first = await tokens_of(session.decode(request(PROMPTS[0]), timeout=30))
                second = await tokens_of(session.decode(request(PROMPTS[0]), timeout=30))  # straight to Decode
                direct = await tokens_of(stub.Decode(request(PROMPTS[0]), timeout=30))
                return first, second, direct
        finally:
            await running.server.stop(0)
            runner.stop()

    first, second, direct = asyncio.run(scenario())
    assert first == second == direct and len(first) == 8


def test_the_worker_exports_its_step_count_and_step_cost_fit(decode_worker):
    async def bursts(stub):
        session = DecodeSession(stub, "decode-0")
        for size in (1, 3, 6, 2, 5):  # batches of several sizes: the fit can tell fixed from per-sequence cost
            await asyncio.gather(*(tokens_of(session.decode(request([2, 500 + size, *range(4000, 4000 + 10 * i)],
                                                                       max_tokens=6), timeout=30))
                                   for i in range(size)))
    run(decode_worker, bursts)
    time.sleep(1.2)  # the fit is refreshed into the snapshot at most once a second; one more step publishes it
    run(decode_worker, lambda stub: tokens_of(stub.Decode(request(PROMPTS[0], max_tokens=2))))
    scheduling = bench_common.engine_scheduling(decode_worker.info["metrics_address"])
    assert scheduling["steps"] >= 5 * 6 and 0 <= scheduling["prompt_only_steps"] <= scheduling["steps"]
    assert scheduling["step_cost_fixed_ms"] > 0 and scheduling["step_cost_per_sequence_ms"] > 0
