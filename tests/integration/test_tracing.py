"""End-to-end traces and metrics from a real mesh: router, prefill and decode processes (tiny
model) export OTLP/gRPC to a real receiver started here; every /metrics endpoint is scraped."""

import math
import re
import secrets

import grpc
import pytest

from engine.config import ModelConfig
from bench import common as bench_common
from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.traces.receiver import OtlpReceiver
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

PROMPT = list(range(2, 80))  # 78 tokens -> 5 blocks of 16
BLOCK_SIZE = 16
# Spans of one disaggregated request, and the parent each must have.
PARENTS = {"router.queue": "router.generate", "router.placement": "router.generate",
           "router.prefill": "router.generate", "prefill": "router.prefill", "prefill.queue": "prefill",
           "prefill.compute": "prefill", "router.decode": "router.generate", "decode": "router.decode",
           "kv_transfer": "decode", "decode.generate": "decode"}


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.stop()


@pytest.fixture(scope="module", params=["grpc", "nixl"])
def traced_mesh(request, receiver, tmp_path_factory):
    transports = "grpc" if request.param == "grpc" else "nixl,grpc"
    spec = MeshSpec(num_prefill=1, num_decode=1, router_port=0, model="tiny", profile="round_robin",
                    kv_transports=transports, num_blocks=128, torch_threads=1, max_model_len=512,
                    otlp_endpoint=receiver.endpoint, extra_env=(("OTEL_BSP_SCHEDULE_DELAY", "100"),))
    mesh = start_mesh(spec, str(tmp_path_factory.mktemp(f"traced-{request.param}")), progress=lambda *_: None)
    channel = grpc.insecure_channel(mesh.router_address)
    mesh.stub, mesh.transport = router_pb2_grpc.RouterServiceStub(channel), request.param
    yield mesh
    channel.close()
    mesh.stop()


def generate(stub, metadata=(), prompt=PROMPT, max_tokens=6):
    request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=prompt), max_tokens=max_tokens,
                                         ignore_eos=True)
    call = stub.Generate(request, timeout=60, metadata=metadata)
    messages = list(call)
    trace_id = dict(call.initial_metadata()).get("x-pdmesh-trace-id", "")
    return messages, trace_id


def spans_of_trace(receiver, trace_id, expected_names):
    def complete(spans):
        return expected_names <= {s["name"] for s in spans if s["trace_id"] == trace_id}
    return [s for s in receiver.wait_for(complete, timeout_s=60) if s["trace_id"] == trace_id]


def by_name(spans):
    named = {}
    for s in spans:
        assert s["name"] not in named, f"span {s['name']} appears twice in one trace"
        named[s["name"]] = s
    return named


def ms(span):
    return (span["end_ns"] - span["start_ns"]) / 1e6


def test_one_trace_per_request_with_the_whole_chain(traced_mesh, receiver):
    messages, trace_id = generate(traced_mesh.stub)
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id), "the trace id comes back in response metadata"
    expected = set(PARENTS) | {"router.generate"} | ({"kv.serve"} if traced_mesh.transport == "grpc" else set())
    spans = by_name(spans_of_trace(receiver, trace_id, expected))
    assert spans["router.generate"]["parent_span_id"] == ""
    for child, parent in PARENTS.items():
        assert spans[child]["parent_span_id"] == spans[parent]["span_id"], f"{child} should be a child of {parent}"
    if traced_mesh.transport == "grpc":  # the holder side of the pull joins the same trace
        assert spans["kv.serve"]["parent_span_id"] == spans["kv_transfer"]["span_id"]
    services = {name: s["service"] for name, s in spans.items()}
    assert services["router.generate"] == "pdmesh-router"
    assert services["prefill.compute"] == "pdmesh-prefill"
    assert services["kv_transfer"] == services["decode.generate"] == "pdmesh-decode"

    transfer = spans["kv_transfer"]["attributes"]
    num_blocks = math.ceil(len(PROMPT) / BLOCK_SIZE)
    assert transfer["pdmesh.kv.bytes"] == num_blocks * BLOCK_SIZE * ModelConfig.tiny().kv_bytes_per_token
    assert transfer["pdmesh.kv.blocks"] == num_blocks
    assert transfer["pdmesh.kv.transport"] == traced_mesh.transport
    assert transfer["pdmesh.kv.throughput_gbps"] > 0 and transfer["pdmesh.kv.retries"] == 0

    root = spans["router.generate"]["attributes"]
    last = messages[-1]
    assert root["gen_ai.usage.input_tokens"] == len(PROMPT)
    assert root["gen_ai.usage.output_tokens"] == last.usage.completion_tokens == 6
    assert spans["prefill.compute"]["attributes"]["pdmesh.prefill.computed_tokens"] == len(PROMPT)
    assert spans["decode.generate"]["attributes"]["gen_ai.usage.output_tokens"] == 6  # the first (from prefill) included
    placement = spans["router.placement"]["attributes"]
    assert placement["pdmesh.placement.decision"] == "remote_prefill"
    assert placement["pdmesh.placement.decode_worker_id"] == "decode-0"
    assert placement["pdmesh.placement.prefill_worker_id"] == "prefill-0"
    assert 0.0 <= placement["pdmesh.placement.decode_score.decode-0"]


def test_span_durations_agree_with_the_timings_returned(traced_mesh, receiver):
    messages, trace_id = generate(traced_mesh.stub)
    spans = by_name(spans_of_trace(receiver, trace_id, set(PARENTS) | {"router.generate"}))
    timings = messages[-1].timings
    assert ms(spans["kv_transfer"]) == pytest.approx(timings.kv_transfer_ms, rel=0.25, abs=5.0)
    assert ms(spans["router.prefill"]) == pytest.approx(timings.prefill_ms, rel=0.25, abs=5.0)
    assert timings.total_ms <= ms(spans["router.generate"]) <= timings.total_ms + 10.0
    # Phases nest in time: a child never starts before its parent nor (within one process) ends
    # after it. A server span may close just after its client saw the last message.
    for child, parent in PARENTS.items():
        c, p = spans[child], spans[parent]
        slack_ns = 1_000_000 if c["service"] == p["service"] else 20_000_000
        assert p["start_ns"] - 1_000_000 <= c["start_ns"] and c["end_ns"] <= p["end_ns"] + slack_ns, child
    first_token = [e for e in spans["router.decode"]["events"] if e["name"] == "first_token"]
    assert len(first_token) == 1
    ttft_ms = (first_token[0]["time_ns"] - spans["router.generate"]["start_ns"]) / 1e6
    assert ttft_ms == pytest.approx(timings.time_to_first_token_ms, rel=0.25, abs=5.0)


def test_client_traceparent_is_continued(traced_mesh, receiver):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    _, returned = generate(traced_mesh.stub, metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),))
    assert returned == trace_id
    spans = by_name(spans_of_trace(receiver, trace_id, {"router.generate", "decode.generate"}))
    assert spans["router.generate"]["parent_span_id"] == parent_id


def test_bad_request_is_a_failed_span_and_counted(traced_mesh, receiver):
    before = scrape(traced_mesh, "router")
    request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=0)
    with pytest.raises(grpc.RpcError) as err:
        list(traced_mesh.stub.Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(traced_mesh, "router")
    key = 'pdmesh_requests_total{code="INVALID_ARGUMENT",method="Generate",service="router"}'
    assert after.get(key, 0) == before.get(key, 0) + 1
    failed = receiver.wait_for(lambda spans: any(s["name"] == "router.generate" and s["status_code"] ==
                                                 "STATUS_CODE_ERROR" for s in spans))
    assert failed


def scrape(mesh, name):
    return bench_common.scrape(mesh.process(name).info["metrics_address"])


def test_metrics_move_after_requests(traced_mesh):
    before = {name: scrape(traced_mesh, name) for name in ("router", "prefill-0", "decode-0")}
    for _ in range(3):
        generate(traced_mesh.stub)
    after = {name: scrape(traced_mesh, name) for name in ("router", "prefill-0", "decode-0")}

    def moved(name, key):
        return after[name].get(key, 0) - before[name].get(key, 0)

    assert moved("router", 'pdmesh_requests_total{code="OK",method="Generate",service="router"}') == 3
    assert moved("router", 'pdmesh_ttft_seconds_count{priority="interactive"}') == 3
    assert moved("router", 'pdmesh_itl_seconds_count{priority="interactive"}') == 3 * 5
    assert moved("router", 'pdmesh_routing_decisions_total{decision="remote_prefill"}') == 3
    assert moved("prefill-0", 'pdmesh_requests_total{code="OK",method="Prefill",service="prefill"}') == 3
    # The same prompt three times: the prefill worker's prefix cache serves all but the last partial block.
    assert moved("prefill-0", 'pdmesh_prompt_tokens_total{service="prefill",worker_id="prefill-0"}') == 3 * len(PROMPT)
    assert moved("prefill-0", 'pdmesh_prompt_tokens_cached_total{service="prefill",worker_id="prefill-0"}') > 0
    kv_bytes = f'pdmesh_kv_transfer_bytes_total{{transport="{traced_mesh.transport}"}}'
    assert moved("decode-0", kv_bytes) == 3 * 5 * BLOCK_SIZE * ModelConfig.tiny().kv_bytes_per_token
    assert moved("decode-0", f'pdmesh_kv_transfer_seconds_count{{transport="{traced_mesh.transport}"}}') == 3
    assert after["decode-0"]['pdmesh_kv_blocks_total{service="decode",worker_id="decode-0"}'] == 128


def test_a_repeated_long_text_prefix_is_tokenized_once(traced_mesh, tokenizer):
    words = ("international", "organization", "responsibility", "development", "information", "understanding")
    system = " ".join(words[i % len(words)] for i in range(180))  # ~2.3 KB, ~190 tokens
    texts = [f"{system} First question here?", f"{system} A second, different question."]
    before = scrape(traced_mesh, "router")
    for text in texts:
        request = router_pb2.GenerateRequest(text=text, max_tokens=2)
        last = list(traced_mesh.stub.Generate(request, timeout=60))[-1]
        assert last.usage.prompt_tokens == len(tokenizer.encode(text))  # the ids are the tokenizer's
    after = scrape(traced_mesh, "router")
    key = 'pdmesh_router_prompt_text_chars_total{source="%s"}'
    served = after.get(key % "cache", 0) - before.get(key % "cache", 0)
    assert 1024 <= served <= len(system)  # the second prompt's shared chunks came from the cache
