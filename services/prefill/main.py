"""Entry point of a prefill worker: `python -m services.prefill --port 0 ...` (see --help)."""

import os
import sys

from kvtransfer.layout import KvLayout
from kvtransfer.source import KvSource, KvTransferServicer, add_kv_transfer_service
from pdmesh.v1 import kv_transfer_pb2, prefill_pb2, prefill_pb2_grpc
from services.common.metrics import register_leases
from services.common.worker import WorkerContext, worker_main
from services.prefill.prefill_worker import PrefillWorker
from services.prefill.server import PrefillServicer


def _bindings(ctx: WorkerContext):
    config = ctx.config
    worker = PrefillWorker(ctx.runner)
    layout = KvLayout.from_pool(ctx.engine.kv_cache, ctx.model_id)
    worker.source = KvSource(ctx.engine.kv_cache, layout, config.worker_id, ctx.advertise_address,
                             config.lease_ttl_s, worker.on_lease_free, enable_nixl="nixl" in config.kv_transports)
    register_leases(config.worker_id, worker.source.leases)
    model = config.engine.model
    return [
        (prefill_pb2_grpc.add_PrefillServiceServicer_to_server,
         PrefillServicer(worker, model.vocab_size, config.engine.scheduler.max_model_len),
         prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name),
        kv_transfer_binding(worker.source),
    ]


def kv_transfer_binding(source: KvSource):
    """KvTransferService over source, with PullKv sending pre-encoded chunks (the gRPC fallback's
    holder side copies each byte once instead of three times; same messages on the wire)."""
    return (add_kv_transfer_service, KvTransferServicer(source),
            kv_transfer_pb2.DESCRIPTOR.services_by_name["KvTransferService"].full_name)


def main(argv: list[str] | None = None) -> None:
    if "--engine=vllm" in (argv or sys.argv) or _engine_arg(argv or sys.argv) == "vllm":
        raise SystemExit("prefill workers run the built-in engine only; vLLM pools prefill on their decode "
                         "workers (README: vLLM backend)")
    worker_main("prefill", _bindings, argv)


def _engine_arg(argv: list[str]) -> str:
    return argv[argv.index("--engine") + 1] if "--engine" in argv[:-1] else os.environ.get("PDMESH_ENGINE", "")


if __name__ == "__main__":
    main()
