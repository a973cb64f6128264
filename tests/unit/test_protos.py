"""The API contract: generated stubs are fresh, and buf lint (STANDARD) passes."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    fresh = sorted(p.name for p in (tmp_path / "pdmesh" / "v1").iterdir())
    committed = sorted(p.name for p in (ROOT / "pdmesh" / "v1").iterdir() if p.is_file())
    assert fresh == committed, "stub file set differs: run `make protos` and commit"
    for name in fresh:
        assert (tmp_path / "pdmesh" / "v1" / name).read_bytes() == (ROOT / "pdmesh" / "v1" / name).read_bytes(), \
            f"pdmesh/v1/{name} is stale: run `make protos` and commit"


def test_buf_lint_passes():
    buf = ROOT / ".cache" / "buf" / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        buf = shutil.which("buf")
    if buf is None:
        pytest.fail("buf is not installed: scripts/setup.sh installs it from npm (@bufbuild/buf)")
    result = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
