"""The mesh in real processes on the tiny random-weight model: disaggregated output must equal
one engine doing everything, over both transports and with local prefill."""

import concurrent.futures

import grpc
import pytest

from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, router_pb2, router_pb2_grpc, worker_state_pb2,
                       worker_state_pb2_grpc)

PROMPTS = [[2, 651, 6037, 529, 7001, 563], [2] + list(range(1000, 1070))]  # the second crosses the window


def engine_alone(prompt, max_tokens, sampling):
    engine = LLMEngine(EngineConfig(model=ModelConfig.tiny(), cache=CacheConfig(num_blocks=64)))
    engine.add_request("ref", prompt, sampling, max_tokens, ignore_eos=True)
    tokens = []
    while engine.has_unfinished():
        tokens += [o.token_id for o in engine.step() if o.token_id is not None]
    return tokens


@pytest.fixture(scope="module", params=["nixl", "grpc", "local"])
def tiny_mesh(request, tmp_path_factory):
    transports = {"nixl": "nixl,grpc", "grpc": "grpc", "local": "grpc"}[request.param]
    spec = MeshSpec(num_prefill=0 if request.param == "local" else 1, num_decode=1, router_port=0, model="tiny",
                    profile="round_robin",
                    kv_transports=transports, num_blocks=128, torch_threads=1, max_model_len=512)
    mesh = start_mesh(spec, str(tmp_path_factory.mktemp(f"tiny-{request.param}")), progress=lambda *_: None)
    mesh.mode = request.param
    channel = grpc.insecure_channel(mesh.router_address)
    mesh.stub = router_pb2_grpc.RouterServiceStub(channel)
    yield mesh
    channel.close()
    mesh.stop()


def run(stub, prompt, max_tokens, sampling):
    request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=prompt), max_tokens=max_tokens,
                                         sampling=sampling, ignore_eos=True)
    return list(stub.Generate(request, timeout=60))


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "past-window"])
def test_greedy_equals_single_engine(tiny_mesh, prompt):
    messages = run(tiny_mesh.stub, prompt, 12, common_pb2.SamplingParams(temperature=0.0))
    assert [t for m in messages for t in m.token_ids] == engine_alone(prompt, 12, SamplingParams())
    placement = messages[-1].placement
    assert placement.kv_transport == ("" if tiny_mesh.mode == "local" else tiny_mesh.mode)
    assert placement.prefill_worker_id == ("" if tiny_mesh.mode == "local" else "prefill-0")


def test_seeded_sampling_equals_single_engine(tiny_mesh):
    proto = common_pb2.SamplingParams(temperature=0.8, top_p=0.9, seed=1234)
    messages = run(tiny_mesh.stub, PROMPTS[0], 10, proto)
    expected = engine_alone(PROMPTS[0], 10, SamplingParams(temperature=0.8, top_p=0.9, seed=1234))
    assert [t for m in messages for t in m.token_ids] == expected


def test_single_token_request_finishes(tiny_mesh):
    messages = run(tiny_mesh.stub, PROMPTS[0], 1, common_pb2.SamplingParams())
    assert sum(len(m.token_ids) for m in messages) == 1
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_concurrent_streams_are_continuously_batched(tiny_mesh):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: run(tiny_mesh.stub, p, 8, common_pb2.SamplingParams()),
                                [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]]))
    tokens = [[t for m in r for t in m.token_ids] for r in results]
    assert tokens[0] == tokens[2] and tokens[1] == tokens[3]
    assert tokens[0] == engine_alone(PROMPTS[0], 8, SamplingParams())


def test_workers_report_who_computed_the_prompt(tiny_mesh):
    run(tiny_mesh.stub, PROMPTS[1], 3, common_pb2.SamplingParams())
    decode = tiny_mesh.process("decode-0").info["address"]
    with grpc.insecure_channel(decode) as channel:
        stream = worker_state_pb2_grpc.WorkerStateServiceStub(channel).StreamState(
            worker_state_pb2.StreamStateRequest(load_report_interval_ms=50), timeout=10)
        report = next(u.load_report for u in stream if u.WhichOneof("update") == "load_report")
    if tiny_mesh.mode == "local":
        assert report.prompt_tokens_computed_total > 0
    else:
        assert report.prompt_tokens_computed_total == 0
    assert report.generated_tokens_total > 0


def test_state_stream_snapshot_then_kv_events_use_the_engine_hashes(tiny_mesh):
    from engine.hashing import block_hashes

    holder = "decode-0" if tiny_mesh.mode == "local" else "prefill-0"
    address = next(p for p in tiny_mesh.processes if p.name == holder).info["address"]
    prompt = [2] + list(range(3000, 3040))  # 41 tokens: two full blocks of 16
    expected = block_hashes(prompt, 16)
    with grpc.insecure_channel(address) as channel:
        stream = worker_state_pb2_grpc.WorkerStateServiceStub(channel).StreamState(
            worker_state_pb2.StreamStateRequest(load_report_interval_ms=50), timeout=30)
        first = next(stream)
        assert first.worker_id == holder and first.WhichOneof("update") == "kv_events"
        kinds = [e.WhichOneof("event") for e in first.kv_events.events]
        assert kinds == ["cleared", "stored"], "a new subscriber starts from a snapshot"
        assert not set(expected) & set(first.kv_events.events[1].stored.block_hashes)
        run(tiny_mesh.stub, prompt, 2, common_pb2.SamplingParams())
        stored = set()
        for update in stream:
            if update.WhichOneof("update") == "kv_events":
                stored |= {h for e in update.kv_events.events if e.WhichOneof("event") == "stored"
                           for h in e.stored.block_hashes}
            if set(expected) <= stored:
                break
        stream.cancel()
    assert set(expected) <= stored


def test_kv_held_by_another_engine_is_recomputed_here(tiny_mesh):
    """A handle to KV that vLLM holds (transport vllm-nixl) reaches a built-in decode worker: no
    transport in common, so the worker prefills the prompt itself and the text is unchanged."""
    prompt = PROMPTS[0]
    layout = common_pb2.KvLayout(model_id="m", dtype="float32", block_size=128, num_layers=18, num_kv_heads=1,
                                 head_dim=256)
    handle = common_pb2.KvHandle(worker_id="vllm-prefill", transfer_address="127.0.0.1:1", lease_id="r",
                                 num_tokens=len(prompt), layout=layout, transports=["vllm-nixl"],
                                 engine_kv_params=b'{"do_remote_prefill": true}')
    request = decode_pb2.DecodeRequest(request_id="foreign-kv", prompt_token_ids=prompt, max_tokens=6,
                                       ignore_eos=True, kv_handle=handle, first_token_id=5)
    with grpc.insecure_channel(tiny_mesh.workers("decode")[0].info["address"]) as channel:
        messages = list(decode_pb2_grpc.DecodeServiceStub(channel).Decode(request, timeout=60))
    assert [t for m in messages for t in m.token_ids] == engine_alone(prompt, 6, SamplingParams())
    assert messages[0].stats.local_prefill_tokens + messages[0].stats.cached_tokens == len(prompt)
    assert messages[0].stats.kv_transport == ""
