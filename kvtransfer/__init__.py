"""Moving KV blocks between processes: one puller interface (base.KvPuller), several transports
("nixl", "grpc"), and the holder side (source.KvSource + source.KvTransferServicer).

Holder (prefill worker), once at start-up:
    source = KvSource(pool, KvLayout.from_pool(pool, model_id), worker_id, advertise_address,
                      lease_ttl_s=30, on_free=lambda lease: engine.free(lease.block_ids))
    add_kv_transfer_service(KvTransferServicer(source), server)   # or the generated add_..._to_server
    source.start()                                                 # lease expiry task
  per request, after prefill:  handle = source.lend(request_id, block_ids, num_tokens)
                               -> handle.to_proto() goes into the prefill reply.
Puller (decode worker), once:  puller = make_puller(available_transports()[0], pool, layout)
  per request:  dst = engine.allocate(handle.num_blocks)
                try: await puller.pull(handle, dst)           # bytes land + verified, or raises
                finally: await puller.release(handle)         # always, exactly once

Heavy pieces (NIXL, the grpc servicer) are imported from their modules, not here.
"""

from kvtransfer.base import KvPuller, TransferResult, available_transports, make_puller
from kvtransfer.errors import KvChecksumError, KvIncompatibleError, KvLeaseNotFound, KvTransferError
from kvtransfer.handle import KvHandle
from kvtransfer.layout import WIRE_VERSION, KvLayout

__all__ = ["KvPuller", "TransferResult", "available_transports", "make_puller", "KvChecksumError",
           "KvIncompatibleError", "KvLeaseNotFound", "KvTransferError", "KvHandle", "WIRE_VERSION", "KvLayout"]
