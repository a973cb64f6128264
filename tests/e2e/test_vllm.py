"""vLLM (CPU build) decode workers behind the unchanged router: golden greedy text, vLLM's prefix
cache instead of recomputing a prompt, and the built-in engine's gRPC statuses for bad input.

Marked `vllm`: needs the vLLM venv (`make setup-vllm`); `make test` leaves it out, `make
test-vllm` runs it. Start-up: about a minute per vLLM worker on 2 shared cores.
"""

import os
import pathlib

import grpc
import pytest

from pdmesh.launcher import ROOT, MeshSpec, start_mesh
from pdmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc, router_pb2_grpc
from tests.e2e.test_mesh import BAD_REQUESTS, GOLDEN, _load_report, generate

VLLM_PYTHON = pathlib.Path(os.environ.get("PDMESH_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON} "
                                 "(make setup-vllm)")]


@pytest.fixture(scope="module")
def vllm_mesh(tmp_path_factory):
    subprocess_env = (("PDMESH_VLLM_GPU_MEMORY_UTILIZATION", "0.2"),)
    spec = MeshSpec(num_prefill=0, num_decode=1, router_port=0, kv_transports="grpc", profile="round_robin",
                    torch_threads=2, max_model_len=2048, http_port=None, decode_engine="vllm",
                    decode_python=str(VLLM_PYTHON), extra_env=subprocess_env, startup_timeout_s=600)
    mesh = start_mesh(spec, str(tmp_path_factory.mktemp("mesh-vllm")), progress=lambda *_: None)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def router_stub(vllm_mesh):
    channel = grpc.insecure_channel(vllm_mesh.router_address)
    yield router_pb2_grpc.RouterServiceStub(channel)
    channel.close()


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["prompt"][:24])
def test_greedy_output_equals_builtin_golden(router_stub, case):
    messages = generate(router_stub, text=case["prompt"], max_tokens=case["max_tokens"], ignore_eos=True)
    tokens = [t for m in messages for t in m.token_ids]
    assert tokens == case["token_ids"]
    assert "".join(m.text_delta for m in messages) == case["text"]
    last = messages[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == len(tokens)
    assert last.placement.decode_worker_id == "decode-0" and last.placement.prefill_worker_id == ""
    assert len(messages) >= len(tokens), "tokens must stream one by one"


def test_repeated_prompt_is_served_from_vllm_prefix_cache(router_stub, vllm_mesh):
    """The second time, vLLM computes only the tail of the prompt (its blocks are 128 tokens on
    this build); the decode worker's counters come from vLLM's num_cached_tokens."""
    address = vllm_mesh.workers("decode")[0].info["address"]
    prompt = "Paged attention stores the KV cache in fixed-size blocks. " * 30
    generate(router_stub, text=prompt, max_tokens=2)
    before = _load_report(address)
    messages = generate(router_stub, text=prompt, max_tokens=2)
    after = _load_report(address)
    prompt_tokens = messages[-1].usage.prompt_tokens
    cached = after.prompt_tokens_cached_total - before.prompt_tokens_cached_total
    computed = after.prompt_tokens_computed_total - before.prompt_tokens_computed_total
    assert cached + computed == prompt_tokens
    assert messages[-1].usage.cached_prompt_tokens == cached
    assert cached >= prompt_tokens - 128, f"only {cached} of {prompt_tokens} prompt tokens were cached"
    assert after.kv_blocks_total > 0


def test_kv_events_follow_the_prompts_vllm_served(vllm_mesh):
    from engine.hashing import block_hashes
    from engine.tokenizer import load_tokenizer
    from pdmesh.v1 import worker_state_pb2, worker_state_pb2_grpc
    ids = load_tokenizer().encode(GOLDEN["cases"][0]["prompt"] * 4)
    with grpc.insecure_channel(vllm_mesh.router_address) as channel:
        generate(router_pb2_grpc.RouterServiceStub(channel), token_ids=common_pb2.TokenIds(ids=ids), max_tokens=1)
    with grpc.insecure_channel(vllm_mesh.workers("decode")[0].info["address"]) as channel:
        stub = worker_state_pb2_grpc.WorkerStateServiceStub(channel)
        snapshot = next(u for u in stub.StreamState(worker_state_pb2.StreamStateRequest(), timeout=30)
                        if u.WhichOneof("update") == "kv_events")
    stored = {h for e in snapshot.kv_events.events if e.WhichOneof("event") == "stored" for h in e.stored.block_hashes}
    assert set(block_hashes(ids, 16)) <= stored


@pytest.mark.parametrize("name,fields,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_the_builtin_status(router_stub, name, fields, needle):
    with pytest.raises(grpc.RpcError) as err:
        generate(router_stub, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert needle in err.value.details()
    assert generate(router_stub, text="Hello", max_tokens=2)[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


def test_decode_service_on_vllm_rejects_what_the_builtin_rejects(vllm_mesh):
    with grpc.insecure_channel(vllm_mesh.workers("decode")[0].info["address"]) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        for request in (decode_pb2.DecodeRequest(request_id="bad-token", prompt_token_ids=[2, 999_999], max_tokens=2),
                        decode_pb2.DecodeRequest(request_id="too-long", prompt_token_ids=[2, 818], max_tokens=5000)):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Decode(request, timeout=60))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
