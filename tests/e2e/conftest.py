"""A real mesh (router + prefill + decode processes on the real model) per KV transport.

Session-scoped, so modules share it: the model loads once per transport per session. A module
that needs only one transport narrows it with
`pytestmark = pytest.mark.parametrize("mesh", ["nixl"], indirect=True)` and reuses that mesh.
"""

import grpc
import pytest

from pdmesh.launcher import MeshSpec, start_mesh


@pytest.fixture(scope="session", params=["nixl", "grpc"])
def mesh(request, tmp_path_factory):
    from engine.weights import prepare
    prepare()
    transports = "nixl,grpc" if request.param == "nixl" else "grpc"
    spec = MeshSpec(num_prefill=1, num_decode=1, router_port=0, kv_transports=transports, num_blocks=512,
                    profile="round_robin",  # always disaggregated: these tests follow the KV across
                    torch_threads=2, max_model_len=2048, http_port=0)
    m = start_mesh(spec, str(tmp_path_factory.mktemp(f"mesh-{request.param}")), progress=lambda *_: None)
    m.transport = request.param
    yield m
    m.stop()


@pytest.fixture(scope="module")
def router_stub(mesh):
    from pdmesh.v1 import router_pb2_grpc
    channel = grpc.insecure_channel(mesh.router_address)
    yield router_pb2_grpc.RouterServiceStub(channel)
    channel.close()

