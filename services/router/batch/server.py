"""BatchService servicer: proto <-> the store and runner; maps domain errors to status codes once
(services.common.errors). Tenant identity is the request's `tenant_id` field, checked against the
caller's API key exactly as on Generate (services/router/auth.py); a job of another tenant is
answered exactly like a job that does not exist."""

import asyncio
import functools
from collections.abc import Awaitable, Callable

from pdmesh.v1 import batch_pb2, batch_pb2_grpc, common_pb2, router_pb2
from services.common.errors import InvalidArgument, Unavailable, abort_with
from services.router.auth import ApiKeys
from services.router.batch.runner import BatchRunner
from services.router.batch.store import (CANCELLED, COMPLETED, ENDED, FAILED, QUEUED, RUNNING, AsyncBatchStore,
                                         ItemResult, Job, decode_cursor, encode_cursor)

MAX_CUSTOM_ID_CHARS = 512
MAX_IDEMPOTENCY_KEY_CHARS = 256
STREAM_RECHECK_S = 5.0  # a stream re-reads the store at least this often (the runner also wakes it)
_STATUS = {QUEUED: batch_pb2.BATCH_JOB_STATUS_QUEUED, RUNNING: batch_pb2.BATCH_JOB_STATUS_RUNNING,
           COMPLETED: batch_pb2.BATCH_JOB_STATUS_COMPLETED, CANCELLED: batch_pb2.BATCH_JOB_STATUS_CANCELLED,
           FAILED: batch_pb2.BATCH_JOB_STATUS_FAILED}


def _mapped(method):
    """Runs a unary handler as the caller's tenant and maps any domain error to its status code (the one place)."""
    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            self._authorize(request, context)
            return await method(self, request, context)
        except Exception as exc:
            await abort_with(context, exc)
    return handler


class BatchServicer(batch_pb2_grpc.BatchServiceServicer):
    def __init__(self, store: AsyncBatchStore | None, runner: BatchRunner | None,
                 validate: Callable[[router_pb2.GenerateRequest], Awaitable[None]], max_items: int = 50_000,
                 disabled_reason: str = "", api_keys: ApiKeys = ApiKeys()):
        """`validate(request)` raises InvalidArgument when Generate would reject the request. With no
        store, every call is UNAVAILABLE with `disabled_reason`."""
        self._store, self._runner, self._validate = store, runner, validate
        self._max_items, self._disabled_reason, self._api_keys = max_items, disabled_reason, api_keys

    def _authorize(self, request, context) -> None:
        """Sets request.tenant_id to the tenant the caller's API key runs as (Unauthenticated /
        PermissionDenied as on Generate)."""
        metadata = dict(context.invocation_metadata() or ())
        request.tenant_id = self._api_keys.authorize(metadata.get("authorization"), request.tenant_id)

    def _ready(self) -> AsyncBatchStore:
        if self._store is None:
            raise Unavailable(f"batch jobs are off on this router: {self._disabled_reason}")
        return self._store

    @_mapped
    async def CreateBatchJob(self, request, context):
        store = self._ready()
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
            raise InvalidArgument(f"idempotency_key is {len(request.idempotency_key)} characters; "
                                  f"at most {MAX_IDEMPOTENCY_KEY_CHARS}")
        items = await self._checked_items(request)
        job = await store.create_job(request.tenant_id, items, dict(request.metadata), request.idempotency_key)
        self._runner.submit(job.job_id)  # a repeated create: already submitted (an ended job stays ended)
        return batch_pb2.CreateBatchJobResponse(job=job_to_proto(job))

    async def _checked_items(self, request: batch_pb2.CreateBatchJobRequest) -> list[tuple[str, bytes]]:
        if not request.items:
            raise InvalidArgument("a batch job needs at least one item")
        if len(request.items) > self._max_items:
            raise InvalidArgument(f"{len(request.items)} items is more than this router's limit of "
                                  f"{self._max_items} per job; split the batch")
        seen: dict[str, int] = {}
        items = []
        for i, item in enumerate(request.items):
            where = f"items[{i}] (custom_id {item.custom_id!r})"
            if not item.custom_id or len(item.custom_id) > MAX_CUSTOM_ID_CHARS:
                raise InvalidArgument(f"{where}: custom_id must be 1..{MAX_CUSTOM_ID_CHARS} characters")
            if item.custom_id in seen:
                raise InvalidArgument(f"{where}: duplicate custom_id, already used by items[{seen[item.custom_id]}]; "
                                      "custom_ids must be unique within a job")
            seen[item.custom_id] = i
            generate = item.request
            if generate.priority not in (common_pb2.PRIORITY_CLASS_UNSPECIFIED, common_pb2.PRIORITY_CLASS_BATCH):
                raise InvalidArgument(f"{where}: priority must be unset or PRIORITY_CLASS_BATCH in a batch job")
            if generate.tenant_id not in ("", request.tenant_id):
                raise InvalidArgument(f"{where}: tenant_id {generate.tenant_id!r} differs from the job's "
                                      f"{request.tenant_id!r}; leave it empty")
            await asyncio.sleep(0)  # tokenizing a big job must not hold up live streams
            try:
                await self._validate(generate)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{where}: {exc}") from None
            items.append((item.custom_id, generate.SerializeToString()))
        return items

    @_mapped
    async def GetBatchJob(self, request, context):
        job = await self._ready().get_job(request.tenant_id, request.job_id)
        return batch_pb2.GetBatchJobResponse(job=job_to_proto(job))

    @_mapped
    async def ListBatchJobs(self, request, context):
        size = _page_size(request.page_size, 50)
        before = decode_cursor("j", request.page_token) if request.page_token else None
        jobs, cursor = await self._ready().list_jobs(request.tenant_id, size, before)
        return batch_pb2.ListBatchJobsResponse(jobs=[job_to_proto(j) for j in jobs],
                                               next_page_token=encode_cursor("j", cursor) if cursor else "")

    @_mapped
    async def CancelBatchJob(self, request, context):
        job = await self._ready().cancel_job(request.tenant_id, request.job_id)
        await self._runner.stop_job(job.job_id)
        return batch_pb2.CancelBatchJobResponse(job=job_to_proto(await self._store.job(job.job_id)))

    @_mapped
    async def ListBatchResults(self, request, context):
        store, size = self._ready(), _page_size(request.page_size, 100)
        after = decode_cursor("r", request.page_token) if request.page_token else 0
        job = await store.get_job(request.tenant_id, request.job_id)  # status first: results stored before it ended
        results = await store.results(request.tenant_id, request.job_id, after, size)
        last = results[-1].seq if results else after
        more = len(results) == size or job.status not in ENDED
        return batch_pb2.ListBatchResultsResponse(results=[result_to_proto(r) for r in results],
                                                  next_page_token=encode_cursor("r", last) if more else "")

    async def StreamBatchResults(self, request, context):
        try:
            self._authorize(request, context)
            store = self._ready()
            after = decode_cursor("r", request.page_token) if request.page_token else 0
            while True:
                changed = self._runner.watch(request.job_id)
                job = await store.get_job(request.tenant_id, request.job_id)
                results = await store.results(request.tenant_id, request.job_id, after, 200)
                for result in results:
                    after = result.seq
                    yield batch_pb2.StreamBatchResultsResponse(result=result_to_proto(result),
                                                               resume_token=encode_cursor("r", after))
                if not results:
                    if job.status in ENDED:
                        return
                    try:
                        await asyncio.wait_for(changed.wait(), STREAM_RECHECK_S)
                    except asyncio.TimeoutError:
                        pass
        except Exception as exc:
            await abort_with(context, exc)


def _page_size(size: int, default: int) -> int:
    if size < 0 or size > 1000:
        raise InvalidArgument(f"page_size {size} is outside 0..1000 (0 means {default})")
    return size or default


def job_to_proto(job: Job) -> batch_pb2.BatchJob:
    done = job.completed_items + job.failed_items
    return batch_pb2.BatchJob(
        job_id=job.job_id, tenant_id=job.tenant_id, status=_STATUS[job.status], total_items=job.total_items,
        completed_items=job.completed_items, failed_items=job.failed_items,
        progress=done / job.total_items if job.total_items else 1.0, created_unix_ms=job.created_ms,
        started_unix_ms=job.started_ms, ended_unix_ms=job.ended_ms, metadata=job.metadata, error=job.error)


def result_to_proto(result: ItemResult) -> batch_pb2.BatchResult:
    message = batch_pb2.BatchResult(
        custom_id=result.custom_id, item_index=result.item_index, error_code=result.error_code,
        error_message=result.error_message, text=result.text, token_ids=result.token_ids,
        finish_reason=result.finish_reason, completed_unix_ms=result.completed_ms)
    if result.error_code == 0:
        message.usage.CopyFrom(common_pb2.Usage(prompt_tokens=result.prompt_tokens,
                                                completion_tokens=result.completion_tokens,
                                                cached_prompt_tokens=result.cached_prompt_tokens))
    return message
