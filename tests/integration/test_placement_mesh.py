"""Placement on a real mesh (tiny model, real processes, prefix_aware profile): the router follows
cached prefixes it learned from the workers' KV events, prefills short or cached prompts locally,
and steers new work away from a busy decode worker."""

import threading
import time

import grpc
import pytest

from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

SYSTEM = ("You are a careful assistant for a shipping company. Answer questions about parcels, "
          "customs forms, delivery windows and damaged goods. Always cite the relevant policy section, "
          "never invent tracking numbers, and keep answers under five sentences. ") * 6


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    spec = MeshSpec(num_prefill=1, num_decode=2, router_port=0, model="tiny", kv_transports="grpc",
                    profile="prefix_aware", num_blocks=256, torch_threads=1, max_model_len=4096)
    m = start_mesh(spec, str(tmp_path_factory.mktemp("placement")), progress=lambda *_: None)
    channel = grpc.insecure_channel(m.router_address)
    m.stub = router_pb2_grpc.RouterServiceStub(channel)
    yield m
    channel.close()
    m.stop()


def generate(stub, text, max_tokens=3, **fields):
    messages = list(stub.Generate(router_pb2.GenerateRequest(text=text, max_tokens=max_tokens, ignore_eos=True,
                                                             **fields), timeout=60))
    return messages[-1].placement


def test_shared_prefix_follows_the_worker_that_holds_it(mesh):
    first = generate(mesh.stub, SYSTEM + "Where is my parcel?")
    assert first.decision == "remote_prefill", first.decision_reason  # cold and long: disaggregated
    assert first.prefill_worker_id == "prefill-0" and first.kv_transport == "grpc"
    time.sleep(0.5)  # the KV events reach the router on the state stream
    for question in ["Can I send perfume abroad?", "My box arrived crushed.", "Which form for books?"]:
        again = generate(mesh.stub, SYSTEM + question)
        assert again.decode_worker_id == first.decode_worker_id, "the cached prefix should attract the request"
        assert again.decode_cached_tokens >= 192, "router and engine must hash the same blocks"
        assert again.decision == "local_prefill" and again.prefill_worker_id == "" and again.kv_transport == ""
        assert again.decode_scores[first.decode_worker_id] > max(
            s for w, s in again.decode_scores.items() if w != first.decode_worker_id)


def test_short_prompt_prefills_locally_and_skips_the_kv_path(mesh):
    placement = generate(mesh.stub, "Hi!")
    assert placement.decision == "local_prefill" and placement.kv_transport == ""
    assert "uncached" in placement.decision_reason


def drain(stream) -> None:
    try:
        for _ in stream:
            pass
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.CANCELLED


def test_new_requests_avoid_a_busy_decode_worker(mesh):
    request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[2] + [300] * 8), max_tokens=3000,
                                         ignore_eos=True)
    stream = mesh.stub.Generate(request, timeout=120)
    next(stream)  # the long request is running
    threading.Thread(target=drain, args=(stream,), daemon=True).start()
    time.sleep(0.6)  # at least one load report shows it
    try:
        placements = [generate(mesh.stub, f"Question number {i}: what is {i} + {i}?") for i in range(4)]
        busy = {"decode-0", "decode-1"} - {p.decode_worker_id for p in placements}
        assert len(busy) == 1, f"all new requests should go to the idle worker, got {placements}"
    finally:
        stream.cancel()


def test_a_restarted_router_rebuilds_the_same_view_from_the_workers(mesh, tmp_path):
    import json
    import subprocess
    import sys

    holder = generate(mesh.stub, SYSTEM + "Do you ship to Iceland?")
    time.sleep(0.5)
    address = lambda role: ",".join(p.info["address"] for p in mesh.processes if p.info.get("role") == role)  # noqa
    ready = tmp_path / "router2.json"
    router2 = subprocess.Popen([sys.executable, "-m", "services.router", "--port", "0", "--http-port", "off",
                                "--prefill", address("prefill"),
                                "--decode", address("decode"), "--ready-file", str(ready)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.1)
        time.sleep(0.5)  # snapshots arrive on the state streams
        with grpc.insecure_channel(json.loads(ready.read_text())["address"]) as channel:
            fresh = generate(router_pb2_grpc.RouterServiceStub(channel), SYSTEM + "And to Greenland?")
        old = generate(mesh.stub, SYSTEM + "And to Greenland?")
    finally:
        router2.terminate()
        router2.wait(timeout=30)
    assert fresh.decode_worker_id == old.decode_worker_id == holder.decode_worker_id
    assert fresh.decode_cached_tokens == old.decode_cached_tokens > 0


def test_a_killed_worker_leaves_placement_and_its_prefix_entries_go(mesh):
    import signal

    holder = generate(mesh.stub, SYSTEM + "What is a customs declaration?")
    victim = mesh.process(holder.decode_worker_id)
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait(timeout=10)
    time.sleep(0.5)  # the router sees the state stream break
    after = generate(mesh.stub, SYSTEM + "What is a customs declaration?")
    assert after.decode_worker_id != holder.decode_worker_id
    assert holder.decode_worker_id not in after.decode_scores
