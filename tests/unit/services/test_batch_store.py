"""The batch store on a real SQLite file, and the runner's contract with the request path."""

import asyncio
import sqlite3

import pytest

from pdmesh.v1 import common_pb2, router_pb2
from services.common import metrics
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.router.batch.runner import BatchRunner
from services.router.batch.store import (CANCELLED, COMPLETED, QUEUED, RUNNING, AsyncBatchStore, BatchStore,
                                         ItemResult, decode_cursor, encode_cursor)


def _items(n):
    return [(f"c{i}", router_pb2.GenerateRequest(text=f"prompt {i}", max_tokens=2).SerializeToString())
            for i in range(n)]


@pytest.fixture
def store(tmp_path):
    s = BatchStore(str(tmp_path / "jobs.sqlite3"))
    yield s
    s.close()


def test_first_result_wins_and_counts_once(store):
    job = store.create_job("t", _items(3), {"k": "v"})
    assert (job.status, job.total_items, job.metadata) == (QUEUED, 3, {"k": "v"})
    assert not store.put_result(job.job_id, ItemResult("c0", 0, text="early")), "not stored before RUNNING"
    assert store.mark_running(job.job_id)
    assert store.put_result(job.job_id, ItemResult("c0", 0, text="first"))
    assert not store.put_result(job.job_id, ItemResult("c0", 0, text="second"))
    assert store.put_result(job.job_id, ItemResult("c1", 1, error_code=3, error_message="bad"))
    job = store.job(job.job_id)
    assert (job.status, job.completed_items, job.failed_items) == (RUNNING, 1, 1)
    assert [r.text for r in store.results("t", job.job_id)] == ["first", ""]
    assert [p.custom_id for p in store.pending_items(job.job_id)] == ["c2"]


def test_results_survive_reopening_and_pending_items_resume(tmp_path):
    path = str(tmp_path / "jobs.sqlite3")
    store = BatchStore(path)
    job = store.create_job("t", _items(4), {})
    store.mark_running(job.job_id)
    store.put_result(job.job_id, ItemResult("c2", 2, token_ids=(5, 6), text="x"))
    store.close()  # as if the process died here
    store = BatchStore(path)
    assert [j.job_id for j in store.unfinished_jobs()] == [job.job_id]
    assert [p.item_index for p in store.pending_items(job.job_id)] == [0, 1, 3]
    assert store.results("t", job.job_id)[0].token_ids == (5, 6)
    assert router_pb2.GenerateRequest.FromString(store.pending_items(job.job_id)[0].request).text == "prompt 0"
    store.close()


def test_foreign_tenant_gets_not_found_like_a_missing_job(store):
    job = store.create_job("owner", _items(1), {})
    with pytest.raises(NotFound) as foreign:
        store.get_job("intruder", job.job_id)
    with pytest.raises(NotFound) as missing:
        store.get_job("intruder", "batch_missing")
    assert str(foreign.value).replace(job.job_id, "X") == str(missing.value).replace("batch_missing", "X")
    for call in (lambda: store.results("intruder", job.job_id), lambda: store.cancel_job("intruder", job.job_id)):
        with pytest.raises(NotFound):
            call()
    assert store.list_jobs("intruder", 10) == ([], None)


def test_cancel_then_no_more_results_and_completed_cannot_be_cancelled(store):
    job = store.create_job("t", _items(2), {})
    store.mark_running(job.job_id)
    assert store.cancel_job("t", job.job_id).status == CANCELLED
    assert not store.put_result(job.job_id, ItemResult("c0", 0)), "a cancelled job takes no results"
    assert not store.mark_running(job.job_id)
    other = store.create_job("t", _items(1), {})
    store.mark_running(other.job_id)
    store.put_result(other.job_id, ItemResult("c0", 0))
    assert store.finish_job(other.job_id).status == COMPLETED
    with pytest.raises(FailedPrecondition, match="already ended"):
        store.cancel_job("t", other.job_id)


def test_list_jobs_pages_newest_first(store):
    ids = [store.create_job("t", _items(1), {}).job_id for _ in range(5)]
    page, cursor = store.list_jobs("t", 2)
    seen = [j.job_id for j in page]
    while cursor is not None:
        page, cursor = store.list_jobs("t", 2, cursor)
        seen += [j.job_id for j in page]
    assert seen == ids[::-1]


def test_duplicate_custom_id_is_refused_by_the_schema_too(store):
    with pytest.raises(sqlite3.IntegrityError):
        store.create_job("t", [("same", b""), ("same", b"")], {})
    assert store.list_jobs("t", 10) == ([], None), "nothing of a refused job is kept"


def test_second_router_on_the_same_file_is_refused(tmp_path, store):
    with pytest.raises(RuntimeError, match="in use by another router"):
        BatchStore(store.path)


def test_newer_schema_is_refused_with_a_clear_message(tmp_path):
    path = str(tmp_path / "new.sqlite3")
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        BatchStore(path)


@pytest.mark.parametrize("token", ["", "garbage", encode_cursor("j", 5)])
def test_page_tokens_of_another_kind_or_garbage_are_invalid(token):
    with pytest.raises(InvalidArgument, match="page_token"):
        decode_cursor("r", token)
    assert decode_cursor("r", encode_cursor("r", 42)) == 42


def _response(tokens, final=False):
    message = router_pb2.GenerateResponse(token_ids=tokens, text_delta="".join(f"<{t}>" for t in tokens))
    if final:
        message.finish_reason = common_pb2.FINISH_REASON_LENGTH
        message.usage.CopyFrom(common_pb2.Usage(prompt_tokens=3, completion_tokens=2))
    return message


def test_runner_waits_out_refusals_records_failures_and_completes(tmp_path):
    calls = []

    async def generate(request):
        calls.append((request.request_id, request.priority, request.tenant_id))
        attempt = sum(1 for c in calls if c[0] == request.request_id)
        if request.text == "prompt 0" and attempt == 1:
            raise ResourceExhausted("busy", retry_after_s=0.01)
        if request.text == "prompt 1" and attempt <= 2:
            raise Unavailable("worker restarting")
        if request.text == "prompt 2":
            raise InvalidArgument("prompt too long")
        yield _response([7])
        yield _response([8], final=True)

    async def scenario():
        store = AsyncBatchStore(BatchStore(str(tmp_path / "jobs.sqlite3")))
        runner = BatchRunner(store, generate, code_of=lambda exc: 3 if isinstance(exc, InvalidArgument) else 13,
                             job_concurrency=2, max_attempts=5, max_backoff_s=0.01)
        job = await store.create_job("acme", _items(4), {})
        runner.submit(job.job_id)
        while (await store.job(job.job_id)).status != COMPLETED:
            await asyncio.sleep(0.01)
        results = {r.custom_id: r for r in await store.results("acme", job.job_id)}
        final = await store.job(job.job_id)
        await runner.close()
        store.close()
        return final, results
    counted = lambda: (metrics.BATCH_ITEMS.labels("ok")._value.get(), metrics.BATCH_ITEMS.labels("failed")._value.get(),  # noqa: E731
                       metrics.BATCH_TOKENS.labels("completion")._value.get())
    before = counted()
    final, results = asyncio.run(scenario())
    assert [a - b for a, b in zip(counted(), before)] == [3, 1, 6]  # /metrics: items by outcome, tokens
    assert (final.completed_items, final.failed_items) == (3, 1)
    assert results["c0"].token_ids == (7, 8) and results["c0"].text == "<7><8>" and results["c0"].completion_tokens == 2
    assert results["c2"].error_code == 3 and "too long" in results["c2"].error_message
    assert all(p == common_pb2.PRIORITY_CLASS_BATCH and t == "acme" for _, p, t in calls)
    assert sum(1 for c in calls if c[0].endswith("-1")) == 3, "unavailable is retried, then succeeds"


def test_runner_does_not_fail_items_while_the_pools_are_down(tmp_path):
    pools = {"up": False}
    calls = []

    async def generate(request):
        calls.append(1)
        if len(calls) == 6:
            pools["up"] = True
        if not pools["up"]:
            raise Unavailable("no decode worker is reachable")
        yield _response([1], final=True)

    async def scenario():
        store = AsyncBatchStore(BatchStore(str(tmp_path / "jobs.sqlite3")))
        runner = BatchRunner(store, generate, code_of=lambda exc: 14, job_concurrency=1, max_attempts=2,
                             max_backoff_s=0.01, pools_up=lambda: pools["up"])
        job = await store.create_job("t", _items(1), {})
        runner.submit(job.job_id)
        while (await store.job(job.job_id)).status != COMPLETED:
            await asyncio.sleep(0.01)
        final = await store.job(job.job_id)
        await runner.close()
        store.close()
        return final
    final = asyncio.run(scenario())
    assert (final.completed_items, final.failed_items) == (1, 0) and len(calls) == 6, "5 refusals while down, not failed after 2"


def test_a_repeated_idempotency_key_returns_the_first_job(store):
    first = store.create_job("acme", _items(2), {"k": "v"}, idempotency_key="upload-7")
    again = store.create_job("acme", _items(2), {"k": "v"}, idempotency_key="upload-7")
    assert again.job_id == first.job_id and again.total_items == 2
    other_tenant = store.create_job("globex", _items(2), {"k": "v"}, idempotency_key="upload-7")
    unkeyed = [store.create_job("acme", _items(2), {}).job_id for _ in range(2)]
    assert other_tenant.job_id != first.job_id and unkeyed[0] != unkeyed[1]
    assert len(store.list_jobs("acme", 10)[0]) == 3
    assert len(store.pending_items(first.job_id)) == 2, "no items stored twice"
    with pytest.raises(InvalidArgument, match="upload-7.*other items"):
        store.create_job("acme", _items(3), {"k": "v"}, idempotency_key="upload-7")
    with pytest.raises(InvalidArgument, match="other items or metadata"):
        store.create_job("acme", _items(2), {"k": "w"}, idempotency_key="upload-7")


def test_a_version_1_store_is_upgraded_in_place(tmp_path):
    from services.router.batch import store as store_module
    path = str(tmp_path / "old.sqlite3")
    db = sqlite3.connect(path)
    db.executescript(store_module._MIGRATIONS[1] + "PRAGMA user_version = 1;")
    db.execute("INSERT INTO jobs (job_id, tenant_id, status, total_items, metadata, created_ms) "
               "VALUES ('batch_old', 'acme', 'queued', 0, '{}', 1)")
    db.commit()
    db.close()
    s = BatchStore(path)
    assert s.job("batch_old").tenant_id == "acme"
    keyed = s.create_job("acme", _items(1), {}, idempotency_key="k")
    assert s.create_job("acme", _items(1), {}, idempotency_key="k").job_id == keyed.job_id
    s.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION
