"""The one server builder (services/common/server.py) on a real grpc.aio server on port 0: every
handler registered through it, by name or only through a generic handler, answers a request that
does not parse with INVALID_ARGUMENT naming the message type, and still serves good requests."""

import asyncio
import gc
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2

from services.common.server import start_server

SERVICE = "test.Echo"


class _Echo:
    async def Say(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckRequest:
        return health_pb2.HealthCheckRequest(service=f"echo {request.service}")


def _add_generic_only(servicer: _Echo, server) -> None:
    """Registers like hand-written code may: a generic handler alone, no registered method."""
    handlers = {"Say": grpc.unary_unary_rpc_method_handler(
        servicer.Say, request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckRequest.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def test_undecodable_requests_are_invalid_argument_on_registered_and_generic_handlers():
    async def scenario():
        running = await start_server(lambda port: [(_add_generic_only, _Echo(), SERVICE)], "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                outcomes = {}
                for method in ("/grpc.health.v1.Health/Check", f"/{SERVICE}/Say"):
                    try:
                        await channel.unary_unary(method)(b"\xff\xff\xff", timeout=10)
                        outcomes[method] = ("OK", "")
                    except grpc.aio.AioRpcError as exc:
                        outcomes[method] = (exc.code().name, exc.details())
                good = await channel.unary_unary(
                    f"/{SERVICE}/Say", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckRequest.FromString)(
                        health_pb2.HealthCheckRequest(service="hi"), timeout=10)
                health = await channel.unary_unary(
                    "/grpc.health.v1.Health/Check", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString)(
                        health_pb2.HealthCheckRequest(), timeout=10)
                return outcomes, good, health
        finally:
            await running.server.stop(0)

    outcomes, good, health = asyncio.run(scenario())
    assert outcomes["/grpc.health.v1.Health/Check"][0] == "INVALID_ARGUMENT"
    assert "grpc.health.v1.HealthCheckRequest" in outcomes["/grpc.health.v1.Health/Check"][1]
    assert outcomes[f"/{SERVICE}/Say"][0] == "INVALID_ARGUMENT"
    assert good.service == "echo hi"
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_freeze_startup_heap_takes_the_startup_objects_out_of_collection():
    probe = ("import gc; import services.common.server as s; before = len(gc.get_objects()); "
             "s.freeze_startup_heap(); print(before, gc.get_freeze_count(), len(gc.get_objects()))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    before, frozen, tracked_after = map(int, out.stdout.split())
    assert frozen >= before * 0.9 and tracked_after < before * 0.1
    assert gc.get_freeze_count() == 0  # this process was left alone
