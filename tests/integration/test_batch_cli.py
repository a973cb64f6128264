"""`pdmesh batch` against a real tiny mesh: submit a JSONL file and wait with a progress bar,
results file in input order, status, list, results, cancel; a bad line is refused before submit."""

import json
import subprocess
import sys

import pytest

from pdmesh.launcher import ROOT, MeshSpec, start_mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    spec = MeshSpec(num_prefill=0, num_decode=1, router_port=0, model="tiny", profile="round_robin",
                    kv_transports="grpc", num_blocks=256, torch_threads=1, max_model_len=512, metrics=False)
    m = start_mesh(spec, str(tmp_path_factory.mktemp("batch-cli")), progress=lambda *_: None)
    yield m
    m.stop()


def pdmesh(mesh, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pdmesh", "batch", *args, "--router", mesh.router_address,
                           "--tenant", "cli"], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_submit_wait_out_then_status_list_results(mesh, tmp_path):
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": f"Question number {i}:", "max_tokens": 4, "temperature": 0, "ignore_eos": True}}
             for i in range(5)] + [{"custom_id": "flat", "prompt": [2, 10, 11], "max_tokens": 2, "ignore_eos": True}]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "out.jsonl"
    run = pdmesh(mesh, "submit", str(source), "--wait", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "6/6" in run.stderr, "tqdm progress bar on stderr"
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["completed"] == 6
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [x["custom_id"] for x in lines], "input order"
    assert all(r["error"] is None and r["response"]["finish_reason"] == "length" for r in results)
    assert [len(r["response"]["token_ids"]) for r in results] == [4] * 5 + [2]

    status = pdmesh(mesh, "status", summary["job_id"])
    assert status.returncode == 0 and json.loads(status.stdout)["completed"] == 6
    listed = pdmesh(mesh, "list")
    assert summary["job_id"] in listed.stdout and "completed" in listed.stdout
    again = tmp_path / "again.jsonl"
    fetched = pdmesh(mesh, "results", summary["job_id"], "--out", str(again))
    assert fetched.returncode == 0 and again.read_text() == out.read_text()


def test_submit_without_wait_prints_the_job_id_then_cancel(mesh, tmp_path):
    source = tmp_path / "long.jsonl"
    source.write_text("\n".join(json.dumps({"custom_id": f"l{i}", "prompt": [2, 50 + i], "max_tokens": 200,
                                            "ignore_eos": True}) for i in range(30)))
    run = pdmesh(mesh, "submit", str(source))
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    cancel = pdmesh(mesh, "cancel", job_id)
    assert cancel.returncode == 0 and json.loads(cancel.stdout)["status"] == "cancelled"


def test_bad_line_is_refused_before_anything_is_submitted(mesh, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"custom_id": "a", "prompt": "ok"}\n{"custom_id": "b"}\n')
    run = pdmesh(mesh, "submit", str(source))
    assert run.returncode == 2 and "line 2" in run.stderr and "prompt" in run.stderr
    unknown = pdmesh(mesh, "status", "batch_nope")
    assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr
