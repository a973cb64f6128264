"""VllmEngine: vLLM's engine behind the LLMEngine interface the services drive.

Same threading contract as engine.llm_engine.LLMEngine: not thread-safe, every call (step()
included) from one engine thread (services/common/engine_runner.py). vLLM runs the model in its
own engine-core process; step() returns what that process produced since the last step, one
TokenOutput per new token (vLLM streams deltas, normally one token per request per step).

What maps and what does not:
- add_request / abort / step / has_unfinished / load / stats: vLLM's request API; counters are
  derived from its outputs (num_cached_tokens on a request's first output says how much of the
  prompt its prefix cache served, so prompt_tokens_computed is what vLLM really computed).
- KV events: vLLM's own block hashes are salted and use vLLM's block size, so they cannot feed
  our router's prefix index. We publish our chained hashes (engine/hashing.py, our block size)
  of the prompt blocks vLLM served, and a "removed" for the oldest once they exceed what vLLM's
  KV cache can hold (an LRU estimate of its prefix cache, see PrefixEstimate).
- keep_kv / block_ids_of / reserve_for_import / add_imported: not supported (the KV lives in
  vLLM's process, in vLLM's layout); they raise UnsupportedError, a request that brings KV is
  prefilled here instead (see README "vLLM backend").
"""

import time
from collections import OrderedDict
from dataclasses import dataclass
from numbers import Integral

from engine.block_manager import KvEvent
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.hashing import block_hashes
from engine.llm_engine import EngineStats, LoadSnapshot, TokenOutput
from engine.sampling import SamplingParams
from engine.sequence import PRIORITY_INTERACTIVE


class UnsupportedError(InvalidRequestError):
    """The vLLM backend has no such operation (KV import/export through our kvtransfer)."""


@dataclass(frozen=True)
class VllmOptions:
    """How the vLLM engine is built (read from flags at the worker's entry point)."""

    model_dir: str = ""  # Hugging Face style directory (engine.hf_export); "" = the default one
    gpu_memory_utilization: float = 0.25  # on the CPU build this sizes the KV cache
    enforce_eager: bool = True  # torch.compile on 2 shared cores costs minutes at start-up

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


class _Request:
    __slots__ = ("prompt", "added_at", "first_at", "num_generated")

    def __init__(self, prompt: list[int]):
        self.prompt, self.added_at, self.first_at, self.num_generated = prompt, time.monotonic(), None, 0


class PrefixEstimate:
    """Our hashes of the prompt blocks vLLM served, oldest evicted first once past capacity."""

    def __init__(self, block_size: int, capacity_blocks: int):
        self.block_size, self.capacity = block_size, max(1, capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._events: list[KvEvent] = []

    def served(self, prompt: list[int]) -> None:
        new = []
        for h in block_hashes(prompt, self.block_size):
            if h in self._blocks:
                self._blocks.move_to_end(h)
            else:
                self._blocks[h] = None
                new.append(h)
        if new:
            self._events.append(KvEvent("stored", tuple(new)))
        evicted = [self._blocks.popitem(last=False)[0] for _ in range(len(self._blocks) - self.capacity)]
        if evicted:
            self._events.append(KvEvent("removed", tuple(evicted)))

    def drain(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events

    def hashes(self) -> list[int]:
        return list(self._blocks)


class VllmEngine:
    def __init__(self, config: EngineConfig, options: VllmOptions = VllmOptions()):
        """Starts vLLM on the exported model directory (about a minute on 2 shared cores)."""
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine as VllmLLMEngine

        from engine.hf_export import default_dir
        if config.model.random_seed is not None:
            raise ValueError("the vLLM backend serves the real checkpoint only (no --model tiny)")
        args = EngineArgs(model=options.model_dir or str(default_dir()), dtype="float32",
                          max_model_len=config.scheduler.max_model_len, max_num_seqs=config.scheduler.max_num_seqs,
                          gpu_memory_utilization=options.gpu_memory_utilization, enforce_eager=options.enforce_eager,
                          enable_prefix_caching=config.cache.enable_prefix_caching, skip_tokenizer_init=True,
                          disable_log_stats=True)
        self.config = config
        self.vllm = VllmLLMEngine.from_engine_args(args)
        cache = self.vllm.vllm_config.cache_config
        self.vllm_block_size = cache.block_size
        self.vllm_num_blocks = cache.num_gpu_blocks or 0
        capacity = self.vllm_num_blocks * self.vllm_block_size // config.cache.block_size
        self.prefix = PrefixEstimate(config.cache.block_size, capacity)
        self.stats = EngineStats()
        self._unfinished: dict[str, _Request] = {}
        self._pending: list[TokenOutput] = []

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    max_tokens: int, ignore_eos: bool = False, keep_kv: bool = False,
                    priority: int = PRIORITY_INTERACTIVE, resume_token_ids=()) -> None:
        """As LLMEngine.add_request. resume_token_ids are appended to the prompt (greedy output
        continues exactly; seeded sampling restarts its stream). keep_kv is unsupported."""
        if keep_kv:
            raise UnsupportedError("the vLLM backend cannot keep a prompt's KV for export")
        if not isinstance(request_id, str) or not request_id or request_id in self._unfinished:
            raise InvalidRequestError(f"request id {request_id!r} is empty or already in use")
        prompt = [*prompt_token_ids, *resume_token_ids]
        self._check(prompt, max_tokens - len(resume_token_ids))
        params = self._sampling(sampling, max_tokens - len(resume_token_ids), ignore_eos)
        self.vllm.add_request(request_id, {"prompt_token_ids": prompt}, params, priority=priority)
        self._unfinished[request_id] = _Request(prompt)

    def abort(self, request_id: str) -> bool:
        if self._unfinished.pop(request_id, None) is None:
            return False
        self.vllm.abort_request([request_id])
        self._pending.append(TokenOutput(request_id, None, "abort", 0))
        return True

    def release(self, request_id: str) -> bool:
        return False  # nothing is ever kept

    def cancel_import(self, request_id: str) -> bool:
        return False  # nothing is ever reserved

    def block_ids_of(self, request_id: str) -> list[int]:
        raise UnsupportedError("the vLLM backend does not lend KV blocks through kvtransfer")

    def reserve_for_import(self, request_id: str, num_prompt_tokens: int, priority: int = PRIORITY_INTERACTIVE):
        raise UnsupportedError("the vLLM backend does not import KV through kvtransfer")

    def add_imported(self, *args, **kwargs) -> None:
        raise UnsupportedError("the vLLM backend does not import KV through kvtransfer")

    # -- the step -------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._unfinished) or bool(self._pending)

    def step(self, arrival=None) -> list[TokenOutput]:
        # `arrival` (see LLMEngine.step) is ignored: a vLLM step is not cut short.
        outputs, self._pending = self._pending, []
        if self._unfinished:
            for out in self.vllm.step():
                outputs += self._advance(out)
        self.stats.steps += 1
        return outputs

    def _advance(self, out) -> list[TokenOutput]:
        req = self._unfinished.get(out.request_id)
        if req is None:
            return []  # aborted between two steps
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        reason = completion.finish_reason if out.finished else None
        cached = out.num_cached_tokens or 0
        queue_ms = 0.0
        if req.first_at is None and tokens:
            req.first_at = time.monotonic()
            queue_ms = (req.first_at - req.added_at) * 1000  # includes the prompt's compute here
            self.stats.prompt_tokens_cached += cached
            self.stats.prompt_tokens_computed += len(req.prompt) - cached
            self.prefix.served(req.prompt)
        self.stats.generated_tokens += len(tokens)
        req.num_generated += len(tokens)
        if out.finished:
            del self._unfinished[out.request_id]
        if not tokens:
            return [TokenOutput(out.request_id, None, reason, cached)] if reason else []
        last = len(tokens) - 1
        return [TokenOutput(out.request_id, t, reason if i == last else None, cached, queue_ms if i == 0 else 0.0)
                for i, t in enumerate(tokens)]

    # -- state ----------------------------------------------------------------------------------

    def load(self) -> LoadSnapshot:
        """Waiting = no token yet; KV use estimated from the running requests' lengths."""
        waiting = [r for r in self._unfinished.values() if r.first_at is None]
        block = self.vllm_block_size
        used = sum(-(-(len(r.prompt) + r.num_generated) // block) for r in self._unfinished.values())
        return LoadSnapshot(len(waiting), len(self._unfinished) - len(waiting), min(used, self.vllm_num_blocks),
                            self.vllm_num_blocks, sum(len(r.prompt) for r in waiting),
                            self.config.scheduler.max_num_seqs)

    def drain_kv_events(self) -> list[KvEvent]:
        return self.prefix.drain()

    def cached_block_hashes(self) -> list[int]:
        return self.prefix.hashes()

    # -- helpers --------------------------------------------------------------------------------

    def _sampling(self, sampling: SamplingParams, max_tokens: int, ignore_eos: bool):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        stop = [] if ignore_eos else list(self.config.model.eos_token_ids)
        return VllmSamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                                  max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop,
                                  detokenize=False, output_kind=RequestOutputKind.DELTA)

    def _check(self, prompt: list[int], max_tokens: int) -> None:
        if not prompt:
            raise InvalidRequestError("prompt_token_ids is empty; send at least one token")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, Integral) or max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        limit = self.config.scheduler.max_model_len
        if len(prompt) + max_tokens > limit:
            raise InvalidRequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) "
                                      f"exceeds max_model_len {limit}; shorten the prompt or lower max_tokens")
        vocab = self.config.model.vocab_size
        for i, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, Integral) or not 0 <= token < vocab:
                raise InvalidRequestError(f"prompt_token_ids[{i}] = {token!r} is not a token id in [0, {vocab})")
