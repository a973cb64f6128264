"""The one way to build a pdmesh gRPC server: grpc.aio, standard health and reflection, a bound
port reported back (port 0 works), and graceful drain on SIGTERM/SIGINT.

Drain order on a stop signal: health flips to NOT_SERVING (so probes and routers stop sending
new work), then `server.stop(grace)` lets streams already accepted run to their end.
"""

import asyncio
import gc
import inspect
import json
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

# KV chunks and long prompts exceed gRPC's 4 MiB default; 64 MiB is the hard cap per message.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Servers accept a client's keepalive pings as often as every 5 s, with or without calls (the
# router pings its workers every 10 s: services.router.workers); the default (5 min) would answer
# them with GOAWAY "too_many_pings".
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
]

# (add_XServicer_to_server, servicer instance, full service name)
ServiceBinding = tuple[Callable, object, str]


def guard_undecodable(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A request that does not parse (random bytes, invalid UTF-8 in a string field) is answered
    with INVALID_ARGUMENT naming the message type; gRPC alone answers UNKNOWN. Unary-request
    async methods only (every pdmesh RPC); the servicer never sees the bad request. Applied once
    when a handler is registered (_GuardingServer), not per call: a grpc.aio server interceptor
    runs its chain on every RPC (measured here: 0.1-0.3 ms of CPU per streaming RPC)."""
    if handler.request_streaming or handler.request_deserializer is None:
        return handler
    behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler
    guarded = {"unary_stream" if handler.response_streaming else "unary_unary": _reject_undecodable(behavior)}
    return handler._replace(request_deserializer=_tolerant(handler.request_deserializer), **guarded)


class _GuardingServer:
    """The server as generated add_XServicer_to_server functions see it: every method handler
    they register goes through guard_undecodable first."""

    def __init__(self, server: grpc.aio.Server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(
            service_name, {method: guard_undecodable(h) for method, h in handlers.items()})


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    """The lookup gRPC falls back to for methods not registered by name."""

    def __init__(self, inner: grpc.GenericRpcHandler):
        self._inner = inner

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        return None if handler is None else guard_undecodable(handler)


class _Undecodable(str):
    """What _tolerant hands on in place of a request that did not parse: the reason."""


def _tolerant(deserialize):
    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError, or anything a custom deserializer raises
            return _Undecodable(f"the request is not a valid {_type_name(deserialize)} message: {exc}")
    return parse


def _type_name(deserialize) -> str:
    owner = getattr(deserialize, "__self__", None)
    return getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "protobuf")


def _reject_undecodable(behavior):
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
            async for response in behavior(request, context):
                yield response
        return stream

    async def unary(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        return await behavior(request, context)
    return unary


class HealthServicer(health_aio.HealthServicer):
    """grpc's health servicer, but an unknown service name is answered with a message naming the
    known ones (the stock servicer sends NOT_FOUND with an empty message)."""

    async def Check(self, request, context):
        if request.service not in self._server_status:
            known = ", ".join(repr(name) for name in sorted(self._server_status))
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}; known: {known}")
        return await super().Check(request, context)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    service_names: list[str]

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def drain_and_stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_server(make_bindings: Callable[[int], Iterable[ServiceBinding]], host: str, port: int,
                       tls=None) -> RunningServer:
    """Binds host:port (0 picks a free port), then asks make_bindings(bound_port) for the services
    (servicers that advertise their own address need the port), adds health and reflection, starts.
    tls: a services.common.tls.TlsConfig (mutual TLS: clients need a certificate from its CA), or
    None for plaintext."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    if tls is not None:
        from services.common.tls import server_credentials
        bound = server.add_secure_port(f"{host}:{port}", server_credentials(tls))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    names = []
    guarding = _GuardingServer(server)
    for add_to_server, servicer, name in make_bindings(bound):
        add_to_server(servicer, guarding)
        names.append(name)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, guarding)
    reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    await server.start()
    running = RunningServer(server, health, bound, names)
    await running.set_serving(True)
    return running


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call from inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def freeze_startup_heap() -> None:
    """Call once start-up is done: the objects built so far (torch, protobuf descriptors, the web
    framework: over 200,000 in the router) leave the garbage collector's generations, so a full
    collection no longer walks them all, a 60-200 ms pause of the event loop here that landed in
    the latency tail of every stream in flight."""
    gc.collect()
    gc.freeze()


def announce_ready(ready_file: str | None, **facts) -> None:
    """Tell a launcher where we listen: one JSON line on stdout and, atomically, in ready_file."""
    line = json.dumps({"event": "ready", **facts})
    print(line, flush=True)
    if ready_file:
        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, ready_file)


def configure_logging(service: str) -> None:
    level = os.environ.get("PDMESH_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
