"""Start-up and shutdown shared by prefill and decode workers.

A worker is: one LLMEngine on its own thread (EngineRunner), a WorkerStateHub publishing its KV
events and load, and a gRPC server with the role's services plus WorkerStateService.
"""

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from pdmesh.v1 import worker_state_pb2, worker_state_pb2_grpc
from services.common import tracing
from services.common.engine_runner import EngineRunner
from services.common.metrics import register_worker, start_metrics_server
from services.common.server import (ServiceBinding, announce_ready, freeze_startup_heap, start_server,
                                    stop_event_on_signals)
from services.common.worker_config import WorkerConfig
from services.common.worker_state import WorkerStateHub, WorkerStateServicer

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    config: WorkerConfig
    runner: EngineRunner
    hub: WorkerStateHub
    advertise_address: str = ""

    @property
    def engine(self):
        return self.runner.engine

    @property
    def model_id(self) -> str:
        """Identity of the weights, part of the KV layout both sides of a transfer must share."""
        model = self.config.engine.model
        if model.random_seed is not None:
            return f"{model.name}@seed{model.random_seed}"
        from engine.weights import model_id
        return model_id()


def build_engine(config: WorkerConfig):
    """The engine the worker serves with: ours, or vLLM (imported only when asked for)."""
    if config.engine_backend == "vllm":
        from engine.vllm_backend import VllmEngine
        return VllmEngine(config.engine, config.vllm)
    from engine.llm_engine import LLMEngine
    return LLMEngine(config.engine)


async def run_worker(config: WorkerConfig,
                     role_bindings: Callable[[WorkerContext], Iterable[ServiceBinding]],
                     on_stop: Callable[[WorkerContext], None] | None = None) -> None:
    torch.set_num_threads(config.torch_threads)
    loop = asyncio.get_running_loop()
    engine = await asyncio.to_thread(build_engine, config)
    hub = WorkerStateHub(loop)
    runner = EngineRunner(engine, loop, on_step=hub.publish_from_engine_thread)
    runner.start()
    ctx = WorkerContext(config, runner, hub)

    def bindings(port: int):
        ctx.advertise_address = f"{config.advertise_host}:{port}"
        state = WorkerStateServicer(config.worker_id, config.role, hub, runner, config.engine.cache.block_size)
        return [*role_bindings(ctx), (worker_state_pb2_grpc.add_WorkerStateServiceServicer_to_server, state,
                                     worker_state_pb2.DESCRIPTOR.services_by_name["WorkerStateService"].full_name)]

    stop = stop_event_on_signals()
    server = await start_server(bindings, config.host, config.port, config.tls)
    register_worker(config.role, config.worker_id, hub)
    metrics_port = start_metrics_server(config.metrics_port, config.host)
    freeze_startup_heap()
    announce_ready(config.ready_file, role=config.role, worker_id=config.worker_id, port=server.port,
                   address=ctx.advertise_address,
                   metrics_address=f"{config.advertise_host}:{metrics_port}" if metrics_port else "")
    log.info("%s worker %s listening on %s", config.role, config.worker_id, ctx.advertise_address)
    await stop.wait()
    log.info("draining (grace %.0fs)", config.drain_grace_s)
    hub.close()  # routers see the state stream end and stop placing work here
    await server.drain_and_stop(config.drain_grace_s)
    log.info("drained")
    if on_stop is not None:
        on_stop(ctx)
    runner.stop()
    tracing.shutdown_tracing()


def worker_main(role: str, role_bindings: Callable[[WorkerContext], Iterable[ServiceBinding]],
                argv: list[str] | None = None) -> None:
    """Entry point shared by `python -m services.prefill` and `python -m services.decode`."""
    import argparse

    from services.common.server import configure_logging
    from services.common.worker_config import add_worker_flags, worker_config_from_args

    parser = argparse.ArgumentParser(prog=f"pdmesh-{role}", description=f"pdmesh {role} worker")
    add_worker_flags(parser)
    config = worker_config_from_args(role, parser.parse_args(argv))
    configure_logging(config.worker_id)
    tracing.init_tracing(role)
    asyncio.run(run_worker(config, role_bindings))
