"""Faults with real processes (the tiny model): a decode worker SIGKILLed mid-stream, a prefill
worker killed before its request, a client that cancels. Every accepted request ends whole:
greedy output equal to the uninterrupted run, no token lost or duplicated, no KV left behind."""

import signal
import threading
import time

import grpc
import pytest

from bench import common as bench_common
from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

PROMPT = [2] + list(range(5000, 5040))
MAX_TOKENS = 300


@pytest.fixture
def mesh(tmp_path):
    spec = MeshSpec(num_prefill=1, num_decode=2, router_port=0, model="tiny", profile="round_robin",
                    kv_transports="grpc", num_blocks=128, torch_threads=1, max_model_len=512)
    m = start_mesh(spec, str(tmp_path), progress=lambda *_: None)
    channel = grpc.insecure_channel(m.router_address)
    m.stub = router_pb2_grpc.RouterServiceStub(channel)
    yield m
    channel.close()
    m.stop(grace_s=5)


def request(max_tokens=MAX_TOKENS):
    return router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=max_tokens,
                                      ignore_eos=True)


def scrape(process) -> dict:
    return bench_common.scrape(process.info["metrics_address"])


def gauge(process, name) -> float:
    return next(v for k, v in scrape(process).items() if k.startswith(name + "{"))


def busy_decode_worker(mesh):
    for _ in range(200):
        for p in mesh.workers("decode"):
            if p.popen.poll() is None and gauge(p, "pdmesh_running_sequences") > 0:
                return p
        time.sleep(0.01)
    raise AssertionError("no decode worker is running the request")


def stream_in_background(mesh):
    """Starts request() streaming on a thread; returns (thread, received token ids, messages) once
    30 tokens have arrived."""
    received, messages, streaming = [], [], threading.Event()

    def stream():
        for message in mesh.stub.Generate(request(), timeout=120):
            messages.append(message)
            received.extend(message.token_ids)
            if len(received) >= 30:
                streaming.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert streaming.wait(60)
    return thread, received, messages


def test_decode_worker_killed_mid_stream_loses_and_repeats_nothing(mesh):
    expected = [t for m in mesh.stub.Generate(request(), timeout=60) for t in m.token_ids]
    thread, received, messages = stream_in_background(mesh)
    victim = busy_decode_worker(mesh)
    victim.popen.kill()  # SIGKILL: no drain, the stream breaks mid-flight
    thread.join(120)
    assert not thread.is_alive()
    assert len(received) == MAX_TOKENS, f"{len(received)} tokens delivered, {MAX_TOKENS} expected"
    assert received == expected, "tokens lost, duplicated or different after the failover"
    last = messages[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and last.usage.completion_tokens == MAX_TOKENS
    assert last.placement.decode_worker_id != victim.name
    router = mesh.process("router")
    assert scrape(router)['pdmesh_failovers_total{phase="decode"}'] == 1
    # The mesh keeps serving on the surviving worker.
    again = [t for m in mesh.stub.Generate(request(20), timeout=60) for t in m.token_ids]
    assert again == expected[:20]


def test_decode_worker_frozen_mid_stream_is_found_by_keepalive_and_the_request_moves(mesh):
    """SIGSTOP: the worker's connections stay open but nothing answers. The router's keepalive
    pings (10 s, 5 s to answer) drop the connection and the request resumes elsewhere."""
    expected = [t for m in mesh.stub.Generate(request(), timeout=60) for t in m.token_ids]
    thread, received, messages = stream_in_background(mesh)
    victim = busy_decode_worker(mesh)
    victim.popen.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        thread.join(90)
        moved_after_s = time.monotonic() - stopped
    finally:
        victim.popen.kill()  # SIGKILL works on a stopped process
    assert not thread.is_alive(), "the request waited on the frozen worker"
    assert received == expected, "tokens lost, duplicated or different after the failover"
    assert messages[-1].placement.decode_worker_id != victim.name
    assert moved_after_s < 40, f"the frozen worker was found after {moved_after_s:.0f} s"


def test_prefill_worker_killed_request_is_served_elsewhere(mesh):
    expected = [t for m in mesh.stub.Generate(request(40), timeout=60) for t in m.token_ids]
    victim = mesh.workers("prefill")[0].popen
    victim.kill()
    victim.wait()
    messages = list(mesh.stub.Generate(request(40), timeout=60))
    assert [t for m in messages for t in m.token_ids] == expected
    assert messages[-1].placement.prefill_worker_id == ""  # prefilled on the decode worker instead


def test_client_cancel_frees_blocks_and_leases_everywhere(mesh):
    decode_workers, prefill = mesh.workers("decode"), mesh.workers("prefill")[0]
    call = mesh.stub.Generate(request(MAX_TOKENS), timeout=120)
    received = 0
    for message in call:
        received += len(message.token_ids)
        if received >= 10:
            call.cancel()
            break
    assert received < MAX_TOKENS
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        used = [gauge(p, "pdmesh_kv_blocks_used") for p in [*decode_workers, prefill]]
        running = [gauge(p, "pdmesh_running_sequences") for p in decode_workers]
        if not any(used) and not any(running):
            break
        time.sleep(0.1)
    assert used == [0, 0, 0] and running == [0, 0], "a cancelled request kept KV blocks or a lease"


def test_a_worker_restarted_on_its_address_is_used_again_within_seconds(mesh):
    from pdmesh.launcher import restart

    victim = mesh.workers("decode")[1]
    victim.popen.kill()
    victim.popen.wait()
    time.sleep(5)  # the router has retried (and backed off) a few times
    restart(mesh, victim)
    probe = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[2, 5, 6]), max_tokens=1)
    deadline, placed = time.monotonic() + 5, set()
    while time.monotonic() < deadline and victim.name not in placed:
        placed.add(list(mesh.stub.Generate(probe, timeout=30))[-1].placement.decode_worker_id)
        time.sleep(0.05)
    assert victim.name in placed, f"the restarted {victim.name} got no request within 5 s (placed on {placed})"
