"""The prefill worker's domain: run a prompt, keep its KV, lend it out under a lease.

Ownership: after `prefill` returns, the prompt's blocks are pinned in this worker's engine and
belong to the lease in the returned handle. They are unpinned exactly once, when the lease is
released by the puller or expires (KvSource calls `on_lease_free`). With vLLM, vLLM's connector
owns them instead (services/prefill/vllm_lender.py).

The lender (`lender`) has two calls: collect(engine, request_id), on the engine thread, says
what the finished request left to lend (our block ids, or vLLM's transfer parameters); lend(
request_id, collected, num_tokens) turns that into the KvHandle.
"""

import time
from typing import NamedTuple

from engine.sampling import SamplingParams
from kvtransfer.handle import KvHandle
from kvtransfer.source import KvSource
from services.common import tracing
from services.common.engine_runner import EngineFailure, EngineRunner


class PrefillResult(NamedTuple):
    first_token_id: int
    handle: KvHandle
    cached_tokens: int
    queue_ms: float
    compute_ms: float


class PoolLender:
    """Our engine's blocks, lent through a KvSource."""

    def __init__(self, source: KvSource):
        self.source = source

    def collect(self, engine, request_id: str) -> list[int]:
        return engine.block_ids_of(request_id)

    def lend(self, request_id: str, block_ids: list[int], num_tokens: int) -> KvHandle:
        return self.source.lend(request_id, block_ids, num_tokens)


class PrefillWorker:
    def __init__(self, runner: EngineRunner):
        self._runner = runner
        self.lender = None  # PoolLender or VllmLender, attached once the server knows its address

    def on_lease_free(self, lease) -> None:
        """KvSource callback (any thread): give the lease's blocks back to the engine."""
        request_id = lease.request_id
        self._runner.post(lambda engine: engine.release(request_id))

    async def prefill(self, request_id: str, prompt: list[int], sampling: SamplingParams,
                      priority: int = 0) -> PrefillResult:
        start = time.perf_counter()
        outputs = self._runner.open_stream(request_id)
        try:
            await self._runner.call(lambda engine: engine.add_request(
                request_id, prompt, sampling, max_tokens=1, keep_kv=True, priority=priority), announce=priority)
            out = await outputs.get()
            if isinstance(out, EngineFailure):
                raise out
            kept = await self._runner.call(lambda engine: self.lender.collect(engine, request_id))
        except BaseException:
            self._runner.post(lambda engine: _abort_and_release(engine, request_id))
            raise
        finally:
            self._runner.close_stream(request_id)
        end = time.perf_counter()
        compute_ms = (end - start) * 1000 - out.queue_ms
        tracing.record_span("prefill.queue", start, start + out.queue_ms / 1000)
        tracing.record_span("prefill.compute", start + out.queue_ms / 1000, end, {
            "pdmesh.prefill.cached_tokens": out.num_cached_tokens,
            "pdmesh.prefill.computed_tokens": len(prompt) - out.num_cached_tokens})
        try:
            handle = self.lender.lend(request_id, kept, len(prompt))
        except BaseException:
            self._runner.post(lambda engine: engine.release(request_id))
            raise
        return PrefillResult(out.token_id, handle, out.num_cached_tokens, out.queue_ms, compute_ms)


def _abort_and_release(engine, request_id: str) -> None:
    engine.abort(request_id)
    engine.release(request_id)


