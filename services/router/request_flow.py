"""One request's path through the mesh, read top to bottom:
admission -> placement (decode first, then the decider, then prefill) -> prefill RPC (first token
+ KV handle) -> decode stream (pulls the KV, streams tokens) -> relay with text deltas -> final
message with finish reason, usage, timings and placement.

Invariant: every token the decode worker sends is relayed exactly once, in order, and the stream
ends with exactly one message carrying a finish reason (or an error status).
"""

import contextlib
import time
import uuid
from typing import NamedTuple

import grpc
from opentelemetry.trace import SpanKind

from engine.tokenizer import IncrementalDetokenizer
from pdmesh.v1 import common_pb2, decode_pb2, prefill_pb2
from services.common import metrics, tracing
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.router.admission import Admission
from services.router.placement.base import PlacementRequest
from services.router.placement.runner import NoCandidates, PlacementProfile
from services.router.workers import WorkerRegistry


class GenerateJob(NamedTuple):
    request_id: str
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    max_tokens: int
    priority: str
    tenant_id: str
    ignore_eos: bool
    timeout_s: float | None
    # time.perf_counter() when the request reached the router: every timing counts from here.
    arrived_at: float | None = None


class RelayEvent(NamedTuple):
    token_ids: list[int]
    text_delta: str
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    usage: common_pb2.Usage | None = None
    timings: common_pb2.PhaseTimings | None = None
    placement: dict | None = None


class RequestFlow:
    def __init__(self, registry: WorkerRegistry, profile: PlacementProfile, admission: Admission, tokenizer):
        self._registry, self._profile, self._admission, self._tokenizer = registry, profile, admission, tokenizer

    async def run(self, job: GenerateJob):
        t0 = job.arrived_at or time.perf_counter()
        ms = lambda: (time.perf_counter() - t0) * 1000  # noqa: E731
        timings = common_pb2.PhaseTimings()
        queued_at = time.perf_counter()
        async with self._admission.admit(job.priority, job.tenant_id, len(job.prompt) + job.max_tokens) as queue_ms, \
                    contextlib.AsyncExitStack() as held:
            timings.queue_ms = queue_ms
            admitted_at = time.perf_counter()
            tracing.record_span("router.queue", queued_at, admitted_at, {"pdmesh.priority": job.priority})
            metrics.ROUTER_QUEUE.labels(job.priority).observe(queue_ms / 1000)
            placement, placed = self._place(job)
            held.enter_context(self._registry.track(placement.decode.worker.worker_id, 0))
            placed_at = time.perf_counter()
            timings.placement_ms = (placed_at - admitted_at) * 1000
            tracing.record_span("router.placement", admitted_at, placed_at, _placement_attributes(placement, placed))
            # Workers see an id unique per attempt, so a client reusing its own id never collides.
            worker_request_id = f"{job.request_id}.{uuid.uuid4().hex[:8]}"
            decode_request = decode_pb2.DecodeRequest(
                request_id=worker_request_id, prompt_token_ids=job.prompt, sampling=job.sampling,
                max_tokens=job.max_tokens, ignore_eos=job.ignore_eos, priority=_PRIORITY[job.priority])
            cached = 0
            if placement.prefill is not None:
                start = ms()
                with self._registry.track(placement.prefill.worker.worker_id, len(job.prompt)):
                    prefill = await self._prefill(job._replace(request_id=worker_request_id),
                                                  placement.prefill.worker.worker_id, remaining(job, t0))
                timings.prefill_ms = ms() - start
                decode_request.kv_handle.CopyFrom(prefill.kv_handle)
                decode_request.first_token_id = prefill.first_token_id
                cached = prefill.cached_tokens
            detok = IncrementalDetokenizer(self._tokenizer)
            completion, transport, first_at, last_at = 0, "", None, 0.0
            decode_id = placement.decode.worker.worker_id
            ttft, itl = metrics.TTFT.labels(job.priority), metrics.ITL.labels(job.priority)
            with tracing.tracer().start_as_current_span("router.decode", kind=SpanKind.CLIENT,
                                                        attributes={"pdmesh.worker_id": decode_id}) as span:
                stream = self._registry.decode_stub(decode_id).Decode(
                    decode_request, timeout=remaining(job, t0), metadata=tracing.outgoing_metadata())
                try:
                    async for message in stream:
                        if message.stats.kv_transport:
                            transport = message.stats.kv_transport
                            timings.kv_transfer_ms = message.stats.kv_transfer_ms
                        cached = cached or message.stats.cached_tokens
                        now = ms()
                        if message.token_ids:
                            if first_at is None:
                                self._admission.first_token()
                                first_at = timings.time_to_first_token_ms = now
                                ttft.observe(now / 1000)
                                span.add_event("first_token")
                            else:
                                itl.observe((now - last_at) / 1000)
                            last_at = now
                        completion += len(message.token_ids)
                        text = detok.push(list(message.token_ids))
                        if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                            timings.decode_ms = now - (first_at or now)
                            timings.total_ms = now
                            metrics.E2E.labels(job.priority).observe(now / 1000)
                            metrics.ROUTER_PROMPT_TOKENS.labels("true").inc(cached)
                            metrics.ROUTER_PROMPT_TOKENS.labels("false").inc(len(job.prompt) - cached)
                            tracing.set_attributes(span, {"pdmesh.kv.transport": transport or None,
                                                          "gen_ai.usage.output_tokens": completion})
                            yield RelayEvent(list(message.token_ids), text, message.finish_reason,
                                             common_pb2.Usage(prompt_tokens=len(job.prompt),
                                                              completion_tokens=completion,
                                                              cached_prompt_tokens=cached),
                                             timings, _placement_info(placement, placed, transport))
                            return
                        if message.token_ids or text:
                            yield RelayEvent(list(message.token_ids), text)
                except grpc.aio.AioRpcError as exc:
                    raise _worker_error("decode", decode_id, exc) from exc
            raise Unavailable(f"decode worker {decode_id} ended the stream without a finish reason")

    def _place(self, job: GenerateJob):
        request = PlacementRequest(job.request_id, job.prompt, job.priority, self._registry.block_size)
        try:
            placement = self._profile.place(request, self._registry.views(), self._registry.index)
        except NoCandidates as exc:
            metrics.ROUTING.labels("rejected").inc()
            if self._registry.has_healthy("decode"):
                raise ResourceExhausted(f"{exc}: every decode worker is at capacity", retry_after_s=0.5) from exc
            raise Unavailable(str(exc)) from exc
        metrics.ROUTING.labels("remote_prefill" if placement.prefill else "local_prefill").inc()
        return placement, request

    async def _prefill(self, job: GenerateJob, worker_id: str, timeout: float | None):
        request = prefill_pb2.PrefillRequest(request_id=job.request_id, prompt_token_ids=job.prompt,
                                             sampling=job.sampling, priority=_PRIORITY[job.priority])
        with tracing.tracer().start_as_current_span("router.prefill", kind=SpanKind.CLIENT,
                                                    attributes={"pdmesh.worker_id": worker_id}) as span:
            try:
                response = await self._registry.prefill_stub(worker_id).Prefill(
                    request, timeout=timeout, metadata=tracing.outgoing_metadata())
            except grpc.aio.AioRpcError as exc:
                raise _worker_error("prefill", worker_id, exc) from exc
            tracing.set_attributes(span, {"pdmesh.prefill.cached_tokens": response.cached_tokens})
            return response


def _placement_info(placement, request: PlacementRequest, transport: str) -> dict:
    prefill = placement.prefill
    return {"prefill_worker_id": prefill.worker.worker_id if prefill else "",
            "decode_worker_id": placement.decode.worker.worker_id, "kv_transport": transport,
            "decision": "remote_prefill" if prefill else "local_prefill",
            "decision_reason": placement.decision.reason, "decode_scores": placement.decode.scores,
            "prefill_scores": prefill.scores if prefill else {},
            "decode_cached_tokens": request.cached_tokens(placement.decode.worker),
            "prefill_cached_tokens": request.cached_tokens(prefill.worker) if prefill else 0}


def _placement_attributes(placement, request: PlacementRequest) -> dict:
    """Span attributes of a placement: who was chosen, why, and every candidate's score."""
    if not tracing.enabled():
        return {}
    info = _placement_info(placement, request, "")
    attributes = {f"pdmesh.placement.{k}": v for k, v in info.items() if isinstance(v, (str, int)) and v != ""}
    for pool in ("decode", "prefill"):
        for worker_id, score in info[f"{pool}_scores"].items():
            attributes[f"pdmesh.placement.{pool}_score.{worker_id}"] = round(score, 4)
    return attributes


_PRIORITY = {"interactive": common_pb2.PRIORITY_CLASS_INTERACTIVE, "batch": common_pb2.PRIORITY_CLASS_BATCH}


def remaining(job: GenerateJob, t0: float) -> float | None:
    if job.timeout_s is None:
        return None
    left = job.timeout_s - (time.perf_counter() - t0)
    if left <= 0:
        raise TimeoutError("deadline exceeded before the request could be served")
    return left


def _worker_error(role: str, worker_id: str, exc: grpc.aio.AioRpcError) -> Exception:
    message = f"{role} worker {worker_id}: {exc.details()}"
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(message)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(message)
    return Unavailable(message)
