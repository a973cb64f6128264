"""The router's end of DecodeSession: one stream per decode worker carries all its requests.

Per request, a Decode call costs both ends a call's set-up, headers and status, and each token a
message of its own; on a session a request is one entry in a shared message each way, and tokens
of many requests that are ready together travel in one message. The worker's core, which the
model needs, is where this matters most (bench.router_overhead).

A request's events arrive on its own queue. A failure event becomes the AioRpcError its Decode
call would have raised (same code, message and retry-after-ms), so callers handle both alike; a
session that breaks or ends fails every request in flight on it with UNAVAILABLE (the worker went
away: the request flow fails them over), and the next request opens a new session.

A worker that does not know DecodeSession (UNIMPLEMENTED: an older version, mid rolling upgrade)
is served one Decode call per request, and asked again for a session a minute later.
"""

import asyncio
import itertools
import logging
import time

import grpc

from pdmesh.v1 import common_pb2, decode_pb2

log = logging.getLogger(__name__)

MAX_CALLS_PER_MESSAGE = 64  # requests sent together at most (a message must stay far below 64 MiB)
PER_CALL_RETRY_S = 60.0  # after UNIMPLEMENTED, Decode calls for this long before a session is tried again


class DecodeSession:
    """Requests to one decode worker over its DecodeSession stream, opened on first use."""

    def __init__(self, stub, name: str = ""):
        self._stub, self._name = stub, name
        self._live: _Live | None = None
        self._ids = itertools.count(1)
        self._closing = False
        self._per_call_until = 0.0  # time.monotonic() until which requests go as Decode calls

    @property
    def in_flight(self) -> int:
        return len(self._live.inboxes) if self._live else 0

    async def decode(self, request: decode_pb2.DecodeRequest, timeout: float | None = None, trace_context=()):
        """The DecodeResponses of one request, as a Decode call would stream them; raises
        grpc.aio.AioRpcError as that call would. Closing the generator early cancels the request."""
        if time.monotonic() < self._per_call_until:
            async for response in self._decode_call(request, timeout, trace_context):
                yield response
            return
        live = self._open()
        stream_id = next(self._ids)
        inbox: asyncio.Queue = asyncio.Queue()
        live.inboxes[stream_id] = inbox
        live.send(decode_pb2.DecodeSessionCall(stream_id=stream_id, request=request, trace_context=dict(trace_context),
                                               timeout_ms=_ms(timeout)))
        ended = unimplemented = False
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await inbox.get()
                    if isinstance(event, grpc.aio.AioRpcError):
                        ended = True
                        if event.code() == grpc.StatusCode.UNIMPLEMENTED:  # the worker never saw the request
                            unimplemented = True
                            break
                        raise event
                    if event.status_code:
                        ended = True
                        raise _error(_CODES.get(event.status_code, grpc.StatusCode.UNKNOWN), event.status_message,
                                     event.retry_after_ms)
                    ended = event.response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                    yield event.response
                    if ended:
                        return
        except TimeoutError:
            ended = False  # the worker may still be at it: cancel below
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {timeout:.3f} s exceeded") from None
        finally:
            live.inboxes.pop(stream_id, None)
            if not ended and not live.broken:
                live.cancel(stream_id)
            if self._closing and not live.inboxes:
                live.close()
        if unimplemented:
            log.warning("decode worker %s has no DecodeSession: one Decode call per request for %.0f s", self._name,
                        PER_CALL_RETRY_S)
            self._per_call_until = time.monotonic() + PER_CALL_RETRY_S
            async for response in self._decode_call(request, timeout, trace_context):
                yield response

    async def _decode_call(self, request: decode_pb2.DecodeRequest, timeout: float | None, trace_context):
        call = self._stub.Decode(request, timeout=timeout, metadata=tuple(trace_context))
        try:
            async for response in call:
                yield response
        finally:
            if not call.done():
                call.cancel()

    def close_when_idle(self) -> None:
        """End the session once the requests in flight have ended (the worker is no longer used)."""
        self._closing = True
        if self._live is not None and not self._live.inboxes:
            self._live.close()

    def _open(self) -> "_Live":
        if self._live is None or self._live.broken or self._live.closed:
            self._live = _Live(self._stub, self._name)
        return self._live


class _Live:
    """One DecodeSession call: its outgoing queue, its reader and the inboxes of its requests."""

    def __init__(self, stub, name: str):
        self.name = name
        self.inboxes: dict[int, asyncio.Queue] = {}
        self.broken = self.closed = False
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._call = stub.DecodeSession(self._requests())
        self._reader = asyncio.create_task(self._read())

    def send(self, call: decode_pb2.DecodeSessionCall) -> None:
        self._outbox.put_nowait(call)

    def cancel(self, stream_id: int) -> None:
        self._outbox.put_nowait(stream_id)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._outbox.put_nowait(None)

    async def _requests(self):
        while True:
            item = await self._outbox.get()
            message = decode_pb2.DecodeSessionRequest()
            while item is not None:
                if isinstance(item, int):
                    message.cancel_stream_ids.append(item)
                else:
                    message.calls.append(item)
                if self._outbox.empty() or len(message.calls) >= MAX_CALLS_PER_MESSAGE:
                    break
                item = self._outbox.get_nowait()
            if message.calls or message.cancel_stream_ids:
                yield message
            if item is None:
                return

    async def _read(self) -> None:
        reason, code = "the worker ended the session", grpc.StatusCode.UNAVAILABLE
        try:
            async for message in self._call:
                for event in message.events:
                    inbox = self.inboxes.get(event.stream_id)
                    if inbox is not None:
                        inbox.put_nowait(event)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                code = exc.code()
        except asyncio.CancelledError:
            reason = "the router closed the session"
            raise
        finally:
            self.broken = True
            if self.inboxes and code != grpc.StatusCode.UNIMPLEMENTED:
                log.warning("decode session to %s lost with %d requests in flight: %s", self.name, len(self.inboxes),
                            reason)
            lost = _error(code, f"decode session to {self.name} lost: {reason}")
            for inbox in self.inboxes.values():
                inbox.put_nowait(lost)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _error(code: grpc.StatusCode, details: str, retry_after_ms: int = 0) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(("retry-after-ms", str(retry_after_ms))) if retry_after_ms else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def _ms(timeout: float | None) -> int:
    return 0 if timeout is None else max(1, int(timeout * 1000))
