"""VllmEngine: vLLM's engine behind the LLMEngine interface the services drive.

Same threading contract as engine.llm_engine.LLMEngine: not thread-safe, every call (step()
included) from one engine thread (services/common/engine_runner.py). vLLM runs the model in its
own engine-core process; step() returns what that process produced since the last step, one
TokenOutput per new token (vLLM streams deltas, normally one token per request per step).

What maps and what does not:
- add_request / abort / step / has_unfinished / load: vLLM's request API. stats: the prompt
  counters are vLLM's own per-step accounting (a stat logger, _prompt_token_counter), so
  prompt_tokens_computed is what vLLM really computed; a request's num_cached_tokens is its
  RequestOutput's (vLLM reports 0 there for a prompt pulled from another worker).
- KV events: vLLM's own block hashes are salted and use vLLM's block size, so they cannot feed
  our router's prefix index. We publish our chained hashes (engine/hashing.py, our block size)
  of the prompt blocks vLLM served, and a "removed" for the oldest once they exceed what vLLM's
  KV cache can hold (an LRU estimate of its prefix cache, see PrefixEstimate).
- KV handoff: vLLM's own NixlConnector moves the KV (options.kv_connector = "nixl"), not our
  kvtransfer (the KV lives in vLLM's worker process, in vLLM's layout). keep_kv=True adds the
  request with do_remote_decode: vLLM keeps its blocks for a remote decoder (until pulled, or
  options.kv_lease_s) and kv_transfer_params_of() returns the parameters a decoder needs;
  add_remote_prefilled() adds a request with them (do_remote_prefill): vLLM's connector pulls
  the prompt's KV from the holder before the first step that schedules it. block_ids_of /
  reserve_for_import / add_imported (our pool's import path) raise UnsupportedError.
"""

import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from numbers import Integral

from engine.block_manager import KvEvent
from engine.config import EngineConfig
from engine.errors import InvalidRequestError, UnknownRequestError
from engine.hashing import block_hashes
from engine.llm_engine import EngineStats, LoadSnapshot, TokenOutput
from engine.sampling import SamplingParams
from engine.sequence import PRIORITY_INTERACTIVE


class UnsupportedError(InvalidRequestError):
    """The vLLM backend has no such operation (KV import/export through our kvtransfer)."""


KV_CONNECTORS = ("nixl", "none")
KV_TRANSPORT = "vllm-nixl"  # how KV handles name KV that vLLM's NixlConnector moves itself


@dataclass(frozen=True)
class VllmOptions:
    """How the vLLM engine is built (read from flags at the worker's entry point)."""

    model_dir: str = ""  # Hugging Face style directory (engine.hf_export); "" = the default one
    gpu_memory_utilization: float = 0.25  # sizes the KV cache when kv_cache_bytes is 0
    # The KV cache's size in bytes (vLLM's kv_cache_memory_bytes); None: the engine config's blocks,
    # as many tokens as the builtin engine's cache (kv_cache_bytes()); 0: a share of the device's
    # memory (gpu_memory_utilization; on the CPU build, of the memory free on the NUMA node when the
    # worker starts, which on a shared machine can leave less than the weights: the worker then fails).
    kv_cache_bytes: int | None = None
    enforce_eager: bool = True  # torch.compile on 2 shared cores costs minutes at start-up
    # vLLM's NixlConnector (CPU KV buffer, NIXL/UCX) for P/D handoff between vLLM workers; "none": off.
    kv_connector: str = "nixl"
    # Where other vLLM workers reach this one's NIXL side channel (handshake); port 0 = any free port.
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 0
    # How long a prefilled request's blocks wait for their decoder (our lease TTL).
    kv_lease_s: int = 30
    # vLLM's stat loggers: its Prometheus counters (served on the worker's /metrics) and its
    # prompt-token accounting our prompt counters come from (off: those stay 0; bench only).
    log_stats: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_connector not in KV_CONNECTORS:
            raise ValueError(f"kv_connector must be one of {list(KV_CONNECTORS)}, got {self.kv_connector!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 0:
            raise ValueError(f"kv_cache_bytes must be >= 0, got {self.kv_cache_bytes}")
        if not 0 <= self.side_channel_port < 65536 or self.kv_lease_s < 1:
            raise ValueError(f"side_channel_port must be in [0, 65536) and kv_lease_s >= 1: {self}")


def kv_cache_bytes(config: EngineConfig, options: VllmOptions) -> int:
    """The bytes of KV cache vLLM gets (0: it sizes the cache by gpu_memory_utilization)."""
    if options.kv_cache_bytes is not None:
        return options.kv_cache_bytes
    return config.cache.num_blocks * config.cache.block_size * config.model.kv_bytes_per_token


class _Request:
    __slots__ = ("prompt", "added_at", "first_at", "num_generated")

    def __init__(self, prompt: list[int]):
        self.prompt, self.added_at, self.first_at, self.num_generated = prompt, time.monotonic(), None, 0


def _kv_transfer_config(options: VllmOptions):
    """NixlConnector on host memory. The side channel's host and port are environment variables
    of vLLM's worker process (it inherits ours when vLLM spawns it), so they are set here."""
    from vllm.config import KVTransferConfig
    if options.kv_connector == "none":
        return None
    port = options.side_channel_port or _free_port(options.side_channel_host)
    os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = options.side_channel_host
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port)
    return KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_both", kv_buffer_device="cpu",
                            kv_connector_extra_config={"kv_lease_duration": options.kv_lease_s})


def _prompt_token_counter(stats: EngineStats):
    """A vLLM stat logger adding vLLM's own per-step prompt-token accounting to our counters:
    computed here -> prompt_tokens_computed, its prefix-cache hits -> prompt_tokens_cached. Tokens
    pulled from another worker count in neither, as with our engine. Runs on the engine thread
    (vLLM records inside step())."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class PromptTokenCounter(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if iteration_stats is not None:
                tokens = iteration_stats.prompt_token_stats
                stats.prompt_tokens_computed += tokens.computed
                stats.prompt_tokens_cached += tokens.local_cache_hit

        def log_engine_initialized(self):
            pass

    return PromptTokenCounter


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
                          gpu_memory_utilization=options.gpu_memory_utilization,
                          kv_cache_memory_bytes=kv_cache_bytes(config, options) or None,
                          enforce_eager=options.enforce_eager,
                          enable_prefix_caching=config.cache.enable_prefix_caching, skip_tokenizer_init=True,
                          kv_transfer_config=_kv_transfer_config(options),
                          disable_log_stats=not options.log_stats)
        self.stats = EngineStats()
        self.config = config
        self.vllm = VllmLLMEngine.from_engine_args(args, stat_loggers=[_prompt_token_counter(self.stats)])
        cache = self.vllm.vllm_config.cache_config
        self.vllm_block_size = cache.block_size
        self.vllm_num_blocks = cache.num_gpu_blocks or 0
        capacity = self.vllm_num_blocks * self.vllm_block_size // config.cache.block_size
        self.prefix = PrefixEstimate(config.cache.block_size, capacity)
        self.kv_connector = options.kv_connector
        self._unfinished: dict[str, _Request] = {}
        self._pending: list[TokenOutput] = []
        self._kv_params: dict[str, dict] = {}  # finished keep_kv requests -> vLLM's kv_transfer_params

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    max_tokens: int, ignore_eos: bool = False, keep_kv: bool = False,
                    priority: int = PRIORITY_INTERACTIVE, resume_token_ids=()) -> None:
        """As LLMEngine.add_request. resume_token_ids are appended to the prompt (greedy output
        continues exactly; seeded sampling restarts its stream). keep_kv: vLLM keeps the prompt's
        KV for a remote decoder once the request finishes (kv_transfer_params_of)."""
        if keep_kv and self.kv_connector == "none":
            raise UnsupportedError("this vLLM worker runs without a KV connector (--vllm-kv-connector none)")
        self._add(request_id, [*prompt_token_ids, *resume_token_ids], sampling, max_tokens - len(resume_token_ids),
                  ignore_eos, priority, {"do_remote_decode": True} if keep_kv else None)

    def add_remote_prefilled(self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: dict,
                             sampling: SamplingParams, max_tokens: int, ignore_eos: bool = False,
                             priority: int = PRIORITY_INTERACTIVE) -> None:
        """Adds a request whose prompt KV another vLLM worker holds (its kv_transfer_params_of()):
        vLLM's connector pulls it, then vLLM computes only the last prompt position's logits and
        generates every token itself (token 0 included, so a seeded stream is vLLM's own)."""
        if self.kv_connector == "none":
            raise UnsupportedError("this vLLM worker runs without a KV connector (--vllm-kv-connector none)")
        if not isinstance(kv_transfer_params, dict) or not kv_transfer_params.get("do_remote_prefill"):
            raise InvalidRequestError("kv_transfer_params must be a vLLM prefill's parameters (do_remote_prefill)")
        self._add(request_id, list(prompt_token_ids), sampling, max_tokens, ignore_eos, priority, kv_transfer_params)

    def kv_transfer_params_of(self, request_id: str) -> dict:
        """The parameters a decoder needs to pull a finished keep_kv request's KV (vLLM holds the
        blocks until pulled or kv_lease_s). Raises UnknownRequestError when there are none."""
        params = self._kv_params.pop(request_id, None)
        if params is None:
            raise UnknownRequestError(f"no KV kept for request {request_id!r}")
        return params

    def _add(self, request_id: str, prompt: list[int], sampling: SamplingParams, max_tokens: int,
             ignore_eos: bool, priority: int, kv_transfer_params: dict | None) -> None:
        if not isinstance(request_id, str) or not request_id or request_id in self._unfinished:
            raise InvalidRequestError(f"request id {request_id!r} is empty or already in use")
        self._check(prompt, max_tokens)
        params = self._sampling(sampling, max_tokens, ignore_eos, kv_transfer_params)
        self.vllm.add_request(request_id, {"prompt_token_ids": prompt}, params, priority=priority)
        self._unfinished[request_id] = _Request(prompt)

    def abort(self, request_id: str) -> bool:
        if self._unfinished.pop(request_id, None) is None:
            return False
        self.vllm.abort_request([request_id])
        self._pending.append(TokenOutput(request_id, None, "abort", 0))
        return True

    def release(self, request_id: str) -> bool:
        """Forgets a kept request's parameters; vLLM frees its blocks once the decoder has pulled
        them or kv_lease_s passed (its connector owns them, there is no earlier free)."""
        return self._kv_params.pop(request_id, None) is not None

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
            queue_ms = (req.first_at - req.added_at) * 1000  # includes the prompt's compute (or pull) here
            self.prefix.served(req.prompt)
        self.stats.generated_tokens += len(tokens)
        req.num_generated += len(tokens)
        if out.finished:
            del self._unfinished[out.request_id]
            if out.kv_transfer_params:
                self._kv_params[out.request_id] = dict(out.kv_transfer_params)
        if not tokens:
            return [TokenOutput(out.request_id, None, reason, cached)] if reason else []
        last = len(tokens) - 1
        return [TokenOutput(out.request_id, t, reason if i == last else None, cached, queue_ms if i == 0 else 0.0)
                for i, t in enumerate(tokens)]

    # -- state ----------------------------------------------------------------------------------

    def step_cost(self) -> None:
        """No step cost fit: vLLM schedules its own steps (LLMEngine.step_cost is ours)."""
        return None

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

    def _sampling(self, sampling: SamplingParams, max_tokens: int, ignore_eos: bool, kv_transfer_params=None):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        stop = [] if ignore_eos else list(self.config.model.eos_token_ids)
        return VllmSamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                                  max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop,
                                  detokenize=False, output_kind=RequestOutputKind.DELTA,
                                  extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None)

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
