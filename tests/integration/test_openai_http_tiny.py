"""The HTTP front's guard rails on a tiny-model mesh in real processes: API keys, 429 with
Retry-After when the router is full, stop strings that free the KV, and an error event when the
mesh fails after a stream started. The router admits one request at a time and queues none."""

import signal
import time

import grpc
import httpx
import openai
import pytest

from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import worker_state_pb2, worker_state_pb2_grpc

KEY = "sk-test-2"
LONG = dict(model="tiny", prompt="Hello there", max_tokens=400, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    spec = MeshSpec(num_prefill=0, num_decode=1, router_port=0, model="tiny", kv_transports="grpc", num_blocks=128,
                    torch_threads=1, max_model_len=512,
                    extra_env=(("PDMESH_API_KEYS", f"sk-test-1,{KEY}"), ("PDMESH_MAX_INFLIGHT", "1"),
                               ("PDMESH_MAX_QUEUED", "0")))
    m = start_mesh(spec, str(tmp_path_factory.mktemp("tiny-http")), progress=lambda *_: None)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def client(mesh):
    with openai.OpenAI(base_url=f"{mesh.http_address}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def decode_load(mesh) -> worker_state_pb2.LoadReport:
    with grpc.insecure_channel(mesh.workers("decode")[0].info["address"]) as channel:
        stub = worker_state_pb2_grpc.WorkerStateServiceStub(channel)
        for update in stub.StreamState(worker_state_pb2.StreamStateRequest(load_report_interval_ms=50), timeout=30):
            if update.WhichOneof("update") == "load_report":
                return update.load_report
    raise AssertionError("no load report")


def idle(mesh, timeout_s: float = 10.0) -> worker_state_pb2.LoadReport:
    deadline = time.monotonic() + timeout_s
    while True:
        load = decode_load(mesh)
        if (load.running_sequences == 0 and load.waiting_sequences == 0) or time.monotonic() > deadline:
            return load
        time.sleep(0.05)


def test_requests_without_the_right_key_are_401(mesh):
    with openai.OpenAI(base_url=f"{mesh.http_address}/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.completions.create(model="tiny", prompt="Hi", max_tokens=2)
        assert err.value.status_code == 401 and "Authorization: Bearer" in err.value.message
    anonymous = httpx.post(f"{mesh.http_address}/v1/chat/completions", timeout=10,
                           json={"messages": [{"role": "user", "content": "Hi"}]})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{mesh.http_address}/health", timeout=10).status_code == 200


def test_the_right_key_is_served(client):
    done = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 3 and done.choices[0].finish_reason == "length"


def test_over_capacity_is_429_with_retry_after(client, mesh):
    holder = client.completions.create(stream=True, **LONG)  # takes the router's only slot
    next(iter(holder))
    try:
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=2,
                                      extra_headers={"x-pdmesh-priority": "batch", "x-pdmesh-tenant": "t1"})
        headers = err.value.response.headers
        assert err.value.status_code == 429 and "capacity" in err.value.message
        assert headers["retry-after"] == "1" and headers["retry-after-ms"] == "1000"
    finally:
        holder.close()
    idle(mesh)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_ends_the_generation_and_frees_the_kv(client, mesh, stream):
    full = client.completions.create(model="tiny", prompt="Hello there", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 3:len(full) // 3 + 3]
    baseline = idle(mesh)
    reply = client.completions.create(stop=stop, stream=stream, **LONG)
    text = "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text
    assert text == full[:full.index(stop)]
    after = idle(mesh)
    assert after.kv_blocks_used == baseline.kv_blocks_used
    assert after.generated_tokens_total - baseline.generated_tokens_total < 100, "decoding went on after the stop"


def test_a_client_leaving_mid_stream_frees_the_kv_and_the_front_keeps_serving(client, mesh):
    baseline = idle(mesh)
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{mesh.http_address}/v1/completions", json=body,
                                                       headers={"authorization": f"Bearer {KEY}"}) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data:")
            if events == 3:
                during = decode_load(mesh)
                break
    assert during.running_sequences == 1 and during.kv_blocks_used > baseline.kv_blocks_used
    after = idle(mesh)
    assert after.running_sequences == 0 and after.kv_blocks_used == baseline.kv_blocks_used
    assert after.generated_tokens_total - baseline.generated_tokens_total < 200, "it decoded on after the client left"
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_a_failure_after_the_stream_started_is_an_error_event(client, mesh):
    """Last in this module: it kills the decode worker."""
    stream = client.completions.create(stream=True, **LONG)
    chunks = iter(stream)
    next(chunks)
    mesh.workers("decode")[0].popen.send_signal(signal.SIGKILL)
    with pytest.raises(openai.APIError) as err:
        for _ in chunks:
            pass
    assert "decode worker" in err.value.message
    time.sleep(1.5)
    assert httpx.get(f"{mesh.http_address}/ready", timeout=10).status_code == 503
