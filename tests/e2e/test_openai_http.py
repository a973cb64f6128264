"""The official `openai` client against the router's HTTP front on the real mesh: the same text,
token counts and KV behaviour as the gRPC path."""

import json
import pathlib
import time

import grpc
import httpx
import openai
import pytest

from pdmesh.v1 import common_pb2, router_pb2, worker_state_pb2, worker_state_pb2_grpc
from services.router.chat_template import GEMMA3_TURNS, ChatTemplate, TemplateSource

pytestmark = pytest.mark.parametrize("mesh", ["nixl"], indirect=True)  # one real mesh is enough here

GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden.json").read_text())
CASE = GOLDEN["cases"][0]  # "The capital of France is", 30 tokens
MODEL = "gemma-3-270m"
CHAT = [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "What is the sea?"}]


@pytest.fixture(scope="module")
def client(mesh):
    with openai.OpenAI(base_url=f"{mesh.http_address}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def grpc_generate(stub, max_tokens, **prompt):
    messages = list(stub.Generate(router_pb2.GenerateRequest(
        max_tokens=max_tokens, sampling=common_pb2.SamplingParams(temperature=0.0), **prompt), timeout=120))
    return "".join(m.text_delta for m in messages), messages[-1]


def chat_prompt_ids(tokenizer) -> list[int]:
    rendered = ChatTemplate(TemplateSource(GEMMA3_TURNS, "builtin gemma3")).render(CHAT)
    return tokenizer.encode(rendered, add_bos=False)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_greedy_text_and_usage_equal_the_grpc_path(client, router_stub):
    grpc_text, last = grpc_generate(router_stub, CASE["max_tokens"], text=CASE["prompt"], ignore_eos=True)
    done = client.completions.create(model=MODEL, prompt=CASE["prompt"], max_tokens=CASE["max_tokens"],
                                     temperature=0, extra_body={"ignore_eos": True})
    assert done.choices[0].text == grpc_text == CASE["text"]
    assert done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == last.usage.prompt_tokens
    assert done.usage.completion_tokens == last.usage.completion_tokens == CASE["max_tokens"]
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_streamed_completion_arrives_piece_by_piece_with_usage_last(client):
    stream = client.completions.create(model=MODEL, prompt=CASE["prompt"], max_tokens=CASE["max_tokens"],
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == CASE["text"]
    assert len(text_chunks) >= CASE["max_tokens"] // 2, "the stream was buffered instead of relayed"
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == CASE["max_tokens"]
    assert all(c.usage is None for c in text_chunks)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_greedy_text_equals_the_grpc_path_on_the_templated_prompt(client, router_stub, tokenizer, stream):
    ids = chat_prompt_ids(tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id, "exactly one <bos>"
    grpc_text, last = grpc_generate(router_stub, 20, token_ids=common_pb2.TokenIds(ids=ids))
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0,
                                           stream=stream, stream_options={"include_usage": True} if stream else None)
    if stream:
        chunks = list(reply)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        finish, usage = [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage
    else:
        text, finish, usage = reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage
        assert reply.choices[0].message.role == "assistant"
    assert text == grpc_text and text.strip()
    assert usage.prompt_tokens == len(ids) == last.usage.prompt_tokens
    assert usage.completion_tokens == last.usage.completion_tokens
    assert finish == ("length" if last.finish_reason == common_pb2.FINISH_REASON_LENGTH else "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_ends_the_text_before_it(client, stream):
    stop = " It is"  # the golden text: " the capital of the country of France. It is the largest ..."
    reply = client.completions.create(model=MODEL, prompt=CASE["prompt"], max_tokens=CASE["max_tokens"],
                                      temperature=0, stop=[stop, "never appears"], stream=stream,
                                      extra_body={"ignore_eos": True})
    if stream:
        chunks = list(reply)
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = reply.choices[0].text, reply.choices[0].finish_reason
    assert text == CASE["text"][:CASE["text"].index(stop)]
    assert finish == "stop"
    if not stream:
        assert 0 < reply.usage.completion_tokens < CASE["max_tokens"], "generation should stop at the stop string"


BAD = [
    ("negative temperature", dict(temperature=-1), "temperature"),
    ("top_p above one", dict(top_p=1.5), "top_p"),
    ("max_tokens zero", dict(max_tokens=0), "max_tokens"),
    ("max_tokens above cap", dict(max_tokens=100_000), "cap"),
    ("n of two", dict(n=2), "n=1"),
    ("logprobs", dict(logprobs=2), "logprobs"),
    ("five stop strings", dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("batch of prompts", dict(prompt=["one", "two"]), "one prompt"),
    ("unknown token id", dict(prompt=[2, 999_999]), "unknown token"),
    ("bad priority header", dict(extra_headers={"x-pdmesh-priority": "urgent"}), "x-pdmesh-priority"),
]


@pytest.mark.parametrize("name,fields,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_parameters_are_400_with_a_message(client, name, fields, needle):
    fields = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**fields)
    assert err.value.status_code == 400
    assert needle in err.value.message, err.value.message
    assert err.value.body["type"] == "invalid_request_error"


def test_bad_chat_messages_and_unknown_model(client):
    with pytest.raises(openai.BadRequestError, match="alternate"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}] * 2, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt="Hello", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and MODEL in err.value.message


def test_health_and_readiness(mesh):
    assert httpx.get(f"{mesh.http_address}/health", timeout=10).status_code == 200
    assert httpx.get(f"{mesh.http_address}/ready", timeout=10).json() == {"status": "ready"}


def _decode_load(mesh) -> worker_state_pb2.LoadReport:
    with grpc.insecure_channel(mesh.workers("decode")[0].info["address"]) as channel:
        stub = worker_state_pb2_grpc.WorkerStateServiceStub(channel)
        for update in stub.StreamState(worker_state_pb2.StreamStateRequest(load_report_interval_ms=50), timeout=30):
            if update.WhichOneof("update") == "load_report":
                return update.load_report
    raise AssertionError("no load report")


def _wait_until_idle(mesh, timeout_s: float = 10.0) -> worker_state_pb2.LoadReport:
    deadline = time.monotonic() + timeout_s
    while True:
        load = _decode_load(mesh)
        if load.running_sequences == 0 and load.waiting_sequences == 0 or time.monotonic() > deadline:
            return load
        time.sleep(0.1)


def test_a_stream_cancelled_midway_frees_its_kv(client, mesh):
    baseline = _wait_until_idle(mesh)
    stream = client.completions.create(model=MODEL, prompt="Tell me a long story about the sea. " * 8,
                                       max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += 1
        if received == 5:
            during = _decode_load(mesh)
            break
    assert during.running_sequences == 1 and during.kv_blocks_used > baseline.kv_blocks_used
    stream.close()  # the client goes away mid-stream
    after = _wait_until_idle(mesh)
    assert after.running_sequences == 0, "the cancelled request is still decoding"
    assert after.kv_blocks_used == baseline.kv_blocks_used, "the cancelled request's KV blocks were not freed"
    assert after.generated_tokens_total - baseline.generated_tokens_total < 200, "it decoded on after the cancel"
