"""Every server speaks grpc.health.v1 and reflection; SIGTERM drains: streams already accepted
finish whole, the worker leaves placement, and new requests get UNAVAILABLE, not a hang."""

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

EXPECTED_SERVICES = {
    "router": {"pdmesh.v1.RouterService"},
    "prefill-0": {"pdmesh.v1.PrefillService", "pdmesh.v1.KvTransferService", "pdmesh.v1.WorkerStateService"},
    "decode-0": {"pdmesh.v1.DecodeService", "pdmesh.v1.WorkerStateService"},
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    spec = MeshSpec(num_prefill=1, num_decode=1, router_port=0, model="tiny", kv_transports="grpc", profile="round_robin",
                    num_blocks=128, torch_threads=1, max_model_len=1024)
    m = start_mesh(spec, str(tmp_path_factory.mktemp("lifecycle")), progress=lambda *_: None)
    yield m
    m.stop()


def test_health_and_reflection_on_every_server(mesh):
    for process in mesh.processes:
        with grpc.insecure_channel(process.info["address"]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ["", *EXPECTED_SERVICES[process.name]]:
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING, (process.name, service)
            listed = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            names = {s.name for s in listed.list_services_response.service}
            assert EXPECTED_SERVICES[process.name] | {"grpc.health.v1.Health"} <= names


def test_sigterm_drains_the_stream_in_flight_then_the_worker_is_gone(mesh):
    stub = router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(mesh.router_address))
    request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[2, 100, 200]), max_tokens=600,
                                         ignore_eos=True)
    stream = stub.Generate(request, timeout=120)
    received = list(next(stream).token_ids)
    decode = mesh.process("decode-0")
    decode.popen.send_signal(signal.SIGTERM)
    messages = list(stream)
    received += [t for m in messages for t in m.token_ids]
    assert len(received) == 600, "the stream accepted before SIGTERM must finish whole"
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert decode.popen.wait(timeout=30) == 0
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(router_pb2.GenerateRequest(text="hi", max_tokens=2), timeout=30))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode" in err.value.details()
