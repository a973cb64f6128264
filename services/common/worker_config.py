"""Configuration shared by prefill and decode workers, and the flags that fill it.

Flags and environment are read only here (at the entry point); everything else takes the
frozen dataclass.
"""

import argparse
import math
import os
import uuid
from dataclasses import dataclass, field

from engine.config import (
    PROMPTS_FIRST,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from engine.vllm_backend import KV_CONNECTORS, VllmOptions
from services.common.tls import TlsConfig, add_tls_flags, tls_from_args

ENGINES = ("builtin", "vllm")


@dataclass(frozen=True)
class WorkerConfig:
    role: str  # "prefill" or "decode"
    worker_id: str
    host: str = "127.0.0.1"
    port: int = 0
    # Host other processes use to reach us (KV handles carry it).
    advertise_host: str = "127.0.0.1"
    engine: EngineConfig = field(default_factory=EngineConfig)
    lease_ttl_s: float = 30.0
    # Transports to use or offer, best first.
    kv_transports: tuple[str, ...] = ("nixl", "grpc")
    torch_threads: int = 2
    max_tokens_cap: int = 4096
    ready_file: str | None = None
    drain_grace_s: float = 30.0
    metrics_port: int | None = None  # Prometheus /metrics; 0 = any free port, None = off
    tls: TlsConfig | None = None  # mutual TLS for the server and every channel it opens; None = plaintext
    # Which engine serves: our PyTorch engine, or vLLM (optional extra, see README "vLLM backend").
    engine_backend: str = "builtin"
    vllm: VllmOptions = field(default_factory=VllmOptions)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {self.role!r}")
        known = {"nixl", "grpc"}
        if not self.kv_transports or set(self.kv_transports) - known:
            raise ValueError(f"kv_transports must be a non-empty subset of {sorted(known)}, got {self.kv_transports}")
        if self.engine_backend not in ENGINES:
            raise ValueError(f"engine_backend must be one of {list(ENGINES)}, got {self.engine_backend!r}")
        if self.lease_ttl_s <= 0 or self.torch_threads <= 0:
            raise ValueError("lease_ttl_s and torch_threads must be positive")


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--worker-id", default=env("PDMESH_WORKER_ID", ""))
    parser.add_argument("--host", default=env("PDMESH_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("PDMESH_PORT", "0")))
    parser.add_argument("--advertise-host", default=env("PDMESH_ADVERTISE_HOST", "127.0.0.1"))
    parser.add_argument("--model", choices=["gemma-3-270m", "tiny"], default=env("PDMESH_MODEL", "gemma-3-270m"),
                        help="tiny = random weights of the same architecture (tests)")
    parser.add_argument("--num-blocks", type=int, default=int(env("PDMESH_NUM_BLOCKS", "1024")))
    parser.add_argument("--block-size", type=int, default=int(env("PDMESH_BLOCK_SIZE", "16")))
    parser.add_argument("--swap-blocks", type=int, default=int(env("PDMESH_SWAP_BLOCKS", "1024")),
                        help="host-memory blocks for preempted sequences' KV (0: preempted sequences recompute)")
    parser.add_argument("--max-num-seqs", type=int, default=int(env("PDMESH_MAX_NUM_SEQS", "16")))
    parser.add_argument("--max-model-len", type=int, default=int(env("PDMESH_MAX_MODEL_LEN", "4096")))
    parser.add_argument("--max-prompt-tokens-beside-urgent", type=int,
                        default=int(env("PDMESH_MAX_PROMPT_TOKENS_BESIDE_URGENT", "16")),
                        help="batch prompt tokens a step may carry while a live sequence runs (chunked meanwhile)")
    parser.add_argument("--max-prompt-only-steps", type=int, default=int(env("PDMESH_MAX_PROMPT_ONLY_STEPS", "4")),
                        help="prompts first: steps in a row that may compute prompts alone while sequences wait "
                             "to decode, then one step decodes them (0: every step decodes first)")
    parser.add_argument("--prompts-first", choices=PROMPTS_FIRST, default=env("PDMESH_PROMPTS_FIRST", "by_cost"),
                        help="by_cost: a prompt-only step only when the engine's measured step costs say it lowers "
                             "the summed latency; always: whenever prompts and decodes wait")
    parser.add_argument("--kv-transports", default=env("PDMESH_KV_TRANSPORTS", "nixl,grpc"),
                        help="comma-separated, best first: nixl,grpc")
    parser.add_argument("--lease-ttl-s", type=float, default=float(env("PDMESH_LEASE_TTL_S", "30")))
    parser.add_argument("--torch-threads", type=int, default=int(env("PDMESH_TORCH_THREADS", "2")))
    parser.add_argument("--metrics-port", type=int, default=metrics_port_from_env(),
                        help="serve Prometheus /metrics on this port (0: any free port; default off)")
    parser.add_argument("--engine", choices=ENGINES, default=env("PDMESH_ENGINE", "builtin"),
                        help="vllm needs the vLLM venv (scripts/setup_vllm.sh); decode workers only")
    parser.add_argument("--vllm-model-dir", default=env("PDMESH_VLLM_MODEL_DIR", ""),
                        help="Hugging Face style directory (default: the one engine.hf_export writes)")
    kv_cache_bytes = env("PDMESH_VLLM_KV_CACHE_BYTES", "")
    parser.add_argument("--vllm-kv-cache-bytes", type=int, default=int(kv_cache_bytes) if kv_cache_bytes else None,
                        help="vLLM's KV cache in bytes (default: --num-blocks x --block-size tokens, as the "
                             "builtin engine; 0: --vllm-gpu-memory-utilization sizes it)")
    parser.add_argument("--vllm-gpu-memory-utilization", type=float,
                        default=float(env("PDMESH_VLLM_GPU_MEMORY_UTILIZATION", "0.25")),
                        help="share of memory vLLM sizes its KV cache from, with --vllm-kv-cache-bytes 0")
    parser.add_argument("--vllm-kv-connector", choices=KV_CONNECTORS, default=env("PDMESH_VLLM_KV_CONNECTOR", "nixl"),
                        help="vLLM's NixlConnector for prefill -> decode KV handoff between vLLM workers")
    parser.add_argument("--vllm-side-channel-port", type=int, default=int(env("PDMESH_VLLM_SIDE_CHANNEL_PORT", "0")),
                        help="port of vLLM's NIXL handshake, reached at --advertise-host (0: any free port)")
    parser.add_argument("--ready-file", default=None, help="write a JSON line with the bound port here")
    add_tls_flags(parser)


def worker_config_from_args(role: str, args: argparse.Namespace) -> WorkerConfig:
    model = ModelConfig.tiny() if args.model == "tiny" else ModelConfig()
    engine = EngineConfig(
        model=model,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks, swap_blocks=args.swap_blocks),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                  max_prompt_tokens_beside_urgent=args.max_prompt_tokens_beside_urgent,
                                  max_prompt_only_steps=args.max_prompt_only_steps,
                                  prompts_first=args.prompts_first),
    )
    return WorkerConfig(
        role=role, worker_id=args.worker_id or f"{role}-{uuid.uuid4().hex[:6]}", host=args.host, port=args.port,
        advertise_host=args.advertise_host, engine=engine, lease_ttl_s=args.lease_ttl_s,
        kv_transports=tuple(t.strip() for t in args.kv_transports.split(",") if t.strip()),
        torch_threads=args.torch_threads, max_tokens_cap=args.max_model_len, ready_file=args.ready_file,
        metrics_port=args.metrics_port, tls=tls_from_args(args), engine_backend=args.engine,
        vllm=VllmOptions(model_dir=args.vllm_model_dir, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                         kv_cache_bytes=args.vllm_kv_cache_bytes,
                         kv_connector=args.vllm_kv_connector, side_channel_host=args.advertise_host,
                         side_channel_port=args.vllm_side_channel_port, kv_lease_s=math.ceil(args.lease_ttl_s)),
    )


def metrics_port_from_env() -> int | None:
    value = os.environ.get("PDMESH_METRICS_PORT", "")
    return int(value) if value.strip() else None
