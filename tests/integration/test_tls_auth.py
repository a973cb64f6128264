"""Mutual TLS between every process and bearer-token auth on the router, on a real tiny-model mesh
started with `pdmesh certs`' certificates: the KV pull (decode -> prefill over gRPC), the router's
worker channels and state streams, and the client all run over mTLS; clients without a valid
certificate are refused; API keys carry tenants."""

import json
import subprocess
import sys

import grpc
import httpx
import pytest

from pdmesh.certs import make_certs
from pdmesh.launcher import ROOT, MeshSpec, start_mesh
from pdmesh.v1 import (batch_pb2, batch_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc, worker_state_pb2,
                       worker_state_pb2_grpc)

PROMPT = [2] + list(range(4000, 4040))
KEYS = {"sk-team-a": "team-a", "sk-no-tenant": ""}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    certs = make_certs(root / "certs")
    make_certs(root / "other-ca")  # a CA the mesh does not trust
    (root / "keys.json").write_text(json.dumps(KEYS))
    spec = MeshSpec(num_prefill=1, num_decode=1, router_port=0, model="tiny", profile="round_robin",
                    kv_transports="grpc", num_blocks=128, torch_threads=1, max_model_len=512,
                    tls_dir=str(root / "certs"), api_keys_file=str(root / "keys.json"))
    m = start_mesh(spec, str(root / "run"), progress=lambda *_: None)
    m.certs, m.other = certs, root / "other-ca"
    yield m
    m.stop(grace_s=5)


def credentials(cert=None, key=None, ca=None):
    read = lambda p: p.read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def client_credentials(mesh):
    c = mesh.certs
    return credentials(c["client.pem"], c["client.key"], c["ca.pem"])


def generate(channel, metadata=(("authorization", "Bearer sk-team-a"),), tenant="", max_tokens=8):
    request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=max_tokens,
                                         ignore_eos=True, tenant_id=tenant)
    return list(router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=30, metadata=metadata))


def test_disaggregated_request_end_to_end_over_mutual_tls(mesh):
    with grpc.secure_channel(mesh.router_address, client_credentials(mesh)) as channel:
        messages = generate(channel)
    assert sum(len(m.token_ids) for m in messages) == 8
    last = messages[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    # Prefilled on the prefill worker, KV pulled over gRPC by the decode worker: every hop was mTLS.
    assert last.placement.prefill_worker_id == "prefill-0" and last.placement.kv_transport == "grpc"




@pytest.mark.parametrize("client", ["plaintext", "no_client_cert", "cert_from_another_ca"])
def test_a_client_without_a_valid_certificate_is_refused_everywhere(mesh, client):
    c, o = mesh.certs, mesh.other
    factories = {
        "plaintext": lambda a: grpc.insecure_channel(a),
        "no_client_cert": lambda a: grpc.secure_channel(a, credentials(ca=c["ca.pem"])),
        "cert_from_another_ca": lambda a: grpc.secure_channel(
            a, credentials(o / "client.pem", o / "client.key", c["ca.pem"])),
    }
    addresses = [mesh.router_address, *(p.info["address"] for p in mesh.processes if p.name != "router")]
    for address in addresses:
        with factories[client](address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                if address == mesh.router_address:
                    generate(channel)
                else:
                    next(worker_state_pb2_grpc.WorkerStateServiceStub(channel).StreamState(
                        worker_state_pb2.StreamStateRequest(), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (address, info.value)


@pytest.mark.parametrize("metadata, fragment", [((), "missing API key"),
                                                ((("authorization", "Bearer sk-wrong"),), "wrong API key"),
                                                ((("authorization", "sk-team-a"),), "missing API key")])
def test_missing_or_wrong_token_is_unauthenticated_with_what_to_send(mesh, metadata, fragment):
    with grpc.secure_channel(mesh.router_address, client_credentials(mesh)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            generate(channel, metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fragment in info.value.details() and "Authorization: Bearer <key>" in info.value.details()


def test_tenant_comes_from_the_token(mesh):
    with grpc.secure_channel(mesh.router_address, client_credentials(mesh)) as channel:
        assert generate(channel, tenant="team-a", max_tokens=1)  # the key's own tenant: fine
        with pytest.raises(grpc.RpcError) as info:
            generate(channel, tenant="team-b", max_tokens=1)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "team-a" in info.value.details()
        # A key without a tenant lets the request name its own.
        assert generate(channel, (("authorization", "Bearer sk-no-tenant"),), tenant="team-b", max_tokens=1)


def test_batch_service_uses_the_same_keys_and_tenants(mesh):
    team_a = (("authorization", "Bearer sk-team-a"),)
    with grpc.secure_channel(mesh.router_address, client_credentials(mesh)) as channel:
        batch = batch_pb2_grpc.BatchServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            batch.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant_id="team-a"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            next(batch.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(job_id="batch_x"), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            batch.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant_id="team-b"), timeout=10, metadata=team_a)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "team-a" in info.value.details()
        item = batch_pb2.BatchItem(custom_id="q", request=router_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=1))
        job = batch.CreateBatchJob(batch_pb2.CreateBatchJobRequest(items=[item]), timeout=30, metadata=team_a).job
        assert job.tenant_id == "team-a", "the key's tenant owns the job"


def test_http_front_uses_the_same_keys_and_tenants(mesh):
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    with httpx.Client(base_url=mesh.http_address, timeout=30) as http:
        assert http.post("/v1/completions", json=body).status_code == 401
        ok = http.post("/v1/completions", json=body, headers={"authorization": "Bearer sk-team-a"})
        assert ok.status_code == 200, ok.text
        other = http.post("/v1/completions", json=body,
                          headers={"authorization": "Bearer sk-team-a", "x-pdmesh-tenant": "team-b"})
        assert other.status_code == 403 and "team-a" in other.json()["error"]["message"]


def test_pdmesh_generate_over_mutual_tls(mesh):
    c = mesh.certs
    result = subprocess.run([sys.executable, "-m", "pdmesh", "generate", "Hello", "--max-tokens", "3", "--quiet",
                             "--router", mesh.router_address, "--api-key", "sk-team-a", "--tls-cert",
                             str(c["client.pem"]), "--tls-key", str(c["client.key"]), "--tls-ca", str(c["ca.pem"])],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "3 tokens" in result.stderr


def test_pdmesh_batch_over_mutual_tls_with_a_key(mesh, tmp_path):
    c = mesh.certs
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "q", "prompt": PROMPT, "max_tokens": 2, "ignore_eos": True}) + "\n")
    result = subprocess.run([sys.executable, "-m", "pdmesh", "batch", "submit", str(source), "--wait", "--quiet",
                             "--router", mesh.router_address, "--api-key", "sk-team-a", "--tls-cert",
                             str(c["client.pem"]), "--tls-key", str(c["client.key"]), "--tls-ca", str(c["ca.pem"])],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["tenant_id"] == "team-a"
