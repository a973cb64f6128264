"""Entry point of a decode worker: `python -m services.decode --port 0 ...` (see --help)."""

import functools
import logging

from engine.vllm_backend import KV_TRANSPORT
from kvtransfer.base import available_transports, make_puller
from kvtransfer.layout import KvLayout
from pdmesh.v1 import decode_pb2, decode_pb2_grpc
from services.common.tls import aio_channel
from services.common.worker import WorkerContext, worker_main
from services.decode.decode_worker import DecodeWorker
from services.decode.server import DecodeServicer

log = logging.getLogger(__name__)


def _pullers(ctx: WorkerContext) -> dict:
    if ctx.config.engine_backend == "vllm":
        return {}  # vLLM keeps its KV in its own process; its connector pulls (_engine_transport)
    layout = KvLayout.from_pool(ctx.engine.kv_cache, ctx.model_id)
    usable = set(available_transports())
    pullers = {}
    make_channel = functools.partial(_holder_channel, tls=ctx.config.tls)
    for name in ctx.config.kv_transports:
        if name in usable:
            pullers[name] = make_puller(name, ctx.engine.kv_cache, layout, make_channel=make_channel)
        else:
            log.warning("KV transport %s is not available on this host; skipping it", name)
    if not pullers:
        raise SystemExit(f"none of the KV transports {ctx.config.kv_transports} is available here")
    return pullers


def _engine_transport(ctx: WorkerContext) -> str:
    """The KV transport the engine serves itself: vLLM's NixlConnector, when it runs one."""
    if ctx.config.engine_backend == "vllm" and ctx.engine.kv_connector == "nixl":
        return KV_TRANSPORT
    return ""


def _holder_channel(address: str, options: list, tls):
    return aio_channel(address, tls, options)


def _bindings(ctx: WorkerContext):
    config = ctx.config
    ctx.pullers = _pullers(ctx)
    worker = DecodeWorker(ctx.runner, ctx.pullers, _engine_transport(ctx))
    return [(decode_pb2_grpc.add_DecodeServiceServicer_to_server,
             DecodeServicer(worker, config.engine.model.vocab_size, config.engine.scheduler.max_model_len),
             decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name)]


def main(argv: list[str] | None = None) -> None:
    worker_main("decode", _bindings, argv)


if __name__ == "__main__":
    main()
