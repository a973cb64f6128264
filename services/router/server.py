"""RouterService servicer: validates and converts the request, relays the flow's events, and maps
domain errors to status codes (once, via services.common.errors).

`generate()` is the one entry point every front door uses (gRPC here, the HTTP front beside it):
it takes the GenerateRequest proto, the time left and the caller's metadata (W3C trace context)
and yields GenerateResponse messages, raising domain errors the caller maps to its own status.
"""

import asyncio
import concurrent.futures
import contextlib
import time

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.common import tracing
from services.common.convert import check_max_tokens, check_token_ids, sampling_from_proto
from services.common.errors import InvalidArgument, abort_with, status_for
from services.common.ids import random_hex
from services.common.metrics import REQUESTS
from services.router.auth import ApiKeys
from services.router.config import RouterConfig
from services.router.prefix_tokens import PrefixTokenCache
from services.router.request_flow import GenerateJob, RequestFlow

# Longer text is tokenized on one dedicated thread with the GIL released (Tokenizer.encode):
# other streams keep flowing, and a burst of long prompts cannot oversubscribe the cores.
INLINE_TOKENIZE_MAX_CHARS = 8192

_PRIORITIES = {common_pb2.PRIORITY_CLASS_UNSPECIFIED: "interactive",
               common_pb2.PRIORITY_CLASS_INTERACTIVE: "interactive", common_pb2.PRIORITY_CLASS_BATCH: "batch"}


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, flow: RequestFlow, config: RouterConfig, tokenizer, api_keys: ApiKeys = ApiKeys()):
        self._flow, self._config, self._tokenizer = flow, config, tokenizer
        self.prompt_tokens = PrefixTokenCache(tokenizer, max_tokens=config.prompt_cache_tokens)
        self.api_keys = api_keys
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        # No text longer than this fits the context; computed once (a 262k-entry vocabulary scan).
        self._max_prompt_chars = (config.max_model_len - 1) * tokenizer.max_token_chars

    async def _job(self, request: router_pb2.GenerateRequest, time_remaining: float | None,
                   arrived_at: float) -> GenerateJob:
        which = request.WhichOneof("prompt")
        if which == "text":
            if not request.text:
                raise InvalidArgument("prompt is empty: send text or at least one token id")
            ids = await self.tokenize(request.text)
        elif which == "token_ids":
            ids = request.token_ids.ids  # check_token_ids checks the length before copying
        else:
            raise InvalidArgument("prompt is missing: set `text` or `token_ids`")
        prompt = check_token_ids(ids, self._config.vocab_size, self._config.max_model_len - 1)
        cap = min(self._config.max_tokens_cap, self._config.max_model_len - len(prompt))
        max_tokens = check_max_tokens(request.max_tokens, cap)
        sampling_from_proto(request.sampling)  # validates; workers receive the proto unchanged
        if request.priority not in _PRIORITIES:
            raise InvalidArgument(f"unknown priority class {request.priority}; use PRIORITY_CLASS_INTERACTIVE "
                                  "or PRIORITY_CLASS_BATCH")
        return GenerateJob(request.request_id or random_hex(), prompt, request.sampling, max_tokens,
                           _PRIORITIES[request.priority], request.tenant_id, request.ignore_eos,
                           time_remaining, arrived_at)

    async def validate(self, request: router_pb2.GenerateRequest) -> None:
        """Raises InvalidArgument when `generate` would reject the request as malformed."""
        await self._job(request, None, time.perf_counter())

    async def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of text; InvalidArgument, before any work, for text too long to fit the context."""
        limit = self._max_prompt_chars
        if len(text) > limit:
            raise InvalidArgument(f"prompt text has {len(text)} characters; at most {limit} can fit the context of "
                                  f"{self._config.max_model_len} tokens: shorten it")
        if len(text) > INLINE_TOKENIZE_MAX_CHARS:  # keep the event loop free for other streams
            return await asyncio.get_running_loop().run_in_executor(
                self._tokenize_pool, self.prompt_tokens.encode, text, add_bos)
        return self.prompt_tokens.encode(text, add_bos=add_bos)

    async def generate(self, request: router_pb2.GenerateRequest, time_remaining: float | None = None,
                       metadata: dict[str, str] | None = None, on_trace_id=None):
        """Validates, runs and relays one request; raises domain errors (see services.common.errors).

        The request is one trace: the span continues the caller's W3C context from `metadata`;
        `on_trace_id(hex)` (async, optional) is awaited with the trace id before the first
        response when the request is traced, so front doors can hand it to the client."""
        code = "OK"
        with tracing.server_span("router.generate", metadata) as span:
            arrived_at = time.perf_counter()
            try:
                job = await self._job(request, time_remaining, arrived_at)
                _request_attributes(span, job, request)
                trace_id = tracing.trace_id_of(span)
                if trace_id and on_trace_id is not None:
                    await on_trace_id(trace_id)
                # aclosing: a caller closing this generator early closes the flow (and its decode stream) at once.
                async with contextlib.aclosing(self._flow.run(job)) as events:
                    async for event in events:
                        response = router_pb2.GenerateResponse(request_id=job.request_id, token_ids=event.token_ids,
                                                               text_delta=event.text_delta,
                                                               finish_reason=event.finish_reason)
                        if event.usage is not None:
                            response.usage.CopyFrom(event.usage)
                            response.timings.CopyFrom(event.timings)
                            response.placement.CopyFrom(router_pb2.PlacementInfo(**event.placement))
                            _usage_attributes(span, response)
                        yield response
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = status_for(exc).name
                raise
            finally:
                REQUESTS.labels("router", "Generate", code).inc()

    async def Generate(self, request, context):
        async def send_trace_id(trace_id: str) -> None:
            await context.send_initial_metadata(((tracing.TRACE_ID_HEADER, trace_id),))

        metadata = dict(context.invocation_metadata() or ())
        try:
            request.tenant_id = self.api_keys.authorize(metadata.get("authorization"), request.tenant_id)
            async for response in self.generate(request, context.time_remaining(), metadata, send_trace_id):
                yield response
        except Exception as exc:
            await abort_with(context, exc)


def _request_attributes(span, job, request: router_pb2.GenerateRequest) -> None:
    if not span.is_recording():  # untraced: skip building the attributes (per request, on the hot path)
        return
    sampling = request.sampling
    tracing.set_attributes(span, {
        "gen_ai.operation.name": "text_completion", "gen_ai.request.max_tokens": job.max_tokens,
        "gen_ai.request.temperature": sampling.temperature, "gen_ai.request.top_p": sampling.top_p or None,
        "gen_ai.request.seed": sampling.seed if sampling.HasField("seed") else None,
        "pdmesh.request_id": job.request_id, "pdmesh.priority": job.priority,
        "pdmesh.tenant_id": job.tenant_id or None, "gen_ai.usage.input_tokens": len(job.prompt)})


def _usage_attributes(span, response: router_pb2.GenerateResponse) -> None:
    if not span.is_recording():
        return
    usage, timings = response.usage, response.timings
    tracing.set_attributes(span, {
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "gen_ai.usage.cache_read.input_tokens": usage.cached_prompt_tokens,
        "gen_ai.response.finish_reasons": [common_pb2.FinishReason.Name(response.finish_reason)],
        "pdmesh.ttft_ms": timings.time_to_first_token_ms, "pdmesh.total_ms": timings.total_ms})
