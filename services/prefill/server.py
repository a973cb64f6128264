"""PrefillService servicer: proto <-> domain, and domain errors -> status codes (once)."""

from pdmesh.v1 import prefill_pb2, prefill_pb2_grpc
from services.common import tracing
from services.common.convert import check_token_ids, priority_from_proto, sampling_from_proto
from services.common.errors import abort_with, status_for
from services.common.metrics import REQUESTS
from services.prefill.prefill_worker import PrefillWorker


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, worker: PrefillWorker, vocab_size: int, max_model_len: int):
        self._worker = worker
        self._vocab_size = vocab_size
        self._max_prompt_tokens = max_model_len - 1

    async def Prefill(self, request, context):
        with tracing.server_span("prefill", context.invocation_metadata(),
                                 {"pdmesh.request_id": request.request_id,
                                  "gen_ai.usage.input_tokens": len(request.prompt_token_ids)}) as span:
            try:
                prompt = check_token_ids(request.prompt_token_ids, self._vocab_size, self._max_prompt_tokens)
                sampling = sampling_from_proto(request.sampling)
                result = await self._worker.prefill(request.request_id or context.peer(), prompt, sampling,
                                                    priority_from_proto(request.priority))
            except Exception as exc:
                REQUESTS.labels("prefill", "Prefill", status_for(exc).name).inc()
                await abort_with(context, exc)
            REQUESTS.labels("prefill", "Prefill", "OK").inc()
            tracing.set_attributes(span, {"pdmesh.prefill.cached_tokens": result.cached_tokens,
                                          "pdmesh.kv.lease_id": result.handle.lease_id,
                                          "pdmesh.kv.blocks": len(result.handle.block_ids)})
            return prefill_pb2.PrefillResponse(
                first_token_id=result.first_token_id, kv_handle=result.handle.to_proto(),
                cached_tokens=result.cached_tokens, queue_ms=result.queue_ms, compute_ms=result.compute_ms)
