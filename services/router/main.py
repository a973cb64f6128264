"""Entry point of the router: `python -m services.router --prefill H:P,... --decode H:P,...`."""

import argparse
import asyncio
import logging
import os

from engine.tokenizer import load_tokenizer
from pdmesh.v1 import router_pb2, router_pb2_grpc
from services.common import tracing
from services.common.metrics import start_metrics_server
from services.common.server import announce_ready, configure_logging, start_server, stop_event_on_signals
from services.router.batch.wiring import BatchService, build_admission
from services.router.config import RouterConfig
from services.router.placement.runner import load_profile
from services.router.priority_flags import add_priority_flags, priority_fields
from services.router.request_flow import RequestFlow
from services.router.server import RouterServicer
from services.common.worker_config import metrics_port_from_env
from services.router.workers import WorkerRegistry

log = logging.getLogger(__name__)


def parse_config(argv: list[str] | None = None) -> RouterConfig:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="pdmesh-router", description="pdmesh router")
    p.add_argument("--host", default=env("PDMESH_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("PDMESH_PORT", "50051")))
    p.add_argument("--prefill", default=env("PDMESH_PREFILL_ADDRESSES", ""), help="comma-separated host:port")
    p.add_argument("--decode", default=env("PDMESH_DECODE_ADDRESSES", ""), help="comma-separated host:port")
    p.add_argument("--profile", default=env("PDMESH_PLACEMENT_PROFILE", "prefix_aware"),
                   help="placement profile name (services/router/placement/profiles) or YAML path")
    p.add_argument("--max-model-len", type=int, default=int(env("PDMESH_MAX_MODEL_LEN", "4096")))
    p.add_argument("--max-tokens-cap", type=int, default=int(env("PDMESH_MAX_TOKENS_CAP", "4096")))
    p.add_argument("--max-inflight", type=int, default=int(env("PDMESH_MAX_INFLIGHT", "64")))
    p.add_argument("--max-queued", type=int, default=int(env("PDMESH_MAX_QUEUED", "256")))
    p.add_argument("--metrics-port", type=int, default=metrics_port_from_env(),
                   help="serve Prometheus /metrics on this port (0: any free port; default off)")
    p.add_argument("--ready-file", default=None)
    add_priority_flags(p)
    a = p.parse_args(argv)
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    return RouterConfig(split(a.prefill), split(a.decode), a.host, a.port, a.profile, a.max_model_len,
                        a.max_tokens_cap, max_inflight=a.max_inflight, max_queued=a.max_queued,
                        ready_file=a.ready_file, metrics_port=a.metrics_port, **priority_fields(a))


async def serve(config: RouterConfig) -> None:
    tokenizer = await asyncio.to_thread(load_tokenizer)
    registry = WorkerRegistry(list(config.prefill_addresses), list(config.decode_addresses))
    registry.start()
    flow = RequestFlow(registry, load_profile(config.profile), build_admission(config, registry), tokenizer)
    servicer = RouterServicer(flow, config, tokenizer)
    batch = BatchService(config, servicer, registry)
    stop = stop_event_on_signals()
    server = await start_server(lambda port: [(router_pb2_grpc.add_RouterServiceServicer_to_server, servicer,
                                               router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name),
                                              batch.binding()],
                                config.host, config.port)
    await server.set_serving(False)  # until the pools are reachable
    await _wait_for_pools(registry, config)
    await server.set_serving(True)
    await batch.start()  # resumes the jobs a previous router left unfinished
    metrics_port = start_metrics_server(config.metrics_port, config.host)
    announce_ready(config.ready_file, role="router", port=server.port, address=f"{config.host}:{server.port}",
                   metrics_address=f"{config.host}:{metrics_port}" if metrics_port else "")
    log.info("router listening on %s:%d", config.host, server.port)
    await stop.wait()
    await server.drain_and_stop(config.drain_grace_s)
    await batch.close()
    await registry.close()
    tracing.shutdown_tracing()


async def _wait_for_pools(registry: WorkerRegistry, config: RouterConfig) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.startup_timeout_s
    need_prefill = bool(config.prefill_addresses)
    while not (registry.has_healthy("decode") and (registry.has_healthy("prefill") or not need_prefill)):
        if loop.time() > deadline:
            log.warning("pools not all reachable after %.0fs; serving anyway", config.startup_timeout_s)
            return
        registry.changed.clear()
        try:
            await asyncio.wait_for(registry.changed.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    configure_logging("router")
    tracing.init_tracing("router")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
