"""BatchService on a real tiny mesh (router + decode worker processes, SQLite on disk): results
equal Generate's, paging and streaming, cancel, tenant isolation, validation, and per-tenant
limits answered with RESOURCE_EXHAUSTED and a retry-after-ms trailer."""

import json
import threading
import time

import grpc
import pytest

from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import batch_pb2, batch_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc

GREEDY = common_pb2.SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    run = tmp_path_factory.mktemp("batch")
    limits = run / "tenants.json"
    limits.write_text(json.dumps({"tenants": {"limited": {"max_concurrent": 1},
                                              "metered": {"tokens_per_s": 20, "burst_s": 1}}}))
    spec = MeshSpec(num_prefill=0, num_decode=1, router_port=0, model="tiny", profile="round_robin",
                    kv_transports="grpc", num_blocks=256, torch_threads=1, max_model_len=512, metrics=False,
                    extra_env=(("PDMESH_TENANT_LIMITS", str(limits)),))
    m = start_mesh(spec, str(run), progress=lambda *_: None)
    channel = grpc.insecure_channel(m.router_address)
    m.batch = batch_pb2_grpc.BatchServiceStub(channel)
    m.router = router_pb2_grpc.RouterServiceStub(channel)
    yield m
    channel.close()
    m.stop()


def item(custom_id, prompt, max_tokens=6, **kw):
    request = router_pb2.GenerateRequest(max_tokens=max_tokens, sampling=GREEDY, ignore_eos=True, **kw)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return batch_pb2.BatchItem(custom_id=custom_id, request=request)


def create(mesh, tenant, items, **metadata):
    return mesh.batch.CreateBatchJob(batch_pb2.CreateBatchJobRequest(tenant_id=tenant, items=items,
                                                                     metadata=metadata), timeout=30).job


def wait_ended(mesh, tenant, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = mesh.batch.GetBatchJob(batch_pb2.GetBatchJobRequest(tenant_id=tenant, job_id=job_id), timeout=10).job
        if job.status not in (batch_pb2.BATCH_JOB_STATUS_QUEUED, batch_pb2.BATCH_JOB_STATUS_RUNNING):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not end in {timeout}s")


def all_results(mesh, tenant, job_id, page_size=0):
    results, token = [], ""
    while True:
        page = mesh.batch.ListBatchResults(batch_pb2.ListBatchResultsRequest(
            tenant_id=tenant, job_id=job_id, page_size=page_size, page_token=token), timeout=10)
        results += page.results
        token = page.next_page_token
        if not token:
            return results


def generate_tokens(mesh, request):
    return [t for m in mesh.router.Generate(request, timeout=60) for t in m.token_ids]


def test_job_results_equal_generate_for_the_same_greedy_prompts(mesh):
    items = [item("text-a", "The capital of France is"), item("ids-b", [2, 651, 6037, 529, 7001, 563]),
             item("long-c", [2] + list(range(1000, 1070)), max_tokens=9), item("text-d", "Once upon a time", 1)]
    job = create(mesh, "acme", items, purpose="test")
    assert job.status == batch_pb2.BATCH_JOB_STATUS_QUEUED and job.total_items == 4 and job.job_id
    streamed = [m.result for m in mesh.batch.StreamBatchResults(
        batch_pb2.StreamBatchResultsRequest(tenant_id="acme", job_id=job.job_id), timeout=120)]
    ended = wait_ended(mesh, "acme", job.job_id)
    assert ended.status == batch_pb2.BATCH_JOB_STATUS_COMPLETED
    assert (ended.completed_items, ended.failed_items, ended.progress) == (4, 0, 1.0)
    assert ended.metadata == {"purpose": "test"} and ended.started_unix_ms >= ended.created_unix_ms > 0
    assert ended.ended_unix_ms >= ended.started_unix_ms
    assert sorted(r.custom_id for r in streamed) == sorted(i.custom_id for i in items)
    by_id = {r.custom_id: r for r in streamed}
    for it in items:
        result = by_id[it.custom_id]
        expected = generate_tokens(mesh, it.request)
        assert list(result.token_ids) == expected, it.custom_id
        assert result.error_code == 0 and result.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert result.usage.completion_tokens == it.request.max_tokens and result.usage.prompt_tokens > 0
        assert result.item_index == items.index(it)
    assert by_id["text-a"].text, "the text of the tokens is stored too"


def test_results_page_and_stream_resumes_without_duplicates(mesh):
    items = [item(f"p{i}", [2, 300 + i, 400], max_tokens=3) for i in range(7)]
    job = create(mesh, "pager", items)
    wait_ended(mesh, "pager", job.job_id)
    pages, token = [], ""
    while True:
        page = mesh.batch.ListBatchResults(batch_pb2.ListBatchResultsRequest(
            tenant_id="pager", job_id=job.job_id, page_size=3, page_token=token), timeout=10)
        pages.append([r.custom_id for r in page.results])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sorted(c for p in pages for c in p) == sorted(i.custom_id for i in items)
    stream = mesh.batch.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(tenant_id="pager", job_id=job.job_id),
                                           timeout=30)
    first_two = [next(stream), next(stream)]
    stream.cancel()
    rest = list(mesh.batch.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(
        tenant_id="pager", job_id=job.job_id, page_token=first_two[-1].resume_token), timeout=30))
    assert [m.result.custom_id for m in first_two + rest] == [c for p in pages for c in p]
    with pytest.raises(grpc.RpcError) as err:
        mesh.batch.ListBatchResults(batch_pb2.ListBatchResultsRequest(tenant_id="pager", job_id=job.job_id,
                                                                      page_token="garbage"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.value.details()


def test_cancel_stops_the_job_and_keeps_results_stored_before(mesh):
    items = [item(f"c{i}", [2, 500 + i, 600], max_tokens=120) for i in range(40)]
    job = create(mesh, "canceller", items)
    stream = mesh.batch.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(tenant_id="canceller",
                                                                               job_id=job.job_id), timeout=120)
    first = next(stream)
    cancelled = mesh.batch.CancelBatchJob(batch_pb2.CancelBatchJobRequest(tenant_id="canceller", job_id=job.job_id),
                                          timeout=30).job
    rest = list(stream)  # the stream ends once the job has ended
    assert cancelled.status == batch_pb2.BATCH_JOB_STATUS_CANCELLED and cancelled.ended_unix_ms > 0
    done = cancelled.completed_items + cancelled.failed_items
    assert 1 <= done < 40 and len([first, *rest]) == done
    time.sleep(1.0)
    later = mesh.batch.GetBatchJob(batch_pb2.GetBatchJobRequest(tenant_id="canceller", job_id=job.job_id)).job
    assert later.status == batch_pb2.BATCH_JOB_STATUS_CANCELLED
    assert later.completed_items + later.failed_items == done, "nothing runs after cancel"
    again = mesh.batch.CancelBatchJob(batch_pb2.CancelBatchJobRequest(tenant_id="canceller", job_id=job.job_id))
    assert again.job.status == batch_pb2.BATCH_JOB_STATUS_CANCELLED
    small = create(mesh, "canceller", [item("x", [2, 7, 8], 2)])
    wait_ended(mesh, "canceller", small.job_id)
    with pytest.raises(grpc.RpcError) as err:
        mesh.batch.CancelBatchJob(batch_pb2.CancelBatchJobRequest(tenant_id="canceller", job_id=small.job_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "completed" in err.value.details()


def test_another_tenant_cannot_see_the_job(mesh):
    job = create(mesh, "owner", [item("secret", [2, 9, 10], 2)])
    calls = {
        "get": lambda t, j: mesh.batch.GetBatchJob(batch_pb2.GetBatchJobRequest(tenant_id=t, job_id=j), timeout=10),
        "cancel": lambda t, j: mesh.batch.CancelBatchJob(batch_pb2.CancelBatchJobRequest(tenant_id=t, job_id=j),
                                                         timeout=10),
        "results": lambda t, j: mesh.batch.ListBatchResults(
            batch_pb2.ListBatchResultsRequest(tenant_id=t, job_id=j), timeout=10),
        "stream": lambda t, j: list(mesh.batch.StreamBatchResults(
            batch_pb2.StreamBatchResultsRequest(tenant_id=t, job_id=j), timeout=10)),
    }
    for name, call in calls.items():
        details = []
        for job_id in (job.job_id, "batch_doesnotexist000000"):
            with pytest.raises(grpc.RpcError) as err:
                call("intruder", job_id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, name
            details.append(err.value.details().replace(job_id, "ID"))
        assert details[0] == details[1], f"{name}: a foreign job must look exactly like a missing one"
    listed = mesh.batch.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant_id="intruder"), timeout=10)
    assert not listed.jobs
    assert wait_ended(mesh, "owner", job.job_id).completed_items == 1, "the owner's job was not touched"


def test_a_retried_create_with_an_idempotency_key_returns_the_same_job(mesh):
    items = [item(f"k{i}", [2, 40 + i, 41], 2) for i in range(3)]
    request = batch_pb2.CreateBatchJobRequest(tenant_id="retry", items=items, idempotency_key="nightly-2026-11-23")
    first = mesh.batch.CreateBatchJob(request, timeout=30).job
    again = mesh.batch.CreateBatchJob(request, timeout=30).job  # as a client whose answer got lost would
    assert again.job_id == first.job_id
    assert wait_ended(mesh, "retry", first.job_id).completed_items == 3
    assert mesh.batch.CreateBatchJob(request, timeout=30).job.job_id == first.job_id  # also once it ended
    assert len(mesh.batch.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant_id="retry"), timeout=10).jobs) == 1
    assert len(all_results(mesh, "retry", first.job_id)) == 3, "every item ran once"
    request.items.append(item("extra", [2, 3], 2))
    with pytest.raises(grpc.RpcError) as err:
        mesh.batch.CreateBatchJob(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and first.job_id in err.value.details()


def test_list_jobs_pages_newest_first(mesh):
    ids = [create(mesh, "lister", [item("only", [2, 11], 1)]).job_id for _ in range(3)]
    first = mesh.batch.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant_id="lister", page_size=2), timeout=10)
    second = mesh.batch.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant_id="lister", page_size=2,
                                                                     page_token=first.next_page_token), timeout=10)
    assert [j.job_id for j in first.jobs] + [j.job_id for j in second.jobs] == ids[::-1]
    assert first.next_page_token and not second.next_page_token


@pytest.mark.parametrize("items, where", [
    ([], "at least one item"),
    ([item("a", [2, 5], 2), item("a", [2, 6], 2)], "items[1] (custom_id 'a'): duplicate custom_id"),
    ([item("ok", [2, 5], 2), item("bad", [2, 5], 0)], "items[1] (custom_id 'bad'): "),
    ([item("", [2, 5], 2)], "items[0] (custom_id ''): custom_id must be"),
    ([item("p", [2, 5], 2, priority=common_pb2.PRIORITY_CLASS_INTERACTIVE)], "items[0] (custom_id 'p'): priority"),
    ([item("t", [2, 5], 2, tenant_id="someone-else")], "items[0] (custom_id 't'): tenant_id"),
    ([batch_pb2.BatchItem(custom_id="empty")], "items[0] (custom_id 'empty'): prompt is missing"),
], ids=["empty", "duplicate", "max-tokens", "no-custom-id", "interactive", "foreign-tenant", "no-prompt"])
def test_malformed_jobs_are_invalid_argument_naming_the_item(mesh, items, where):
    with pytest.raises(grpc.RpcError) as err:
        create(mesh, "validator", items)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert where in err.value.details()
    listed = mesh.batch.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant_id="validator"), timeout=10)
    assert not listed.jobs, "a rejected job stores nothing"


def _trailer(err, key):
    return dict(err.trailing_metadata() or ()).get(key)


def test_tenant_concurrency_limit_is_resource_exhausted_with_retry_after(mesh):
    long_request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[2, 3, 4]), max_tokens=400,
                                              ignore_eos=True, tenant_id="limited")
    stream = mesh.router.Generate(long_request, timeout=120)
    next(stream)  # admitted and running
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(mesh.router.Generate(router_pb2.GenerateRequest(text="hi", max_tokens=2, tenant_id="limited"),
                                      timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limited" in err.value.details() and "1 concurrent requests" in err.value.details()
        assert int(_trailer(err.value, "retry-after-ms")) > 0
        other = list(mesh.router.Generate(router_pb2.GenerateRequest(text="hi", max_tokens=2, tenant_id="free"),
                                          timeout=30))
        assert other[-1].finish_reason, "other tenants are not limited"
    finally:
        stream.cancel()


def test_tenant_token_rate_is_resource_exhausted_until_the_hint(mesh):
    request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[2, 3, 4]), max_tokens=57,
                                         ignore_eos=True, tenant_id="metered")  # 60 tokens: 40 over a 20-token bucket
    first = mesh.router.Generate(request, timeout=60)
    next(first)  # accepted and charged
    with pytest.raises(grpc.RpcError) as err:
        list(mesh.router.Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens/s" in err.value.details()
    retry_ms = int(_trailer(err.value, "retry-after-ms"))
    assert 0 < retry_ms <= 2100, "the debt (40 tokens at 20/s) is paid within 2 s"
    time.sleep(retry_ms / 1000 + 0.1)
    assert list(mesh.router.Generate(request, timeout=30))[-1].finish_reason
    assert list(first)[-1].finish_reason


def test_batch_job_of_a_limited_tenant_waits_out_its_limits_and_completes(mesh):
    job = create(mesh, "limited", [item(f"l{i}", [2, 20 + i], 4) for i in range(4)])
    ended = wait_ended(mesh, "limited", job.job_id)
    assert (ended.status, ended.completed_items, ended.failed_items) == (batch_pb2.BATCH_JOB_STATUS_COMPLETED, 4, 0)


def test_interactive_is_not_queued_behind_a_running_batch_backlog(mesh):
    job = create(mesh, "backlog", [item(f"b{i}", [2, 700 + i, 9], 60) for i in range(30)])
    time.sleep(0.5)
    messages = list(mesh.router.Generate(router_pb2.GenerateRequest(text="Quick question", max_tokens=3,
                                                                    tenant_id="live"), timeout=60))
    running = mesh.batch.GetBatchJob(batch_pb2.GetBatchJobRequest(tenant_id="backlog", job_id=job.job_id)).job
    mesh.batch.CancelBatchJob(batch_pb2.CancelBatchJobRequest(tenant_id="backlog", job_id=job.job_id))
    assert running.status == batch_pb2.BATCH_JOB_STATUS_RUNNING and running.completed_items < 30
    assert messages[-1].timings.queue_ms < 5.0, "an interactive request dispatches at once"


def test_many_streams_follow_one_job(mesh):
    job = create(mesh, "followers", [item(f"f{i}", [2, 800 + i], 5) for i in range(5)])
    seen = [None] * 3

    def follow(k):
        seen[k] = [m.result.custom_id for m in mesh.batch.StreamBatchResults(
            batch_pb2.StreamBatchResultsRequest(tenant_id="followers", job_id=job.job_id), timeout=60)]
    threads = [threading.Thread(target=follow, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[0] == seen[1] == seen[2] and sorted(seen[0]) == [f"f{i}" for i in range(5)]
