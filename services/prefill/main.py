"""Entry point of a prefill worker: `python -m services.prefill --port 0 ...` (see --help)."""

from kvtransfer.layout import KvLayout
from kvtransfer.source import KvSource, KvTransferServicer, add_kv_transfer_service
from pdmesh.v1 import kv_transfer_pb2, prefill_pb2, prefill_pb2_grpc
from services.common.metrics import register_leases
from services.common.worker import WorkerContext, worker_main
from services.prefill.prefill_worker import PoolLender, PrefillWorker
from services.prefill.server import PrefillServicer
from services.prefill.vllm_lender import VllmLender, vllm_layout


def _bindings(ctx: WorkerContext):
    config = ctx.config
    worker = PrefillWorker(ctx.runner)
    model = config.engine.model
    prefill = (prefill_pb2_grpc.add_PrefillServiceServicer_to_server,
               PrefillServicer(worker, model.vocab_size, config.engine.scheduler.max_model_len),
               prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name)
    if config.engine_backend == "vllm":  # vLLM's connector serves the KV; no KvTransferService here
        if ctx.engine.kv_connector == "none":
            raise SystemExit("a vLLM prefill worker lends KV through vLLM's connector: drop --vllm-kv-connector none")
        worker.lender = VllmLender(config.worker_id, vllm_layout(ctx.engine, ctx.model_id), config.lease_ttl_s)
        return [prefill]
    layout = KvLayout.from_pool(ctx.engine.kv_cache, ctx.model_id)
    source = KvSource(ctx.engine.kv_cache, layout, config.worker_id, ctx.advertise_address,
                      config.lease_ttl_s, worker.on_lease_free, enable_nixl="nixl" in config.kv_transports)
    worker.lender = PoolLender(source)
    register_leases(config.worker_id, source.leases)
    return [prefill, kv_transfer_binding(source)]


def kv_transfer_binding(source: KvSource):
    """KvTransferService over source, with PullKv sending pre-encoded chunks (the gRPC fallback's
    holder side copies each byte once instead of three times; same messages on the wire)."""
    return (add_kv_transfer_service, KvTransferServicer(source),
            kv_transfer_pb2.DESCRIPTOR.services_by_name["KvTransferService"].full_name)


def main(argv: list[str] | None = None) -> None:
    worker_main("prefill", _bindings, argv)


if __name__ == "__main__":
    main()
