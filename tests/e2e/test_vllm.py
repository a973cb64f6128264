"""vLLM (CPU build) prefill and decode workers behind the unchanged router: golden greedy text with
the KV handed from the vLLM prefill worker to the vLLM decode worker (vLLM's NixlConnector); the
KV really crosses (the decode worker's own vLLM counters: prompt tokens by source, NIXL bytes
read, from its /metrics; ours agree); the prefill worker's prefix cache; the built-in engine's
gRPC statuses for bad input; vLLM's local prefill path; KV events.

Marked `vllm` (needs .venv-vllm, built by `make setup-vllm`; `make test` runs it, `make test-fast`
leaves it out). The vLLM mesh starts once, for this module only, so no idle vLLM process stays
up while the rest of the suite runs.
"""

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc,
                       router_pb2_grpc)
from tests.e2e.test_mesh import BAD_REQUESTS, GOLDEN, GREEDY, _load_report, generate
from tests.e2e.vllm_env import VLLM_MARKS, VLLM_PYTHON

pytestmark = VLLM_MARKS

# ~340 tokens: two full vLLM blocks (128 tokens on this build) and a partial one.
LONG_PROMPT = "Paged attention stores the KV cache in fixed-size blocks. " * 25 + "The capital of France is"


@pytest.fixture(scope="module")
def vllm_mesh(tmp_path_factory):
    """One vLLM prefill and one vLLM decode worker (NixlConnector on host memory) behind the
    router, always disaggregated: every request's KV crosses between the two vLLM processes.
    Starting both takes about 50 s here."""
    env = (("PDMESH_VLLM_GPU_MEMORY_UTILIZATION", "0.15"),)
    spec = MeshSpec(num_prefill=1, num_decode=1, router_port=0, kv_transports="grpc", profile="round_robin",
                    torch_threads=2, max_model_len=2048, http_port=None, extra_env=env, startup_timeout_s=600,
                    prefill_engine="vllm", prefill_python=str(VLLM_PYTHON),
                    decode_engine="vllm", decode_python=str(VLLM_PYTHON))
    mesh = start_mesh(spec, str(tmp_path_factory.mktemp("mesh-vllm")), progress=lambda *_: None)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def vllm_router(vllm_mesh):
    channel = grpc.insecure_channel(vllm_mesh.router_address)
    yield router_pb2_grpc.RouterServiceStub(channel)
    channel.close()


def _address(mesh, role: str) -> str:
    return mesh.workers(role)[0].info["address"]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["prompt"][:24])
def test_greedy_output_through_vllm_prefill_and_decode_equals_builtin_golden(vllm_router, case):
    messages = generate(vllm_router, text=case["prompt"], max_tokens=case["max_tokens"], ignore_eos=True)
    tokens = [t for m in messages for t in m.token_ids]
    assert tokens == case["token_ids"]
    assert "".join(m.text_delta for m in messages) == case["text"]
    last = messages[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == len(tokens)
    assert (last.placement.prefill_worker_id, last.placement.decode_worker_id) == ("prefill-0", "decode-0")
    assert last.placement.kv_transport == "vllm-nixl"
    assert len(messages) >= len(tokens), "tokens must stream one by one"


@pytest.mark.parametrize("name,fields,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_the_builtin_status(vllm_router, name, fields, needle):
    with pytest.raises(grpc.RpcError) as err:
        generate(vllm_router, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert needle in err.value.details()
    assert generate(vllm_router, text="Hello", max_tokens=2)[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


def test_vllm_workers_reject_what_the_builtin_rejects(vllm_mesh):
    decode_requests = [
        decode_pb2.DecodeRequest(request_id="bad-token", prompt_token_ids=[2, 999_999], max_tokens=2),
        decode_pb2.DecodeRequest(request_id="too-long", prompt_token_ids=[2, 818], max_tokens=5000),
        decode_pb2.DecodeRequest(request_id="bad-kv-params", prompt_token_ids=[2, 818], max_tokens=2,
                                 kv_handle=_engine_handle(b"not json", num_tokens=2))]
    with grpc.insecure_channel(_address(vllm_mesh, "decode")) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        for request in decode_requests:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Decode(request, timeout=60))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request.request_id, err.value.details())
    with grpc.insecure_channel(_address(vllm_mesh, "prefill")) as channel:
        stub = prefill_pb2_grpc.PrefillServiceStub(channel)
        for ids in ([], [2, 999_999], [2] + [236761] * 3000):
            with pytest.raises(grpc.RpcError) as err:
                stub.Prefill(prefill_pb2.PrefillRequest(request_id="bad", prompt_token_ids=ids), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_vllm_decode_worker_prefills_a_request_without_kv_itself(vllm_mesh):
    """The local path (what the router's conditional decider picks for short prompts)."""
    from engine.tokenizer import load_tokenizer
    case = GOLDEN["cases"][0]
    prompt = load_tokenizer().encode(case["prompt"])
    with grpc.insecure_channel(_address(vllm_mesh, "decode")) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        messages = list(stub.Decode(decode_pb2.DecodeRequest(
            request_id="local", prompt_token_ids=prompt, max_tokens=case["max_tokens"], ignore_eos=True,
            sampling=GREEDY), timeout=120))
    assert [t for m in messages for t in m.token_ids] == case["token_ids"]
    assert messages[0].stats.kv_transport == ""
    assert messages[0].stats.local_prefill_tokens + messages[0].stats.cached_tokens == len(prompt)


def test_kv_events_follow_the_prompts_vllm_served(vllm_mesh, vllm_router):
    from engine.hashing import block_hashes
    from engine.tokenizer import load_tokenizer
    from pdmesh.v1 import worker_state_pb2, worker_state_pb2_grpc
    ids = load_tokenizer().encode(GOLDEN["cases"][0]["prompt"] * 4)
    generate(vllm_router, token_ids=common_pb2.TokenIds(ids=ids), max_tokens=1)
    for role in ("prefill", "decode"):
        with grpc.insecure_channel(_address(vllm_mesh, role)) as channel:
            stub = worker_state_pb2_grpc.WorkerStateServiceStub(channel)
            snapshot = next(u for u in stub.StreamState(worker_state_pb2.StreamStateRequest(), timeout=30)
                            if u.WhichOneof("update") == "kv_events")
        stored = {h for e in snapshot.kv_events.events if e.WhichOneof("event") == "stored"
                  for h in e.stored.block_hashes}
        assert set(block_hashes(ids, 16)) <= stored, role


def _engine_handle(params: bytes, num_tokens: int) -> common_pb2.KvHandle:
    layout = common_pb2.KvLayout(model_id="m", dtype="float32", block_size=128, num_layers=18, num_kv_heads=1,
                                 head_dim=256)
    return common_pb2.KvHandle(worker_id="prefill-x", transfer_address="127.0.0.1:1", lease_id="x",
                               num_tokens=num_tokens, layout=layout, transports=["vllm-nixl"],
                               engine_kv_params=params)


def _vllm_counters(process) -> dict[str, float]:
    """vLLM's own counters as the worker's /metrics serves them: prompt tokens by source (keyed
    by source) and the NIXL bytes this worker read (key "nixl_bytes")."""
    body = urllib.request.urlopen(f"http://{process.info['metrics_address']}/metrics", timeout=10).read().decode()
    counters = {"nixl_bytes": 0.0}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "vllm:prompt_tokens_by_source_total":
                counters[sample.labels["source"]] = sample.value
            elif sample.name == "vllm:nixl_bytes_transferred_sum":
                counters["nixl_bytes"] += sample.value
    return counters


def _delta(after: dict, before: dict) -> dict:
    return {key: after[key] - before.get(key, 0.0) for key in after}


def test_decode_worker_takes_the_whole_prompt_from_the_transfer(vllm_mesh, vllm_router):
    decode, prefill = vllm_mesh.workers("decode")[0], vllm_mesh.workers("prefill")[0]
    vllm_before, ours_before = _vllm_counters(decode), _load_report(decode.info["address"])
    prefill_before = _load_report(prefill.info["address"])
    messages = generate(vllm_router, text="A different preamble so nothing is cached. " + LONG_PROMPT, max_tokens=8)
    num_prompt = messages[-1].usage.prompt_tokens
    counted = _delta(_vllm_counters(decode), vllm_before)
    print("decode worker, vLLM counters moved by", counted, "for", messages[-1].usage.prompt_tokens, "prompt tokens")
    ours = _load_report(decode.info["address"])
    prefill_after = _load_report(prefill.info["address"])
    assert num_prompt > 256
    assert messages[-1].placement.kv_transport == "vllm-nixl"
    assert counted["external_kv_transfer"] == num_prompt, counted
    assert counted["local_compute"] == 0, f"the decode worker recomputed the prompt: {counted}"
    # fp32 KV of 18 layers x (K, V) x 1 head x 256 dims per token, read in whole 128-token blocks
    assert counted["nixl_bytes"] >= num_prompt * 18 * 2 * 256 * 4, counted
    assert ours.prompt_tokens_computed_total == ours_before.prompt_tokens_computed_total
    assert prefill_after.prompt_tokens_computed_total - prefill_before.prompt_tokens_computed_total == num_prompt
    assert [t for m in messages for t in m.token_ids], "no tokens streamed"


def test_repeated_prompt_is_served_from_the_prefill_workers_vllm_cache(vllm_mesh, vllm_router):
    prefill = vllm_mesh.workers("prefill")[0]
    first = generate(vllm_router, text=LONG_PROMPT, max_tokens=4)
    before = _load_report(prefill.info["address"])
    again = generate(vllm_router, text=LONG_PROMPT, max_tokens=4)
    after = _load_report(prefill.info["address"])
    num_prompt = again[-1].usage.prompt_tokens
    cached = after.prompt_tokens_cached_total - before.prompt_tokens_cached_total
    assert cached + after.prompt_tokens_computed_total - before.prompt_tokens_computed_total == num_prompt
    assert again[-1].usage.cached_prompt_tokens == cached >= num_prompt - 128
    assert [t for m in again for t in m.token_ids] == [t for m in first for t in m.token_ids]
    assert again[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
