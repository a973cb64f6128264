"""Lending a prompt's KV held by vLLM: the handle carries vLLM's kv_transfer_params.

vLLM's NixlConnector owns the blocks (engine/vllm_backend.py): it keeps them until a decoder
pulls them, or until its lease (the worker's lease TTL) runs out; nothing here can free them
earlier. The handle has no pdmesh blocks; its layout says what vLLM's blocks hold.
"""

import json
import time

from engine.vllm_backend import KV_TRANSPORT
from kvtransfer.handle import KvHandle
from kvtransfer.layout import KvLayout


class VllmLender:
    def __init__(self, worker_id: str, layout: KvLayout, lease_s: float):
        self.worker_id, self.layout, self.lease_s = worker_id, layout, lease_s

    def collect(self, engine, request_id: str) -> dict:
        """On the engine thread: vLLM's parameters for the finished keep_kv request."""
        return engine.kv_transfer_params_of(request_id)

    def lend(self, request_id: str, params: dict, num_tokens: int) -> KvHandle:
        holder = f"{params.get('remote_host', '')}:{params.get('remote_port', '')}"
        return KvHandle(worker_id=self.worker_id, transfer_address=holder, lease_id=request_id, block_ids=(),
                        num_tokens=num_tokens, layout=self.layout, block_checksums=(),
                        lease_expires_unix_ms=int((time.time() + self.lease_s) * 1000), transports=(KV_TRANSPORT,),
                        engine_kv_params=json.dumps(params, separators=(",", ":")).encode())


def vllm_layout(engine, model_id: str) -> KvLayout:
    """What one of vLLM's blocks holds: our model's KV shape at vLLM's block size."""
    model = engine.config.model
    return KvLayout(model_id, "float32", engine.vllm_block_size, model.num_layers, model.num_kv_heads, model.head_dim)
