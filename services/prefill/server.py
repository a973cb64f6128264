"""PrefillService servicer: proto <-> domain, and domain errors -> status codes (once)."""

from pdmesh.v1 import prefill_pb2, prefill_pb2_grpc
from services.common.convert import check_token_ids, sampling_from_proto
from services.common.errors import abort_with
from services.prefill.prefill_worker import PrefillWorker


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, worker: PrefillWorker, vocab_size: int, max_model_len: int):
        self._worker = worker
        self._vocab_size = vocab_size
        self._max_prompt_tokens = max_model_len - 1

    async def Prefill(self, request, context):
        try:
            prompt = check_token_ids(request.prompt_token_ids, self._vocab_size, self._max_prompt_tokens)
            sampling = sampling_from_proto(request.sampling)
            result = await self._worker.prefill(request.request_id or context.peer(), prompt, sampling)
        except Exception as exc:
            await abort_with(context, exc)
        return prefill_pb2.PrefillResponse(
            first_token_id=result.first_token_id, kv_handle=result.handle.to_proto(),
            cached_tokens=result.cached_tokens, queue_ms=result.queue_ms, compute_ms=result.compute_ms)
