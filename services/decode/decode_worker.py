"""The decode worker's domain: get a prompt's KV (pull it, or compute it here), then stream tokens.

Ownership and order for a pulled prompt:
  1. reserve blocks in our pool (the engine answers None while full: we ask again until the deadline);
  2. pull the holder's blocks into them (transport preference order; a failed transport falls
     through to the next one; corrupt bytes fall back to recomputing the prompt here);
  3. release the holder's lease (always, even on failure: the holder must get its blocks back);
  4. hand the sequence to the engine, which owns the blocks from then on.
A handle the engine pulls itself (vLLM's NixlConnector, `engine_transport`) skips 1-3: the
request goes to the engine with the handle's parameters, the engine pulls the KV before its
first step and generates every token, the first included.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

from opentelemetry.trace import SpanKind, Status, StatusCode

from engine.sampling import SamplingParams
from kvtransfer.errors import KvChecksumError, KvTransferError
from kvtransfer.handle import KvHandle
from services.common import metrics, tracing
from services.common.engine_runner import EngineFailure, EngineRunner
from services.common.errors import ResourceExhausted

log = logging.getLogger(__name__)

RESERVE_RETRY_S = 0.005


class DecodeJob(NamedTuple):
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    ignore_eos: bool
    handle: KvHandle | None
    first_token_id: int | None
    deadline: float | None  # time.monotonic() by which the KV must be in place
    priority: int = 0  # engine priority rank (engine.sequence.PRIORITY_*)
    resume_token_ids: tuple[int, ...] = ()  # failover: tokens already delivered by another worker


class TransferInfo(NamedTuple):
    transport: str = ""
    num_bytes: int = 0
    ms: float = 0.0
    local_prefill_tokens: int = 0
    cached_tokens: int = 0
    queue_ms: float = 0.0  # waiting for a batch slot (known with the first engine output)


class DecodeEvent(NamedTuple):
    token_ids: list[int]
    finish_reason: str | None
    transfer: TransferInfo | None  # on the first event only


class DecodeWorker:
    def __init__(self, runner: EngineRunner, pullers: dict, engine_transport: str = ""):
        self._runner = runner
        self._pullers = pullers  # transport name -> KvPuller, in preference order
        self._engine_transport = engine_transport  # KV the engine pulls itself ("vllm-nixl"), "" = none

    async def decode(self, job: DecodeJob) -> AsyncIterator[DecodeEvent]:
        arrived = time.perf_counter()
        outputs = self._runner.open_stream(job.request_id)
        try:
            route = self._route(job.handle)
            transfer = await self._import(job) if route == "pull" else None
            if route == "engine":
                await self._add_engine_pulled(job)
            elif transfer is None:  # no KV sent, none usable here, or the pulled KV was unusable
                await self._add_local(job)
            first = [] if transfer is None else [job.first_token_id]
            local_len = len(job.prompt) + len(job.resume_token_ids) if transfer is None else 0
            engine_transport = self._engine_transport if route == "engine" else ""
            async for event in self._stream(outputs, first, transfer, local_len, arrived, engine_transport):
                yield event
        except BaseException:
            self._runner.post(lambda engine: engine.abort(job.request_id))
            raise
        finally:
            self._runner.close_stream(job.request_id)

    def _route(self, handle: KvHandle | None) -> str:
        """How the prompt's KV gets here: "engine" (the engine pulls it itself), "pull" (our
        kvtransfer), or "local" (no KV sent, or another engine's KV: prefill here)."""
        if handle is None:
            return "local"
        if self._engine_transport and self._engine_transport in handle.transports:
            return "engine"
        return "pull" if self._pullers and not handle.engine_kv_params else "local"

    async def _import(self, job: DecodeJob) -> TransferInfo | None:
        dst = await self._reserve(job)
        try:
            info = await self._pull(job.handle, dst)
        except KvTransferError as exc:
            # Corrupt bytes (checksum), a holder that died or lost the lease, no common transport:
            # the prompt is recomputed here; the request never fails over a transfer.
            log.warning("%s: KV from %s unusable (%s: %s); recomputing the prompt here", job.request_id,
                        job.handle.worker_id, type(exc).__name__, exc)
            await self._runner.call(lambda engine: engine.cancel_import(job.request_id))
            return None
        except BaseException:
            self._runner.post(lambda engine: engine.cancel_import(job.request_id))
            raise
        finally:
            await self._release(job.handle)
        # Not announced: the first token is out already; cutting a step would only hurry the second.
        await self._runner.call(lambda engine: engine.add_imported(
            job.request_id, job.prompt, job.first_token_id, job.sampling, job.max_tokens, job.ignore_eos,
            job.priority))
        return info

    async def _reserve(self, job: DecodeJob) -> list[int]:
        while True:
            dst = await self._runner.call(lambda engine: engine.reserve_for_import(  # the first token waits on it
                job.request_id, len(job.prompt), job.priority), announce=job.priority)
            if dst is not None:
                return dst
            if job.deadline is not None and time.monotonic() > job.deadline:
                raise ResourceExhausted("decode worker has no free KV blocks for this prompt", retry_after_s=1.0)
            await asyncio.sleep(RESERVE_RETRY_S)

    async def _pull(self, handle: KvHandle, dst: list[int]) -> TransferInfo:
        offered = [name for name in self._pullers if name in handle.transports]
        if not offered:
            raise KvTransferError(f"no common KV transport: holder offers {list(handle.transports)}, "
                                  f"this worker has {list(self._pullers)}")
        with tracing.tracer().start_as_current_span("kv_transfer", kind=SpanKind.CLIENT, attributes={
                "pdmesh.kv.source_worker_id": handle.worker_id, "pdmesh.kv.lease_id": handle.lease_id,
                "pdmesh.kv.blocks": len(handle.block_ids), "pdmesh.kv.tokens": handle.num_tokens,
                "pdmesh.kv.bytes": handle.num_bytes}) as span:
            last_error: Exception | None = None
            for attempt, name in enumerate(offered):
                try:
                    result = await self._pullers[name].pull(handle, dst)
                except KvTransferError as exc:
                    metrics.KV_FAILURES.labels(name, type(exc).__name__).inc()
                    span.add_event("transport_failed", {"pdmesh.kv.transport": name, "exception.message": str(exc)})
                    if isinstance(exc, KvChecksumError):
                        span.set_status(Status(StatusCode.ERROR, "checksum mismatch: recomputing"))
                        raise
                    log.warning("KV pull over %s failed: %s; trying the next transport", name, exc)
                    last_error = exc
                    continue
                _transfer_observed(span, result, attempt)
                return TransferInfo(result.transport, result.num_bytes, result.seconds * 1000)
            raise last_error

    async def _release(self, handle: KvHandle) -> None:
        puller = next(iter(self._pullers.values()))
        try:
            await puller.release(handle)
        except Exception as exc:  # the lease expires on its own; never fail a request over it
            log.warning("releasing lease %s failed: %s", handle.lease_id, exc)

    async def _add_engine_pulled(self, job: DecodeJob) -> None:
        params = job.handle.engine_kv_params_dict()
        await self._runner.call(lambda engine: engine.add_remote_prefilled(
            job.request_id, job.prompt, params, job.sampling, job.max_tokens, job.ignore_eos, job.priority))

    async def _add_local(self, job: DecodeJob) -> None:
        await self._runner.call(lambda engine: engine.add_request(
            job.request_id, job.prompt, job.sampling, job.max_tokens, ignore_eos=job.ignore_eos,
            priority=job.priority, resume_token_ids=job.resume_token_ids), announce=job.priority)

    async def _stream(self, outputs: asyncio.Queue, first: list[int], transfer: TransferInfo | None,
                      local_prompt_len: int, arrived: float, engine_transport: str = ""):
        """Relays engine outputs. A pulled prompt's first token goes out at once; with local
        prefill, the first output says how much of the prompt was cached and how long the
        request waited since it `arrived` (for the engine thread to take it, then for a step).
        With KV the engine pulls itself (engine_transport), vLLM does not say per request how much
        it computed (the worker's counters do): the first event names the transport, its span
        covers pull and first token."""
        start, first_at, generated = time.perf_counter(), None, 0
        waited_ms = 0.0 if first else (start - arrived) * 1000
        if first:
            yield DecodeEvent(first, None, transfer)
            transfer, first_at, generated = TransferInfo(), start, 1
        while True:
            out = await outputs.get()
            if isinstance(out, EngineFailure):
                raise out
            if out.queue_ms:
                tracing.record_span("decode.queue", start - waited_ms / 1000, start + out.queue_ms / 1000)  # from arrival
            if transfer is None and engine_transport:
                transfer = TransferInfo(engine_transport, queue_ms=waited_ms + out.queue_ms)
            elif transfer is None:
                transfer = TransferInfo(local_prefill_tokens=local_prompt_len - out.num_cached_tokens,
                                        cached_tokens=out.num_cached_tokens, queue_ms=waited_ms + out.queue_ms)
            elif out.queue_ms:
                transfer = transfer._replace(queue_ms=out.queue_ms)
            tokens = [out.token_id] if out.token_id is not None else []
            generated += len(tokens)
            if tokens and first_at is None and engine_transport:
                first_at = time.perf_counter()
                tracing.record_span("kv_transfer", start, first_at, {"pdmesh.kv.transport": engine_transport})
            elif tokens and first_at is None:
                first_at = time.perf_counter()
                tracing.record_span("decode.local_prefill", start + out.queue_ms / 1000, first_at, {
                    "pdmesh.prefill.cached_tokens": transfer.cached_tokens,
                    "pdmesh.prefill.computed_tokens": transfer.local_prefill_tokens})
            yield DecodeEvent(tokens, out.finish_reason, transfer)
            transfer = TransferInfo()
            if out.finish_reason is not None:
                tracing.record_span("decode.generate", first_at or start, time.perf_counter(),
                                    {"gen_ai.usage.output_tokens": generated,
                                     "gen_ai.response.finish_reasons": [out.finish_reason]})
                return


def _transfer_observed(span, result, attempt: int) -> None:
    """A finished pull, on its span and in the metrics."""
    metrics.KV_BYTES.labels(result.transport).inc(result.num_bytes)
    metrics.KV_SECONDS.labels(result.transport).observe(result.seconds)
    tracing.set_attributes(span, {
        "pdmesh.kv.transport": result.transport, "pdmesh.kv.duration_ms": round(result.seconds * 1000, 3),
        "pdmesh.kv.verify_ms": round(result.verify_seconds * 1000, 3),
        "pdmesh.kv.throughput_gbps": round(result.num_bytes / max(result.seconds, 1e-9) / 1e9, 6),
        "pdmesh.kv.retries": result.retries + attempt})
