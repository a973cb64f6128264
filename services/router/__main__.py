"""`python -m services.router`. gRPC picks its I/O stack when it is first imported, so the
router's choice is made here, before any import of grpc.

gRPC's posix EventEngine (its default) reads and writes sockets on threads of its own and hands
every completion on to the grpc.aio poller thread, which wakes the event loop: three threads per
completion, a dozen completions per request. With the older iomgr poller the thread polling the
completion queue does the socket I/O itself. On the router, where every request is two streams
of small messages, that is less CPU per request (see README, bench.router_overhead). An
operator's own GRPC_EXPERIMENTS is left alone.
"""
import os

os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")

from services.router.main import main  # noqa: E402  (after the variable: grpc reads it on import)

main()
