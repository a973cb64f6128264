"""A gRPC relay that does nothing but relay: every unary-stream call it takes is forwarded to one
target as it came (method, bytes; no parsing, no metadata), and the answers go back the same way.
bench.router_overhead puts it where the router sits, to show what one Python grpc.aio hop costs
by itself in the same layout when every request is a call of its own.

With --session it relays DecodeService.Decode calls the way the router reaches a decode worker:
each call becomes one request on a single DecodeSession stream to the target (the router's own
services.router.decode_session), and its responses are streamed back. That is the router's hop
with nothing of the router's own work (no tokenizing, placement, admission or metrics).

    python -m bench.grpc_relay --target HOST:PORT [--port 0] [--session]

Prints `RELAY <port>` on stdout once it listens.
"""

import argparse
import asyncio

import grpc


def _same(data: bytes) -> bytes:
    return data


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel):
        self._channel = channel
        self._methods: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method not in self._methods:
            call = self._channel.unary_stream(method, request_serializer=_same, response_deserializer=_same)

            async def forward(request: bytes, context):
                async for response in call(request, timeout=context.time_remaining()):
                    yield response
            self._methods[method] = grpc.unary_stream_rpc_method_handler(
                forward, request_deserializer=_same, response_serializer=_same)
        return self._methods[method]


def _session_handler(channel: grpc.aio.Channel) -> grpc.GenericRpcHandler:
    from pdmesh.v1 import decode_pb2, decode_pb2_grpc
    from services.router.decode_session import DecodeSession
    session = DecodeSession(decode_pb2_grpc.DecodeServiceStub(channel), "relay target")

    async def decode(request, context):
        async for response in session.decode(request, context.time_remaining()):
            yield response
    return grpc.method_handlers_generic_handler("pdmesh.v1.DecodeService", {"Decode": grpc.unary_stream_rpc_method_handler(
        decode, request_deserializer=decode_pb2.DecodeRequest.FromString,
        response_serializer=decode_pb2.DecodeResponse.SerializeToString)})


async def serve(target: str, port: int, session: bool = False) -> None:
    from services.common.server import CHANNEL_OPTIONS
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers([_session_handler(channel) if session else _Forward(channel)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"RELAY {bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.grpc_relay", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT every call is forwarded to")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    p.add_argument("--session", action="store_true",
                   help="relay DecodeService.Decode calls over one DecodeSession stream, as the router does")
    args = p.parse_args(argv)
    asyncio.run(serve(args.target, args.port, args.session))


if __name__ == "__main__":
    main()
