"""A router killed with SIGKILL in the middle of a batch job, and a new router started on the same
workers and the same SQLite file, finishes the job: every custom_id has exactly one result, none
is lost, results stored before the kill are unchanged, and the re-run items give the tokens
Generate gives."""

import json
import signal
import subprocess
import sys
import time

import grpc

from pdmesh.launcher import ROOT, MeshSpec, start_mesh
from pdmesh.v1 import batch_pb2, batch_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc

N_ITEMS, MAX_TOKENS = 16, 80


def _items():
    return [batch_pb2.BatchItem(custom_id=f"item-{i:02d}", request=router_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=[2, 900 + i, 901, 902]), max_tokens=MAX_TOKENS, ignore_eos=True,
        sampling=common_pb2.SamplingParams(temperature=0.0))) for i in range(N_ITEMS)]


def _start_router(mesh, db, ready):
    decode = ",".join(p.info["address"] for p in mesh.workers("decode"))
    prefill = ",".join(p.info["address"] for p in mesh.workers("prefill"))
    router = subprocess.Popen([sys.executable, "-m", "services.router", "--port", "0", "--decode", decode,
                               "--prefill", prefill, "--profile", "round_robin", "--max-model-len", "512",
                               "--batch-db", str(db), "--batch-job-concurrency", "4", "--ready-file", str(ready)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert router.poll() is None, "the new router exited"
        assert time.monotonic() < deadline, "the new router never got ready"
        time.sleep(0.1)
    return router, json.loads(ready.read_text())["address"]


def _results(stub, job_id):
    results, token = [], ""
    while True:
        page = stub.ListBatchResults(batch_pb2.ListBatchResultsRequest(tenant_id="durable", job_id=job_id,
                                                                       page_token=token, page_size=5), timeout=10)
        results += page.results
        token = page.next_page_token
        if not token:
            return results


def test_router_sigkill_mid_job_then_restart_finishes_every_item_exactly_once(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    spec = MeshSpec(num_prefill=1, num_decode=1, router_port=0, model="tiny", profile="round_robin",
                    kv_transports="grpc", num_blocks=256, torch_threads=1, max_model_len=512, metrics=False,
                    batch_db=str(db), extra_env=(("PDMESH_BATCH_JOB_CONCURRENCY", "4"),))  # in waves: the kill lands mid-job
    mesh = start_mesh(spec, str(tmp_path / "run"), progress=lambda *_: None)
    router2 = None
    try:
        router = mesh.process("router")
        with grpc.insecure_channel(mesh.router_address) as channel:
            stub = batch_pb2_grpc.BatchServiceStub(channel)
            job = stub.CreateBatchJob(batch_pb2.CreateBatchJobRequest(tenant_id="durable", items=_items())).job
            stream = stub.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(tenant_id="durable",
                                                                                 job_id=job.job_id), timeout=120)
            before = [next(stream).result for _ in range(3)]
            router.popen.send_signal(signal.SIGKILL)
            router.popen.wait(timeout=10)
            stream.cancel()
        router2, address = _start_router(mesh, db, tmp_path / "router2.json")
        with grpc.insecure_channel(address) as channel:
            stub = batch_pb2_grpc.BatchServiceStub(channel)
            at_restart = stub.GetBatchJob(batch_pb2.GetBatchJobRequest(tenant_id="durable", job_id=job.job_id)).job
            streamed = [m.result for m in stub.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(
                tenant_id="durable", job_id=job.job_id), timeout=180)]
            final = stub.GetBatchJob(batch_pb2.GetBatchJobRequest(tenant_id="durable", job_id=job.job_id)).job
            paged = _results(stub, job.job_id)
            expected = {it.custom_id: [t for m in router_pb2_grpc.RouterServiceStub(channel).Generate(
                it.request, timeout=60) for t in m.token_ids] for it in _items()}
    finally:
        if router2 is not None:
            router2.send_signal(signal.SIGTERM)
            router2.wait(timeout=30)
        mesh.stop()
    assert at_restart.completed_items < N_ITEMS, "the kill must land mid-job for this test to mean anything"
    assert final.status == batch_pb2.BATCH_JOB_STATUS_COMPLETED
    assert (final.completed_items, final.failed_items) == (N_ITEMS, 0)
    ids = [r.custom_id for r in streamed]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids)), "exactly one result per custom_id"
    assert [r.custom_id for r in paged] == ids
    by_id = {r.custom_id: r for r in streamed}
    for r in before:
        assert by_id[r.custom_id] == r, "a result stored before the kill is never replaced"
    for custom_id, tokens in expected.items():
        assert list(by_id[custom_id].token_ids) == tokens, custom_id
