"""KV crossing between two vLLM processes over vLLM's NixlConnector (CPU buffer, NIXL/UCX): the
decode instance takes every prompt token from the transfer (vLLM's own prompt-token counters)
and continues with the prefill instance's greedy text. Runs scripts/vllm_pd_probe.py (two vLLM
engines: about 3 minutes here). Marked `vllm` (make test-vllm)."""

import json
import os
import subprocess

import pytest

from pdmesh.launcher import ROOT
from tests.e2e.test_vllm import VLLM_PYTHON

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON} (make setup-vllm)")]
MARK = "pd-probe result: "


def test_kv_crosses_between_two_vllm_processes_over_nixl():
    done = subprocess.run([str(VLLM_PYTHON), "scripts/vllm_pd_probe.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    assert lines, f"probe printed no result (exit {done.returncode}):\n{done.stderr[-3000:]}"
    result = json.loads(lines[-1][len(MARK):])
    assert result["by_source"]["external_kv_transfer"] == result["prompt_tokens"]
    assert result["by_source"]["local_compute"] == 0, "the decode instance recomputed the prompt"
    assert result["same_text"]
    assert done.returncode == 0
