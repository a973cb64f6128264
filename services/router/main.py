"""Entry point of the router: `python -m services.router --prefill H:P,... --decode H:P,...`."""

import argparse
import asyncio
import logging
import os

from engine.tokenizer import load_tokenizer
from pdmesh.v1 import router_pb2, router_pb2_grpc
from services.common import tracing
from services.common.metrics import start_metrics_server
from services.common.server import (announce_ready, configure_logging, freeze_startup_heap, start_server,
                                    stop_event_on_signals)
from services.common.tls import add_tls_flags, tls_from_args
from services.router.auth import ApiKeys
from services.router.batch.wiring import BatchService, build_admission
from services.router.chat_template import load_chat_template
from services.router.config import RouterConfig
from services.router.discovery import follow, known_discoveries, make_discovery
from services.router.http_front import FrontSettings, OpenAIFront, create_app, start_http
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
    p.add_argument("--http-port", default=env("PDMESH_HTTP_PORT", "8000"),
                   help="OpenAI-compatible HTTP front port (0 = any free port; off or -1 = no HTTP front)")
    p.add_argument("--http-host", default=env("PDMESH_HTTP_HOST"), help="default: --host")
    p.add_argument("--api-key", default=env("PDMESH_API_KEYS", ""),
                   help="comma-separated keys; when set, Generate and /v1/* need `authorization: Bearer <key>`")
    p.add_argument("--api-keys-file", default=env("PDMESH_API_KEYS_FILE"),
                   help="YAML/JSON mapping API key -> tenant; requests run as their key's tenant")
    p.add_argument("--served-model-name", default=env("PDMESH_SERVED_MODEL_NAME", "gemma-3-270m"),
                   help="the model id /v1/models lists and requests name")
    p.add_argument("--chat-template", default=env("PDMESH_CHAT_TEMPLATE"),
                   help="Jinja chat template file (default: the GGUF's, else Gemma 3's turn format)")
    p.add_argument("--prompt-cache-tokens", type=int, default=int(env("PDMESH_PROMPT_CACHE_TOKENS", str(1 << 20))),
                   help="token ids the prefix token cache keeps for long text prompts (0: off)")
    add_discovery_flags(p)
    add_tls_flags(p)
    add_priority_flags(p)
    a = p.parse_args(argv)
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    return RouterConfig(split(a.prefill), split(a.decode), a.host, a.port, a.profile, a.max_model_len,
                        a.max_tokens_cap, max_inflight=a.max_inflight, max_queued=a.max_queued,
                        ready_file=a.ready_file, metrics_port=a.metrics_port, http_host=a.http_host or a.host,
                        http_port=_http_port(p, a.http_port), api_keys=split(a.api_key),
                        served_model_name=a.served_model_name, chat_template=a.chat_template,
                        prompt_cache_tokens=a.prompt_cache_tokens,
                        api_keys_file=a.api_keys_file, tls=tls_from_args(a), **discovery_fields(a),
                        **priority_fields(a))


def _http_port(parser: argparse.ArgumentParser, value: str) -> int | None:
    if value.strip().lower() in ("off", "-1", "none", ""):
        return None
    try:
        return int(value)
    except ValueError:
        parser.error(f"--http-port must be a port number, 0 (any free port) or off, got {value!r}")


def add_discovery_flags(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--discovery", default=env("PDMESH_DISCOVERY", "static"), choices=known_discoveries(),
                   help="where the workers are: static (--prefill/--decode), dns (headless Services), kubernetes "
                        "(EndpointSlices, watched)")
    p.add_argument("--prefill-dns", default=env("PDMESH_PREFILL_DNS", ""), help="headless Service name:port")
    p.add_argument("--decode-dns", default=env("PDMESH_DECODE_DNS", ""), help="headless Service name:port")
    p.add_argument("--dns-interval-s", type=float, default=float(env("PDMESH_DNS_INTERVAL_S", "5")))
    p.add_argument("--prefill-selector", default=env("PDMESH_PREFILL_SELECTOR", ""),
                   help="EndpointSlice label selector, e.g. kubernetes.io/service-name=pdmesh-prefill-headless")
    p.add_argument("--decode-selector", default=env("PDMESH_DECODE_SELECTOR", ""))
    p.add_argument("--namespace", default=env("PDMESH_NAMESPACE", ""), help="default: the pod's own namespace")
    p.add_argument("--endpoint-port-name", default=env("PDMESH_ENDPOINT_PORT_NAME", "grpc"))


def discovery_fields(a: argparse.Namespace) -> dict:
    names = ("discovery", "prefill_dns", "decode_dns", "dns_interval_s", "prefill_selector", "decode_selector",
             "namespace", "endpoint_port_name")
    return {name: getattr(a, name) for name in names}


async def serve(config: RouterConfig) -> None:
    tokenizer, template = await asyncio.gather(asyncio.to_thread(load_tokenizer),
                                               asyncio.to_thread(load_chat_template, config.chat_template))
    discovery = make_discovery(config)
    registry = WorkerRegistry([], [], remove_grace_s=config.drain_grace_s, tls=config.tls)
    registry.start()
    following = asyncio.create_task(follow(discovery, registry))
    following.add_done_callback(_report_discovery_end)
    flow = RequestFlow(registry, load_profile(config.profile), build_admission(config, registry), tokenizer)
    servicer = RouterServicer(flow, config, tokenizer, ApiKeys.load(config.api_keys, config.api_keys_file))
    batch = BatchService(config, servicer, registry)
    stop = stop_event_on_signals()
    server = await start_server(lambda port: [(router_pb2_grpc.add_RouterServiceServicer_to_server, servicer,
                                               router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name),
                                              batch.binding()],
                                config.host, config.port, config.tls)
    await server.set_serving(False)  # until the pools are reachable
    serving = asyncio.Event()  # set between startup and drain; /ready also needs the pools up
    http = await _start_http(config, servicer, template, lambda: serving.is_set() and _pools_up(registry, config))
    await _wait_for_pools(registry, config)
    await server.set_serving(True)
    await batch.start()  # resumes the jobs a previous router left unfinished
    serving.set()
    metrics_port = start_metrics_server(config.metrics_port, config.host)
    freeze_startup_heap()
    announce_ready(config.ready_file, role="router", port=server.port, address=f"{config.host}:{server.port}",
                   http_address=http.address if http else "",
                   metrics_address=f"{config.host}:{metrics_port}" if metrics_port else "")
    log.info("router listening on %s:%d%s", config.host, server.port,
             f"; OpenAI-compatible HTTP at {http.address}/v1" if http else "")
    await stop.wait()
    serving.clear()  # /ready answers 503 while both fronts drain
    await asyncio.gather(server.drain_and_stop(config.drain_grace_s),
                         *([http.stop(config.drain_grace_s)] if http else []))
    await batch.close()
    following.cancel()
    await asyncio.gather(following, return_exceptions=True)
    await registry.close()
    tracing.shutdown_tracing()


async def _start_http(config: RouterConfig, servicer: RouterServicer, template, is_ready):
    if config.http_port is None:
        return None
    settings = FrontSettings(config.served_model_name, config.max_model_len, config.max_tokens_cap,
                             servicer.api_keys)
    return await start_http(create_app(OpenAIFront(servicer, template, settings, is_ready)), config.http_host,
                            config.http_port)


def _report_discovery_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("worker discovery stopped; the pools are frozen as they were", exc_info=task.exception())


def _pools_up(registry: WorkerRegistry, config: RouterConfig) -> bool:
    return registry.has_healthy("decode") and (registry.has_healthy("prefill") or not config.has_prefill_pool)


async def _wait_for_pools(registry: WorkerRegistry, config: RouterConfig) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.startup_timeout_s
    while not _pools_up(registry, config):
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
