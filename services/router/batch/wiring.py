"""Builds the router's admission (classes, headroom, tenant limits) and the BatchService from
RouterConfig; main.py calls these and stays wiring only."""

import logging
import pathlib

from pdmesh.v1 import batch_pb2, batch_pb2_grpc
from services.common import metrics
from services.common.errors import status_for
from services.router.admission import Admission
from services.router.batch.runner import BatchRunner
from services.router.batch.server import BatchServicer
from services.router.batch.store import AsyncBatchStore, BatchStore
from services.router.config import RouterConfig
from services.router.tenants import TenantLimiter
from services.router.workers import WorkerRegistry

log = logging.getLogger(__name__)


def build_admission(config: RouterConfig, registry: WorkerRegistry) -> Admission:
    admission = Admission(config.max_inflight, config.max_queued, config.batch_max_inflight,
                          headroom=lambda: config.batch_headroom.has_room(registry.views()),
                          limiter=TenantLimiter(config.tenants))
    registry.add_listener(admission.capacity_changed)  # waiting batch requests re-check on every load change
    metrics.ROUTER.attach_admission(admission)
    return admission


class BatchService:
    """The store, runner and servicer of batch jobs. If the store cannot be opened (e.g. another
    router holds it) the router still serves Generate and every BatchService call says why not."""

    def __init__(self, config: RouterConfig, router_servicer, registry: WorkerRegistry):
        self.store, self.runner, reason = None, None, ""
        try:
            self.store = AsyncBatchStore(BatchStore(str(pathlib.Path(config.batch_db).expanduser())))
        except (RuntimeError, OSError) as exc:
            reason = str(exc)
            log.error("batch jobs are off: %s", reason)
        else:
            self.runner = BatchRunner(self.store, lambda request: router_servicer.generate(request),
                                      lambda exc: status_for(exc).value[0], config.batch_job_concurrency,
                                      pools_up=lambda: registry.has_healthy("decode"))
        if self.store is not None:
            metrics.ROUTER.attach_batch_store(self.store.store.job_counts)
        self.servicer = BatchServicer(self.store, self.runner, router_servicer.validate, config.batch_max_items,
                                      reason, router_servicer.api_keys)

    def binding(self):
        return (batch_pb2_grpc.add_BatchServiceServicer_to_server, self.servicer,
                batch_pb2.DESCRIPTOR.services_by_name["BatchService"].full_name)

    async def start(self) -> None:
        if self.runner is not None:
            await self.runner.resume()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.close()
            self.store.close()
