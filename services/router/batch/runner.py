"""The batch runner: feeds each running job's items into the router's own request path.

Invariant: every item of a RUNNING job ends with exactly one stored result. Items go through
`generate` (RouterServicer.generate) at batch priority as the job's tenant, so admission by
class, headroom, fair share, tenant limits and placement apply to them like to any request.
Transient refusals are waited out, never stored as failures: RESOURCE_EXHAUSTED (a limit or a
full queue) is retried after its retry hint, UNAVAILABLE / DEADLINE_EXCEEDED with backoff up to
`max_attempts` (attempts made while `pools_up()` is false, i.e. no decode worker is reachable,
do not count: an outage of the mesh fails no item); any other error is the item's result (error
code + message). Results are keyed
by (job, custom_id) in the store, so an item re-run after a crash cannot give a second result.
On start the runner resumes every QUEUED or RUNNING job from its items without a result.
Each job has at most `job_concurrency` items in flight; fairness between tenants is admission's.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from pdmesh.v1 import common_pb2, router_pb2
from services.common import metrics
from services.common.errors import ResourceExhausted, Unavailable
from services.router.batch.store import AsyncBatchStore, ItemResult, Job, PendingItem

log = logging.getLogger(__name__)

Generate = Callable[[router_pb2.GenerateRequest], AsyncIterator[router_pb2.GenerateResponse]]


class BatchRunner:
    def __init__(self, store: AsyncBatchStore, generate: Generate, code_of: Callable[[BaseException], int],
                 job_concurrency: int = 32, max_attempts: int = 8, max_backoff_s: float = 10.0,
                 pools_up: Callable[[], bool] = lambda: True):
        """`code_of(exc)` is the gRPC status code number an item's error is stored with."""
        if job_concurrency <= 0 or max_attempts <= 0:
            raise ValueError("job_concurrency and max_attempts must be positive")
        self._store, self._generate, self._code_of, self._pools_up = store, generate, code_of, pools_up
        self.job_concurrency, self.max_attempts, self.max_backoff_s = job_concurrency, max_attempts, max_backoff_s
        self._tasks: dict[str, asyncio.Task] = {}
        self._changed: dict[str, asyncio.Event] = {}

    async def resume(self) -> list[str]:
        """Starts every QUEUED or RUNNING job found in the store (after a restart); returns their ids."""
        jobs = await self._store.unfinished_jobs()
        for job in jobs:
            self.submit(job.job_id)
        if jobs:
            log.info("resuming %d batch job(s): %s", len(jobs), ", ".join(j.job_id for j in jobs))
        return [j.job_id for j in jobs]

    def submit(self, job_id: str) -> None:
        if job_id not in self._tasks:
            self._tasks[job_id] = asyncio.create_task(self._run_job(job_id), name=f"batch-{job_id}")

    async def stop_job(self, job_id: str) -> None:
        """Aborts the job's items in flight (after the store has marked it cancelled)."""
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._signal(job_id)

    def watch(self, job_id: str) -> asyncio.Event:
        """An event set at the next result or end of the job (take it before reading the store)."""
        return self._changed.setdefault(job_id, asyncio.Event())

    async def close(self) -> None:
        """Stops feeding; items in flight are aborted and run again by the next router on this store."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _signal(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    async def _run_job(self, job_id: str) -> None:
        try:
            if not await self._store.mark_running(job_id):
                return
            job = await self._store.job(job_id)
            items = iter(await self._store.pending_items(job_id))

            async def feed() -> None:
                for item in items:  # the workers share one iterator: each item is taken once
                    result = await self._run_item(job, item)
                    if await self._store.put_result(job_id, result):
                        _count(result)
                    self._signal(job_id)
            async with asyncio.TaskGroup() as group:  # one feed failing stops the others
                for _ in range(self.job_concurrency):
                    group.create_task(feed())
            job = await self._store.finish_job(job_id)
            log.info("batch job %s %s: %d ok, %d failed", job_id, job.status, job.completed_items, job.failed_items)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store failed under us: the job cannot go on
            if isinstance(exc, ExceptionGroup):
                exc = exc.exceptions[0]
            log.error("batch job %s failed: %r", job_id, exc)
            await self._store.finish_job(job_id, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._tasks.pop(job_id, None)
            self._signal(job_id)

    async def _run_item(self, job: Job, item: PendingItem) -> ItemResult:
        request = router_pb2.GenerateRequest.FromString(item.request)
        request.priority = common_pb2.PRIORITY_CLASS_BATCH
        request.tenant_id = job.tenant_id
        request.request_id = f"{job.job_id}-{item.item_index}"
        attempt, backoff = 0, 0.5
        while True:
            try:
                return await self._generate_once(request, item)
            except asyncio.CancelledError:
                raise
            except ResourceExhausted as exc:
                await asyncio.sleep(max(0.05, exc.retry_after_s))
            except (Unavailable, TimeoutError, ConnectionError) as exc:
                attempt += 1 if self._pools_up() else 0
                if attempt >= self.max_attempts:
                    return self._failed(item, exc)
                log.info("batch item %s/%s: %s; retry %d in %.1fs", job.job_id, item.custom_id, exc, attempt, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            except Exception as exc:
                return self._failed(item, exc)

    async def _generate_once(self, request: router_pb2.GenerateRequest, item: PendingItem) -> ItemResult:
        text, tokens, last = [], [], None
        async for message in self._generate(request):
            text.append(message.text_delta)
            tokens += message.token_ids
            if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                last = message
        if last is None:
            raise Unavailable("the stream ended without a finish reason")
        usage = last.usage
        return ItemResult(item.custom_id, item.item_index, text="".join(text), token_ids=tuple(tokens),
                          finish_reason=last.finish_reason, prompt_tokens=usage.prompt_tokens,
                          completion_tokens=usage.completion_tokens,
                          cached_prompt_tokens=usage.cached_prompt_tokens)

    def _failed(self, item: PendingItem, exc: BaseException) -> ItemResult:
        return ItemResult(item.custom_id, item.item_index, error_code=self._code_of(exc),
                          error_message=str(exc) or type(exc).__name__)


def _count(result: ItemResult) -> None:
    """A stored result, in the batch metrics."""
    metrics.BATCH_ITEMS.labels("ok" if result.error_code == 0 else "failed").inc()
    metrics.BATCH_TOKENS.labels("prompt").inc(result.prompt_tokens)
    metrics.BATCH_TOKENS.labels("completion").inc(result.completion_tokens)
