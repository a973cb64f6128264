import sys

from pdmesh.cli import _engines
from pdmesh.launcher import MeshSpec


def test_each_pool_runs_its_own_engine_and_interpreter():
    spec = MeshSpec(prefill_engine="vllm", prefill_python="/v/bin/python")
    assert spec.engine_of("prefill") == ("vllm", "/v/bin/python")
    assert spec.engine_of("decode") == ("builtin", sys.executable)
    # an interpreter given for a built-in pool is not used: the built-in engine runs in this venv
    assert MeshSpec(decode_python="/v/bin/python").engine_of("decode") == ("builtin", sys.executable)


def test_up_engine_vllm_puts_both_pools_in_the_vllm_venv(monkeypatch):
    monkeypatch.setenv("PDMESH_VLLM_PYTHON", "/opt/vllm/bin/python")
    spec = MeshSpec(**_engines("vllm"))
    assert spec.engine_of("prefill") == spec.engine_of("decode") == ("vllm", "/opt/vllm/bin/python")
    assert _engines("builtin") == {}
