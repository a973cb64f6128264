"""The whole path on the real model, real processes, real KV transfer (NIXL and the gRPC fallback)."""

import json
import pathlib

import grpc
import pytest

from pdmesh.v1 import common_pb2, router_pb2, worker_state_pb2, worker_state_pb2_grpc

GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden.json").read_text())
GREEDY = common_pb2.SamplingParams(temperature=0.0)


def generate(stub, **fields):
    fields.setdefault("sampling", GREEDY)
    return list(stub.Generate(router_pb2.GenerateRequest(**fields), timeout=120))


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["prompt"][:24])
def test_greedy_output_equals_golden(router_stub, mesh, case):
    messages = generate(router_stub, text=case["prompt"], max_tokens=case["max_tokens"], ignore_eos=True)
    tokens = [t for m in messages for t in m.token_ids]
    text = "".join(m.text_delta for m in messages)
    assert tokens == case["token_ids"]
    assert text == case["text"]
    last = messages[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == len(tokens)
    assert last.placement.prefill_worker_id == "prefill-0" and last.placement.decode_worker_id == "decode-0"
    assert last.placement.kv_transport == mesh.transport
    assert last.timings.time_to_first_token_ms > 0 and last.timings.total_ms >= last.timings.time_to_first_token_ms
    assert len(messages) >= len(tokens), "tokens must stream one by one, not arrive in one message"


def _load_report(address: str) -> worker_state_pb2.LoadReport:
    with grpc.insecure_channel(address) as channel:
        stub = worker_state_pb2_grpc.WorkerStateServiceStub(channel)
        for update in stub.StreamState(worker_state_pb2.StreamStateRequest(load_report_interval_ms=50), timeout=30):
            if update.WhichOneof("update") == "load_report":
                return update.load_report
    raise AssertionError("no load report")


def test_kv_crossed_over_decode_never_ran_the_prompt(router_stub, mesh):
    generate(router_stub, text="Disaggregated serving moves the KV cache", max_tokens=4)
    decode = _load_report(mesh.workers("decode")[0].info["address"])
    prefill = _load_report(mesh.workers("prefill")[0].info["address"])
    assert decode.prompt_tokens_computed_total == 0, "the decode worker ran a prompt through the model"
    assert decode.generated_tokens_total > 0
    assert prefill.prompt_tokens_computed_total + prefill.prompt_tokens_cached_total > 0


BAD_REQUESTS = [
    ("empty text", dict(text="", max_tokens=4), "empty"),
    ("no prompt", dict(max_tokens=4), "missing"),
    ("empty token ids", dict(token_ids=common_pb2.TokenIds(ids=[]), max_tokens=4), "empty"),
    ("too long", dict(token_ids=common_pb2.TokenIds(ids=[2] + [236761] * 3000), max_tokens=4), "limit"),
    ("text too long to fit", dict(text="x" * 4_000_000, max_tokens=4), "characters"),  # refused before tokenizing
    ("max_tokens 0", dict(text="hi", max_tokens=0), "max_tokens"),
    ("max_tokens negative", dict(text="hi", max_tokens=-3), "max_tokens"),
    ("max_tokens above cap", dict(text="hi", max_tokens=100_000), "cap"),
    ("negative temperature", dict(text="hi", max_tokens=4, sampling=common_pb2.SamplingParams(temperature=-1)),
     "temperature"),
    ("NaN temperature", dict(text="hi", max_tokens=4, sampling=common_pb2.SamplingParams(temperature=float("nan"))),
     "temperature"),
    ("top_p zero", dict(text="hi", max_tokens=4, sampling=common_pb2.SamplingParams(top_p=0.0)), "top_p"),
    ("top_p above one", dict(text="hi", max_tokens=4, sampling=common_pb2.SamplingParams(top_p=1.5)), "top_p"),
    ("unknown token ids", dict(token_ids=common_pb2.TokenIds(ids=[2, 999_999]), max_tokens=4), "unknown token"),
    ("unknown priority", dict(text="hi", max_tokens=4, priority=7), "priority"),
]


@pytest.mark.parametrize("name,fields,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(router_stub, name, fields, needle):
    with pytest.raises(grpc.RpcError) as err:
        generate(router_stub, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert needle in err.value.details()
    ok = generate(router_stub, text="Hello", max_tokens=2)
    assert ok[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
