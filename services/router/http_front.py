"""The OpenAI-compatible HTTP front: FastAPI on uvicorn, in the router's own event loop, calling
the same `RouterServicer.generate()` the gRPC front calls (one request path, no extra hop).

    POST /v1/completions, POST /v1/chat/completions   (stream=true: server-sent events)
    GET  /v1/models, GET /health (liveness), GET /ready (pools reachable)

Headers: `Authorization: Bearer KEY` when API keys are configured; `x-pdmesh-priority:
interactive|batch`; `x-pdmesh-tenant: ID`; `x-request-id` (echoed); `traceparent`/`tracestate`
continue the caller's trace. Errors are OpenAI-shaped with the status from http_errors' table;
an error after a stream started is sent as a `data: {"error": ...}` event, then the stream ends.

A stream is relayed as it is produced (one SSE event per text delta, never buffered). When the
client goes away, Starlette cancels the response task; the cancellation runs through
`generate()` into the decode worker's stream, which frees the request's KV. A stop string ends
the mesh's stream the same way (the relay closes it).
"""

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

import grpc
import pydantic
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse

from pdmesh.v1 import common_pb2, router_pb2
from services.common.errors import InvalidArgument
from services.common.ids import random_hex
from services.common.tracing import TRACE_ID_HEADER
from services.router.auth import ApiKeys
from services.router.chat_template import ChatTemplate
from services.router.http_errors import ErrorReply, reply_for_code, reply_for_exception
from services.router.openai_protocol import (FINISH_REASONS, ChatCompletionRequest, ChunkMaker, CompletionRequest,
                                             chat_body, completion_body, usage_dict)
from services.router.server import RouterServicer
from services.router.stop_strings import StopMatcher

log = logging.getLogger(__name__)

PRIORITY_HEADER, TENANT_HEADER, REQUEST_ID_HEADER = "x-pdmesh-priority", "x-pdmesh-tenant", "x-request-id"
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
_PRIORITIES = {"interactive": common_pb2.PRIORITY_CLASS_INTERACTIVE, "batch": common_pb2.PRIORITY_CLASS_BATCH}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SSE_RAW_HEADERS = tuple((name.lower().encode(), value.encode()) for name, value in _SSE_HEADERS.items())  # as sent
_SSE_CONTENT_TYPE = (b"content-type", b"text/event-stream; charset=utf-8")
_SSE_END = b"data: [DONE]\n\n"  # every event stream ends with it (_events); _stream spots it


class FrontSettings(NamedTuple):
    served_model_name: str
    max_model_len: int
    max_tokens_cap: int
    api_keys: ApiKeys = ApiKeys()


class ApiError(Exception):
    def __init__(self, reply: ErrorReply):
        super().__init__(reply.body["error"]["message"])
        self.reply = reply


def trace_metadata(headers) -> dict[str, str]:
    """The W3C trace context of an HTTP request, as the metadata dict generate() takes (lower-case keys)."""
    return {name: headers[name] for name in TRACE_HEADERS if name in headers}


def priority_from(headers) -> int:
    value = headers.get(PRIORITY_HEADER)
    if value is None:
        return common_pb2.PRIORITY_CLASS_INTERACTIVE
    try:
        return _PRIORITIES[value.strip().lower()]
    except KeyError:
        raise InvalidArgument(f"{PRIORITY_HEADER} must be one of {', '.join(_PRIORITIES)}, got {value!r}") from None


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body), status, headers, media_type="application/json")


def error_response(reply: ErrorReply, headers: dict | None = None) -> Response:
    return json_response(reply.body, reply.status, {**reply.headers, **(headers or {})})


def sse(payload: dict) -> bytes:
    """One server-sent event carrying payload as JSON, encoded."""
    return f"data: {json.dumps(payload)}\n\n".encode()


class Relay:
    """The mesh's responses for one request as (text, finish_reason) pieces, stop strings applied.

    Counts usage as tokens arrive (a stop string ends the stream before the mesh's final message),
    and closes the mesh's stream whenever it ends early, so the workers free the KV at once.
    """

    def __init__(self, responses, stop: StopMatcher, prompt_tokens: int):
        self._responses, self._stop = responses, stop
        self.usage = usage_dict(prompt_tokens, 0, 0)

    async def pieces(self):
        """Yields a piece per response with text, the first token's even without text (so the client
        sees the first token at once), and the finish; returns after the finish."""
        completion = 0
        try:
            async for response in self._responses:
                completion += len(response.token_ids)
                text = self._stop.push(response.text_delta)
                finish = "stop" if self._stop.stopped else None
                if finish is None and response.finish_reason:
                    text += self._stop.flush()
                    finish = FINISH_REASONS.get(response.finish_reason, "stop")
                    u = response.usage
                    self.usage = usage_dict(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
                else:
                    self.usage = usage_dict(self.usage["prompt_tokens"], completion, 0)
                if text or finish or completion == len(response.token_ids):
                    yield text, finish
                if finish:
                    return
        finally:
            await self._responses.aclose()


class OpenAIFront:
    def __init__(self, servicer: RouterServicer, template: ChatTemplate, settings: FrontSettings,
                 is_ready: Callable[[], bool]):
        self._servicer, self._template, self.settings, self.is_ready = servicer, template, settings, is_ready

    async def check_auth(self, request: Request) -> None:
        try:
            self.settings.api_keys.tenant_of(request.headers.get("authorization"))
        except Exception as exc:
            raise ApiError(reply_for_exception(exc)) from None

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.settings.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "pdmesh", "max_model_len": self.settings.max_model_len}]}

    async def serve(self, body: CompletionRequest | ChatCompletionRequest, request: Request) -> "Response | SseStream":
        chat = isinstance(body, ChatCompletionRequest)
        request_id = request.headers.get(REQUEST_ID_HEADER) or random_hex()
        echo = {REQUEST_ID_HEADER: request_id}
        try:
            model = self._check_model(body.model)
            body.check_supported()
            stop = StopMatcher(body.stop_strings())
            ids = await self._prompt_ids(body)
            cap = min(self.settings.max_tokens_cap, self.settings.max_model_len - len(ids))
            generate_request = router_pb2.GenerateRequest(
                token_ids=common_pb2.TokenIds(ids=ids), sampling=body.sampling(),
                max_tokens=body.max_tokens_for(len(ids), cap), priority=priority_from(request.headers),
                tenant_id=self.settings.api_keys.authorize(request.headers.get("authorization"),
                                                  request.headers.get(TENANT_HEADER, "")),
                request_id=request_id, ignore_eos=body.ignore_eos)
            async def note_trace_id(trace_id: str) -> None:  # before the first event: it goes in the headers
                echo[TRACE_ID_HEADER] = trace_id

            relay = Relay(self._servicer.generate(generate_request, None, trace_metadata(request.headers),
                                                  note_trace_id), stop, len(ids))
            pieces = relay.pieces()
            first = await anext(pieces)  # errors before the first token keep their own HTTP status
        except ApiError as exc:
            return error_response(exc.reply, echo)
        except Exception as exc:
            return error_response(reply_for_exception(exc), echo)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        if body.stream:
            chunks = ChunkMaker(chat, response_id, model, body.include_usage())
            return SseStream(echo, _events(first, pieces, relay, chunks))
        try:
            text, finish = await _collect(first, pieces)
        except Exception as exc:
            return error_response(reply_for_exception(exc), echo)
        make = chat_body if chat else completion_body
        return json_response(make(response_id, model, text, finish, relay.usage), headers=echo)

    def _check_model(self, model: str | None) -> str:
        served = self.settings.served_model_name
        if model and model != served:
            raise ApiError(reply_for_code(grpc.StatusCode.NOT_FOUND, f"the model `{model}` does not exist; this "
                                          f"server serves `{served}` (see GET /v1/models)", param="model",
                                          error_code="model_not_found"))
        return served

    async def _prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        if isinstance(body, ChatCompletionRequest):
            # The template writes its own <bos>; add none.
            return await self._servicer.tokenize(self._template.render(body.message_dicts()), add_bos=False)
        prompt = body.prompt_text_or_ids()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgument("prompt is empty: send text or at least one token id")
            return await self._servicer.tokenize(prompt)
        return prompt


class SseStream(NamedTuple):
    """A stream whose first token has arrived: the headers to echo and its events (bytes, each one
    write; the last ends with [DONE])."""
    echo: dict[str, str]
    events: AsyncIterator[bytes]

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """What Starlette's StreamingResponse would send for it, in the same order."""
        echoed = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in self.echo.items()]
        return [*_SSE_RAW_HEADERS, *echoed, _SSE_CONTENT_TYPE]

    def response(self) -> StreamingResponse:
        return StreamingResponse(self.events, media_type="text/event-stream", headers={**_SSE_HEADERS, **self.echo})


async def _events(first: tuple[str, str | None], pieces, relay: Relay, chunks: ChunkMaker):
    """The SSE body: one event per piece, usage if asked, then [DONE]; an error mid-stream is an event too."""
    try:
        event, finish = sse(chunks.piece(*first, first=True)), first[1]
        while finish is None:  # Relay ends every stream with a finish piece (or raises)
            yield event
            text, finish = await anext(pieces)
            event = sse(chunks.piece(text, finish))
        # The last piece, the usage and [DONE] are known together: one write (each write is a syscall).
        yield event + (sse(chunks.usage(relay.usage)) if chunks.include_usage else b"") + _SSE_END
    except Exception as exc:
        log.warning("stream failed after it started: %s", exc)
        yield sse(reply_for_exception(exc).body) + _SSE_END
    finally:
        await pieces.aclose()


async def _collect(first: tuple[str, str | None], pieces) -> tuple[str, str]:
    texts, finish = [first[0]], first[1]
    async for text, finish in pieces:
        texts.append(text)
    return "".join(texts), finish


# ---- the app -------------------------------------------------------------------------------------

def create_app(front: OpenAIFront):
    """The ASGI app: the two generation endpoints served by _GenerationRoutes, the rest by FastAPI."""
    app = FastAPI(title="pdmesh OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    auth = Depends(front.check_auth)

    # POSTs to the generation paths never reach FastAPI (see _GenerationRoutes); routed here as
    # well, the app alone serves them the same way and other methods on the paths are answered 405.
    for path, model in _GenerationRoutes.ROUTES.items():
        app.add_api_route(path, _generation_endpoint(front, model), methods=["POST"])

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> Response:
        return json_response(front.models())

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if front.is_ready():
            return json_response({"status": "ready"})
        return json_response({"status": "not ready: the router cannot reach its decode/prefill pools (yet)"}, 503)

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    return _GenerationRoutes(front, app)


class _GenerationRoutes:
    """POST /v1/completions and /v1/chat/completions straight to the front; every other request
    to FastAPI. The hot endpoints skip Starlette's middleware stack, routing and the task group
    its StreamingResponse starts per response (about 0.13 ms of router CPU per request here);
    their bodies are validated in one pass by pydantic-core (the request schemas are the models
    in openai_protocol)."""

    ROUTES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}

    def __init__(self, front: OpenAIFront, app: FastAPI):
        self.front, self.app = front, app

    async def __call__(self, scope, receive, send) -> None:
        model = self.ROUTES.get(scope.get("path")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if model is None:
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        try:
            await self.front.check_auth(request)
            response = await self.front.serve(_parse(model, await request.body()), request)
        except ApiError as exc:
            response = error_response(exc.reply)
        if isinstance(response, SseStream):
            await _stream(response, receive, send)
        else:
            await response(scope, receive, send)


def _generation_endpoint(front: OpenAIFront, model):
    """The FastAPI endpoint serving a POST whose body is a `model` (what _GenerationRoutes does)."""
    async def endpoint(request: Request) -> Response:
        await front.check_auth(request)
        response = await front.serve(_parse(model, await request.body()), request)
        return response.response() if isinstance(response, SseStream) else response
    return endpoint


async def _stream(stream: SseStream, receive, send) -> None:
    """Sends the stream's events as they are produced. The client going away cancels the sending
    (as Starlette's task group would): the cancellation closes the events, which closes the mesh's
    stream and frees the request's KV at once."""
    task, state, listener = asyncio.current_task(), {"streaming": True, "gone": False}, None

    def on_disconnect(listener: asyncio.Future) -> None:
        # Only while the body is being sent: once it is, uvicorn answers the pending receive() with
        # a disconnect too, and a cancel then would hit whatever the server's task does next.
        if state["streaming"] and not listener.cancelled() and listener.exception() is None:
            state["gone"] = True
            task.cancel()

    events = stream.events
    try:
        await send({"type": "http.response.start", "status": 200, "headers": stream.raw_headers()})
        body = await anext(events)  # ready: the first token is in (serve waited for it)
        while not body.endswith(_SSE_END):  # the stream's last event: one write with the chunked terminator
            await send({"type": "http.response.body", "body": body, "more_body": True})
            if listener is None:  # watching from the first event on keeps its task off the first token's path
                listener = asyncio.ensure_future(_until_disconnect(receive))
                listener.add_done_callback(on_disconnect)
            body = await anext(events)
        state["streaming"] = False
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()  # our own cancel: the client left, the response is over
    finally:
        state["streaming"] = False
        if listener is not None:
            listener.remove_done_callback(on_disconnect)
            listener.cancel()
        await events.aclose()


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _parse(model, body: bytes):
    try:
        return model.model_validate_json(body or b"{}")
    except pydantic.ValidationError as exc:
        raise ApiError(_invalid_request(exc.errors(include_url=False))) from None


async def _api_error(_: Request, exc: ApiError) -> Response:
    return error_response(exc.reply)


async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    return error_response(_invalid_request(exc.errors()))


def _invalid_request(errors) -> ErrorReply:
    """pydantic's errors (FastAPI would answer 422) become OpenAI's 400 with a message naming the field."""
    if errors and errors[0].get("type") == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error", "")
        return reply_for_code(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is not valid JSON: {reason}".rstrip(": "))
    where = lambda e: ".".join(str(part) for part in e["loc"] if part != "body") or "body"  # noqa: E731
    message = "; ".join(f"{where(e)}: {e['msg']}" for e in errors[:3])
    param = where(errors[0]) if errors else None
    return reply_for_code(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {message}", param=param)


async def _http_error(_: Request, exc: HTTPException) -> Response:
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    body = {"error": {"message": str(exc.detail), "type": kinds.get(exc.status_code, "invalid_request_error"),
                      "param": None, "code": None}}
    return json_response(body, exc.status_code, dict(exc.headers or {}))


# ---- the server ----------------------------------------------------------------------------------

class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """No-op: the router owns SIGTERM/SIGINT and stops both fronts in its drain order."""
        yield


class RunningHttp(NamedTuple):
    server: uvicorn.Server
    task: asyncio.Task
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self, grace_s: float) -> None:
        """Stops accepting, lets open responses finish for up to grace_s, then cancels them."""
        self.server.config.timeout_graceful_shutdown = grace_s
        self.server.should_exit = True
        await self.task


async def start_http(app: FastAPI, host: str, port: int) -> RunningHttp:
    """Serves `app` on host:port (0 picks a free port) in the running event loop."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it Nagle holds each SSE event until the client's delayed ACK (~40 ms per event).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"HTTP front could not bind {host}:{port}: {exc}") from exc
    config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False, log_level="warning",
                            backlog=2048, proxy_headers=False, server_header=False)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("HTTP front stopped during startup")
        await asyncio.sleep(0.01)
    return RunningHttp(server, task, host, sock.getsockname()[1])
