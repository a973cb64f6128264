"""Where the vLLM venv is, and the marks every vLLM test module carries."""

import os
import pathlib

import pytest

from pdmesh.launcher import ROOT

VLLM_PYTHON = pathlib.Path(os.environ.get("PDMESH_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))

VLLM_MARKS = [pytest.mark.vllm,
              pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON} (make setup-vllm)")]
