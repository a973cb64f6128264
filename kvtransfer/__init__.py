"""Moving KV blocks between processes: one puller interface (base.KvPuller), several transports
("nixl", "grpc"), and the holder side (source.KvSource + source.KvTransferServicer).

Heavy pieces (NIXL, grpc servicer) are imported from their modules, not here.
"""

from kvtransfer.base import KvPuller, TransferResult, available_transports, make_puller
from kvtransfer.errors import KvChecksumError, KvIncompatibleError, KvLeaseNotFound, KvTransferError
from kvtransfer.handle import KvHandle
from kvtransfer.layout import WIRE_VERSION, KvLayout

__all__ = ["KvPuller", "TransferResult", "available_transports", "make_puller", "KvChecksumError",
           "KvIncompatibleError", "KvLeaseNotFound", "KvTransferError", "KvHandle", "WIRE_VERSION", "KvLayout"]
