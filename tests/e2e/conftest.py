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


@pytest.fixture(scope="session")
def vllm_mesh(tmp_path_factory):
    """One vLLM prefill and one vLLM decode worker (the CPU build, NixlConnector on host memory)
    behind the router, always disaggregated: every request's KV crosses between the two vLLM
    processes. Session-scoped: vLLM starts once per test session (~45 s on a quiet machine)."""
    from tests.e2e.vllm_env import VLLM_PYTHON
    env = (("PDMESH_VLLM_GPU_MEMORY_UTILIZATION", "0.15"),)
    spec = MeshSpec(num_prefill=1, num_decode=1, router_port=0, kv_transports="grpc", profile="round_robin",
                    torch_threads=2, max_model_len=2048, http_port=None, extra_env=env, startup_timeout_s=600,
                    prefill_engine="vllm", prefill_python=str(VLLM_PYTHON),
                    decode_engine="vllm", decode_python=str(VLLM_PYTHON))
    m = start_mesh(spec, str(tmp_path_factory.mktemp("mesh-vllm")), progress=lambda *_: None)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def vllm_router(vllm_mesh):
    from pdmesh.v1 import router_pb2_grpc
    channel = grpc.insecure_channel(vllm_mesh.router_address)
    yield router_pb2_grpc.RouterServiceStub(channel)
    channel.close()
