"""One request's path through the mesh, read top to bottom:
admission -> placement (decode first, then the decider, then prefill) -> prefill RPC (first token
+ KV handle) -> decode stream (pulls the KV, streams tokens) -> relay with text deltas -> final
message with finish reason, usage, timings and placement.

Invariant: every token the decode worker sends is relayed exactly once, in order, and the stream
ends with exactly one message carrying a finish reason (or an error status).
"""

import contextlib
import logging
import time
from typing import NamedTuple

import grpc

from engine.tokenizer import IncrementalDetokenizer
from pdmesh.v1 import common_pb2, decode_pb2, prefill_pb2
from services.common import metrics, tracing
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.common.ids import random_hex
from services.router.admission import Admission
from services.router.placement.base import Decision, PlacementRequest
from services.router.placement.runner import NoCandidates, PlacementProfile
from services.router.workers import WorkerRegistry


log = logging.getLogger(__name__)


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
            worker_request_id = _attempt_id(job)
            decode_request = decode_pb2.DecodeRequest(
                request_id=worker_request_id, prompt_token_ids=job.prompt, sampling=job.sampling,
                max_tokens=job.max_tokens, ignore_eos=job.ignore_eos, priority=_PRIORITY[job.priority])
            relay = _Relay(job, t0, timings, IncrementalDetokenizer(self._tokenizer), self._admission.first_token)
            if placement.prefill is not None:
                prefill_id = placement.prefill.worker.worker_id
                start = ms()
                try:
                    with self._registry.track(prefill_id, len(job.prompt)):
                        prefill = await self._prefill(job._replace(request_id=worker_request_id), prefill_id,
                                                      remaining(job, t0))
                    decode_request.kv_handle.CopyFrom(prefill.kv_handle)
                    decode_request.first_token_id = prefill.first_token_id
                    relay.cached = prefill.cached_tokens
                except _WorkerLost as lost:  # the decode worker prefills instead
                    _failover_noted("prefill", lost)
                    placement = placement._replace(prefill=None, decision=Decision(
                        False, f"prefill worker {prefill_id} lost; prefilled on the decode worker"))
                timings.prefill_ms = ms() - start
            decode_id, failed = placement.decode.worker.worker_id, set()
            for attempt in range(MAX_DECODE_ATTEMPTS):
                try:
                    async with contextlib.aclosing(self._decode(decode_id, decode_request, relay)) as events:
                        async for event in events:
                            if event.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                                yield event._replace(placement=_placement_info(placement, placed, relay.transport,
                                                                               decode_id))
                                return
                            yield event
                except _WorkerLost as lost:
                    if attempt + 1 == MAX_DECODE_ATTEMPTS:
                        raise Unavailable(str(lost)) from lost
                    _failover_noted("decode", lost)
                    failed.add(decode_id)
                    decode_id = self._replacement_decode(job, failed)
                    held.enter_context(self._registry.track(decode_id, 0))
                    decode_request = _resumed(decode_request, relay.sent, _attempt_id(job))
                    if decode_request is None:  # every token was delivered; only the finish was lost
                        yield relay.finish(common_pb2.FINISH_REASON_LENGTH,
                                           _placement_info(placement, placed, relay.transport, decode_id))
                        return

    async def _decode(self, decode_id: str, request: decode_pb2.DecodeRequest, relay: "_Relay"):
        """Streams one decode attempt through relay, on the worker's decode session; raises
        _WorkerLost when the worker goes away. The attempt's span ends before the final event is
        handed on."""
        final = None
        with tracing.client_span("router.decode", {"pdmesh.worker_id": decode_id}) as span:
            relay.span = span
            stream = self._registry.decode_session(decode_id).decode(
                request, remaining(relay.job, relay.t0), tracing.outgoing_metadata())
            # aclosing: a consumer that stops early (client gone, stop string) closes this generator
            # at a yield; closing the session's stream then cancels the request, so the worker frees
            # the KV now.
            async with contextlib.aclosing(stream):
                try:
                    async for message in stream:
                        event = relay.push(message)
                        if event is not None and event.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                            final = event  # the worker's last message
                            break
                        if event is not None:
                            yield event
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in _LOST:
                        raise _WorkerLost(f"decode worker {decode_id} lost: {exc.code().name}: {exc.details()}") from exc
                    raise _worker_error("decode", decode_id, exc) from exc
        if final is None:
            raise _WorkerLost(f"decode worker {decode_id} ended the stream without a finish reason")
        yield final

    def _replacement_decode(self, job: GenerateJob, failed: set[str]) -> str:
        views = [v for v in self._registry.views() if v.worker_id not in failed]
        request = PlacementRequest(job.request_id, job.prompt, job.priority, self._registry.block_size)
        try:
            return self._profile.place(request, views, self._registry.index).decode.worker.worker_id
        except NoCandidates as exc:
            raise Unavailable(f"no decode worker left to continue the request after {sorted(failed)} failed") from exc

    def _place(self, job: GenerateJob):
        request = PlacementRequest(job.request_id, job.prompt, job.priority, self._registry.block_size)
        try:
            placement = self._profile.place(request, self._registry.table, self._registry.index)
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
        with tracing.client_span("router.prefill", {"pdmesh.worker_id": worker_id}) as span:
            try:
                response = await self._registry.prefill_stub(worker_id).Prefill(
                    request, timeout=timeout, metadata=tracing.outgoing_metadata())
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _LOST:
                    raise _WorkerLost(f"prefill worker {worker_id} lost: {exc.code().name}: {exc.details()}") from exc
                raise _worker_error("prefill", worker_id, exc) from exc
            tracing.set_attributes(span, {"pdmesh.prefill.cached_tokens": response.cached_tokens})
            return response


def _placement_info(placement, request: PlacementRequest, transport: str, decode_id: str = "") -> dict:
    """Where the request ran (decode_id: the worker that finished it, after any failover)."""
    prefill = placement.prefill
    return {"prefill_worker_id": prefill.worker.worker_id if prefill else "",
            "decode_worker_id": decode_id or placement.decode.worker.worker_id, "kv_transport": transport,
            "decision": "remote_prefill" if prefill else "local_prefill",
            "decision_reason": placement.decision.reason, "decode_scores": placement.decode.scores,
            "prefill_scores": prefill.scores if prefill else {},
            "decode_cached_tokens": request.cached_tokens(placement.decode.worker),
            "prefill_cached_tokens": request.cached_tokens(prefill.worker) if prefill else 0}


MAX_DECODE_ATTEMPTS = 3
# Status codes meaning the worker (or the connection to it) went away, not that the request is bad.
_LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


class _WorkerLost(Exception):
    """A worker died or vanished mid-request; the flow moves the request elsewhere."""


class _Relay:
    """What one request has relayed so far, across decode attempts: tokens sent (never resent),
    the detokenizer, timings and counters. push() turns a DecodeResponse into a RelayEvent."""

    def __init__(self, job: GenerateJob, t0: float, timings: common_pb2.PhaseTimings, detok,
                 on_first_token=lambda: None):
        self.job, self.t0, self.timings, self.detok = job, t0, timings, detok
        self._on_first_token = on_first_token  # admission: batch may go once live requests have a token
        self.sent: list[int] = []
        self.cached, self.transport, self.first_at, self.last_at = 0, "", None, 0.0
        self.span = None
        self._ttft, self._itl = metrics.TTFT.labels(job.priority), metrics.ITL.labels(job.priority)

    def _ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000

    def push(self, message: decode_pb2.DecodeResponse) -> RelayEvent | None:
        if message.HasField("stats"):  # (workers send it once; reading an unset one costs per token)
            stats = message.stats
            if stats.kv_transport:
                self.transport = stats.kv_transport
                self.timings.kv_transfer_ms = stats.kv_transfer_ms
            if stats.queue_ms and not self.sent:
                self.timings.decode_queue_ms = stats.queue_ms
            self.cached = self.cached or stats.cached_tokens
        now = self._ms()
        tokens = list(message.token_ids)
        if tokens:
            if self.first_at is None:
                self._on_first_token()
                self.first_at = self.timings.time_to_first_token_ms = now
                self._ttft.observe(now / 1000)
                self.span.add_event("first_token")
            else:
                self._itl.observe((now - self.last_at) / 1000)
            self.last_at = now
        self.sent += tokens
        text = self.detok.push(tokens)
        if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            return self.finish(message.finish_reason, None, tokens, text)
        return RelayEvent(tokens, text) if tokens or text else None

    def finish(self, reason: int, placement: dict | None, tokens: list[int] = (), text: str = "") -> RelayEvent:
        now, job, timings = self._ms(), self.job, self.timings
        timings.decode_ms = now - (self.first_at or now)
        timings.total_ms = now
        metrics.E2E.labels(job.priority).observe(now / 1000)
        metrics.ROUTER_PROMPT_TOKENS.labels("true").inc(self.cached)
        metrics.ROUTER_PROMPT_TOKENS.labels("false").inc(len(job.prompt) - self.cached)
        if self.span is not None:
            tracing.set_attributes(self.span, {"pdmesh.kv.transport": self.transport or None,
                                               "gen_ai.usage.output_tokens": len(self.sent)})
        usage = common_pb2.Usage(prompt_tokens=len(job.prompt), completion_tokens=len(self.sent),
                                 cached_prompt_tokens=self.cached)
        return RelayEvent(list(tokens), text, reason, usage, timings, placement)


def _resumed(request: decode_pb2.DecodeRequest, sent: list[int], request_id: str) -> decode_pb2.DecodeRequest | None:
    """The request for the next decode worker: the same one if nothing was delivered yet (its KV
    handle may still be pullable; if not, that worker recomputes the prompt), else the prompt plus
    the tokens delivered, to be continued from there. None when nothing is left to generate."""
    if len(sent) >= request.max_tokens:
        return None
    resumed = decode_pb2.DecodeRequest()
    resumed.CopyFrom(request)
    resumed.request_id = request_id
    if sent:
        resumed.ClearField("kv_handle")
        resumed.first_token_id = 0
        resumed.resume_token_ids[:] = sent
    return resumed


def _attempt_id(job: GenerateJob) -> str:
    """The id workers see: unique per attempt, so a client reusing its own id never collides."""
    return f"{job.request_id}.{random_hex(8)}"


def _failover_noted(phase: str, lost: Exception) -> None:
    log.warning("%s; moving the request", lost)
    metrics.FAILOVERS.labels(phase).inc()
    tracing.add_event("failover", {"pdmesh.failover.phase": phase, "exception.message": str(lost)})


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
