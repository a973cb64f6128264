"""Property-based fuzzing of every public RPC and the HTTP front against one tiny-model mesh in
real processes (bench/fuzz.py holds the strategies and properties; `python -m bench.fuzz
--examples N` is the long run). Each target's batch ends by checking the mesh still serves a known
request with the known output."""

import pytest

from bench.fuzz import TARGETS, MeshClients, check_oversize, run_target
from pdmesh.launcher import MeshSpec, start_mesh

EXAMPLES = 500  # per target, weighted: a few thousand cases in all


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    spec = MeshSpec(num_prefill=1, num_decode=1, router_port=0, model="tiny", profile="round_robin",
                    kv_transports="grpc", num_blocks=256, torch_threads=1, max_model_len=512)
    mesh = start_mesh(spec, str(tmp_path_factory.mktemp("fuzz")), progress=lambda *_: None)
    c = MeshClients.of_mesh(mesh)
    c.still_serves()
    yield c
    c.close()
    mesh.stop()


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_bad_input_gets_a_clear_status_and_the_mesh_keeps_serving(clients, target):
    assert run_target(clients, target, max(20, int(EXAMPLES * target.weight))) > 0
    if target.name in ("router.Generate", "decode.Decode"):  # valid cases were drawn and served whole
        assert clients.outcomes[target.name.split(".")[1], "OK"] > 0


def test_oversize_is_resource_exhausted_and_just_under_is_answered(clients):
    lines = check_oversize(clients)
    assert len(lines) == 4
    clients.still_serves()
