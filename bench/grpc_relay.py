"""A gRPC relay that does nothing but relay: every unary-stream call it takes is forwarded to one
target as it came (method, bytes; no parsing, no metadata), and the answers go back the same way.
bench.router_overhead puts it where the router sits, to show what one Python grpc.aio hop costs
by itself in the same layout: the floor under any router written on this stack.

    python -m bench.grpc_relay --target HOST:PORT [--port 0]

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


async def serve(target: str, port: int) -> None:
    from services.common.server import CHANNEL_OPTIONS
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers([_Forward(channel)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"RELAY {bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.grpc_relay", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT every call is forwarded to")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    args = p.parse_args(argv)
    asyncio.run(serve(args.target, args.port))


if __name__ == "__main__":
    main()
