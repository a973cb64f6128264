"""KvHandle: where a prompt's KV lives and for how long the holder keeps it for the puller."""

import json
from dataclasses import dataclass

from pdmesh.v1 import common_pb2

from kvtransfer.layout import KvLayout


@dataclass(frozen=True)
class KvHandle:
    """Returned by KvSource.lend on the holder, carried to the puller inside the prefill reply.

    block_ids are the holder's blocks in prompt order; block_checksums[i] is the xxh3-64 of
    block_ids[i]'s bytes at lend time. transports lists what the holder serves, best first.
    The blocks stay valid until the lease is released (ReleaseKv) or lease_expires_unix_ms passes.

    KV an engine moves itself (vLLM's NixlConnector) has no pdmesh blocks: engine_kv_params holds
    the engine's transfer parameters (a JSON object, bytes), block_ids and block_checksums are
    empty, and only an engine that speaks one of `transports` can use it.
    """

    worker_id: str
    transfer_address: str
    lease_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    layout: KvLayout
    block_checksums: tuple[int, ...]
    lease_expires_unix_ms: int
    transports: tuple[str, ...]
    # The holder's compat_hash as sent on the wire (equals layout.compat_hash for a same-version peer).
    compat_hash: str = ""
    engine_kv_params: bytes = b""

    def __post_init__(self) -> None:
        if len(self.block_checksums) != len(self.block_ids):
            raise ValueError(f"{len(self.block_checksums)} checksums for {len(self.block_ids)} blocks")
        if self.engine_kv_params and self.block_ids:
            raise ValueError("engine-held KV (engine_kv_params) has no pdmesh block ids")
        if not self.engine_kv_params and self.num_tokens > len(self.block_ids) * self.layout.block_size:
            raise ValueError(f"{self.num_tokens} tokens do not fit {len(self.block_ids)} blocks")
        if not self.compat_hash:
            object.__setattr__(self, "compat_hash", self.layout.compat_hash)

    def engine_kv_params_dict(self) -> dict:
        """engine_kv_params decoded; ValueError unless they are a JSON object."""
        try:
            params = json.loads(self.engine_kv_params)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"kv_handle.engine_kv_params is not JSON: {exc}") from None
        if not isinstance(params, dict):
            raise ValueError(f"kv_handle.engine_kv_params must be a JSON object, got {type(params).__name__}")
        return params

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def num_bytes(self) -> int:
        return len(self.block_ids) * self.layout.block_bytes

    def to_proto(self) -> common_pb2.KvHandle:
        layout = self.layout.to_proto()
        layout.compat_hash = self.compat_hash
        return common_pb2.KvHandle(
            worker_id=self.worker_id, transfer_address=self.transfer_address, lease_id=self.lease_id,
            block_ids=self.block_ids, num_tokens=self.num_tokens, layout=layout,
            block_checksums=self.block_checksums, lease_expires_unix_ms=self.lease_expires_unix_ms,
            transports=self.transports, engine_kv_params=self.engine_kv_params)

    @classmethod
    def from_proto(cls, msg: common_pb2.KvHandle) -> "KvHandle":
        return cls(worker_id=msg.worker_id, transfer_address=msg.transfer_address, lease_id=msg.lease_id,
                   block_ids=tuple(msg.block_ids), num_tokens=msg.num_tokens,
                   layout=KvLayout.from_proto(msg.layout), block_checksums=tuple(msg.block_checksums),
                   lease_expires_unix_ms=msg.lease_expires_unix_ms, transports=tuple(msg.transports),
                   compat_hash=msg.layout.compat_hash, engine_kv_params=msg.engine_kv_params)
