"""DecodeService servicer: proto <-> domain, and domain errors -> status codes (once)."""

import asyncio
import contextlib
import time

from kvtransfer.handle import KvHandle
from pdmesh.v1 import decode_pb2, decode_pb2_grpc
from services.common import tracing
from services.common.convert import (FINISH_REASONS, check_max_tokens, check_token_ids, priority_from_proto,
                                     sampling_from_proto)
from services.common.errors import InvalidArgument, abort_with, status_for, status_parts
from services.common.metrics import REQUESTS
from services.decode.decode_worker import DecodeJob, DecodeWorker


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, worker: DecodeWorker, vocab_size: int, max_model_len: int):
        self._worker = worker
        self._vocab_size = vocab_size
        self._max_model_len = max_model_len

    def _job(self, request, deadline: float | None, fallback_id: str) -> DecodeJob:
        prompt = check_token_ids(request.prompt_token_ids, self._vocab_size, self._max_model_len - 1)
        max_tokens = check_max_tokens(request.max_tokens, self._max_model_len - len(prompt))
        handle = KvHandle.from_proto(request.kv_handle) if request.HasField("kv_handle") else None
        if handle is not None:
            if request.first_token_id >= self._vocab_size:
                raise InvalidArgument(f"first_token_id {request.first_token_id} is not a known token id")
            if handle.num_tokens != len(prompt):
                raise InvalidArgument(f"kv_handle holds {handle.num_tokens} tokens but the prompt has {len(prompt)}")
            if handle.engine_kv_params:
                handle.engine_kv_params_dict()  # ValueError (INVALID_ARGUMENT) unless a JSON object
        if handle is not None and request.resume_token_ids:
            raise InvalidArgument("resume_token_ids cannot be combined with kv_handle: a resumed request is "
                                  "prefilled here")
        return DecodeJob(request.request_id or fallback_id, prompt, sampling_from_proto(request.sampling),
                         max_tokens, request.ignore_eos, handle,
                         request.first_token_id if handle is not None else None, deadline,
                         priority_from_proto(request.priority), tuple(request.resume_token_ids))

    async def Decode(self, request, context):
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            async with contextlib.aclosing(self.responses(request, context.invocation_metadata(), deadline,
                                                          context.peer(), "Decode")) as responses:
                async for response in responses:
                    yield response
        except Exception as exc:
            await abort_with(context, exc)

    async def DecodeSession(self, request_iterator, context):
        session = _Session(self, context.peer())
        reader = asyncio.create_task(session.read(request_iterator))
        try:
            async for response in session.responses():
                yield response
        finally:
            reader.cancel()
            await session.cancel_all()

    async def responses(self, request, metadata, deadline: float | None, fallback_id: str, method: str):
        """The DecodeResponses of one request; raises what failed it (the caller makes it a status)."""
        code = "OK"
        with tracing.server_span("decode", metadata,
                                 {"pdmesh.request_id": request.request_id,
                                  "gen_ai.usage.input_tokens": len(request.prompt_token_ids),
                                  "pdmesh.decode.pulls_kv": request.HasField("kv_handle")}):
            try:
                job = self._job(request, deadline, fallback_id)
                async with contextlib.aclosing(self._worker.decode(job)) as events:
                    async for event in events:
                        yield decode_pb2.DecodeResponse(
                            token_ids=event.token_ids, finish_reason=FINISH_REASONS[event.finish_reason],
                            stats=_stats(event.transfer))
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = status_for(exc).name
                raise
            finally:
                REQUESTS.labels("decode", method, code).inc()


class _Session:
    """One DecodeSession stream: a task per request, their events sent in as few messages as are
    ready. Ends when the caller has closed its side and every request it started has ended."""

    def __init__(self, servicer: DecodeServicer, peer: str):
        self._servicer, self._peer = servicer, peer
        self._tasks: dict[int, asyncio.Task] = {}
        self._events: list[decode_pb2.DecodeSessionEvent] = []
        self._ready = asyncio.Event()
        self._reading = True

    async def read(self, requests) -> None:
        try:
            async for message in requests:
                for call in message.calls:
                    if call.stream_id in self._tasks:
                        self._push(_failure(call.stream_id, InvalidArgument(
                            f"stream_id {call.stream_id} is already in flight in this session")))
                        continue
                    self._tasks[call.stream_id] = asyncio.create_task(self._run(call))
                for stream_id in message.cancel_stream_ids:
                    task = self._tasks.pop(stream_id, None)
                    if task is not None:
                        task.cancel()
        finally:
            self._reading = False
            self._ready.set()

    async def responses(self):
        while self._reading or self._tasks or self._events:
            await self._ready.wait()
            self._ready.clear()
            if self._events:
                events, self._events = self._events, []
                yield decode_pb2.DecodeSessionResponse(events=events)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _push(self, event: decode_pb2.DecodeSessionEvent) -> None:
        self._events.append(event)
        self._ready.set()

    async def _run(self, call: decode_pb2.DecodeSessionCall) -> None:
        stream_id = call.stream_id
        timeout_s = call.timeout_ms / 1000 if call.timeout_ms else None
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        limit = asyncio.timeout(timeout_s)
        try:
            async with limit:
                async with contextlib.aclosing(self._servicer.responses(
                        call.request, dict(call.trace_context), deadline, self._peer, "DecodeSession")) as responses:
                    async for response in responses:
                        self._push(decode_pb2.DecodeSessionEvent(stream_id=stream_id, response=response))
        except Exception as exc:
            failure = TimeoutError(f"deadline of {call.timeout_ms} ms exceeded") if limit.expired() else exc
            self._push(_failure(stream_id, failure))
        finally:
            if self._tasks.get(stream_id) is asyncio.current_task():
                del self._tasks[stream_id]
            self._ready.set()


def _failure(stream_id: int, exc: BaseException) -> decode_pb2.DecodeSessionEvent:
    code, message, retry = status_parts(exc)
    return decode_pb2.DecodeSessionEvent(stream_id=stream_id, status_code=code.value[0], status_message=message,
                                         retry_after_ms=int(retry * 1000) if retry is not None else 0)


def _stats(info) -> decode_pb2.DecodeStats | None:
    if info is None:
        return None
    return decode_pb2.DecodeStats(kv_transfer_ms=info.ms, kv_transfer_bytes=info.num_bytes, kv_transport=info.transport,
                                  local_prefill_tokens=info.local_prefill_tokens, cached_tokens=info.cached_tokens,
                                  queue_ms=info.queue_ms)
