"""DecodeService servicer: proto <-> domain, and domain errors -> status codes (once)."""

import asyncio
import time

from kvtransfer.handle import KvHandle
from pdmesh.v1 import decode_pb2, decode_pb2_grpc
from services.common import tracing
from services.common.convert import (FINISH_REASONS, check_max_tokens, check_token_ids, priority_from_proto,
                                     sampling_from_proto)
from services.common.errors import InvalidArgument, abort_with, status_for
from services.common.metrics import REQUESTS
from services.decode.decode_worker import DecodeJob, DecodeWorker


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, worker: DecodeWorker, vocab_size: int, max_model_len: int):
        self._worker = worker
        self._vocab_size = vocab_size
        self._max_model_len = max_model_len

    def _job(self, request, context) -> DecodeJob:
        prompt = check_token_ids(request.prompt_token_ids, self._vocab_size, self._max_model_len - 1)
        max_tokens = check_max_tokens(request.max_tokens, self._max_model_len - len(prompt))
        handle = KvHandle.from_proto(request.kv_handle) if request.HasField("kv_handle") else None
        if handle is not None:
            if request.first_token_id >= self._vocab_size:
                raise InvalidArgument(f"first_token_id {request.first_token_id} is not a known token id")
            if handle.num_tokens != len(prompt):
                raise InvalidArgument(f"kv_handle holds {handle.num_tokens} tokens but the prompt has {len(prompt)}")
            if handle.engine_kv_params:
                handle.engine_kv_params_dict()  # ValueError (INVALID_ARGUMENT) unless a JSON object
        if handle is not None and request.resume_token_ids:
            raise InvalidArgument("resume_token_ids cannot be combined with kv_handle: a resumed request is "
                                  "prefilled here")
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return DecodeJob(request.request_id or context.peer(), prompt, sampling_from_proto(request.sampling),
                         max_tokens, request.ignore_eos, handle,
                         request.first_token_id if handle is not None else None, deadline,
                         priority_from_proto(request.priority), tuple(request.resume_token_ids))

    async def Decode(self, request, context):
        code = "OK"
        with tracing.server_span("decode", context.invocation_metadata(),
                                 {"pdmesh.request_id": request.request_id,
                                  "gen_ai.usage.input_tokens": len(request.prompt_token_ids),
                                  "pdmesh.decode.pulls_kv": request.HasField("kv_handle")}):
            try:
                job = self._job(request, context)
                async for event in self._worker.decode(job):
                    yield decode_pb2.DecodeResponse(
                        token_ids=event.token_ids, finish_reason=FINISH_REASONS[event.finish_reason],
                        stats=_stats(event.transfer))
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = status_for(exc).name
                await abort_with(context, exc)
            finally:
                REQUESTS.labels("decode", "Decode", code).inc()


def _stats(info) -> decode_pb2.DecodeStats | None:
    if info is None:
        return None
    return decode_pb2.DecodeStats(kv_transfer_ms=info.ms, kv_transfer_bytes=info.num_bytes, kv_transport=info.transport,
                                  local_prefill_tokens=info.local_prefill_tokens, cached_tokens=info.cached_tokens,
                                  queue_ms=info.queue_ms)
