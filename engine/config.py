"""Frozen configuration of the model, the KV cache and the scheduler.

Read from flags and environment only at a service's entry point; everything below takes these.
"""

from dataclasses import dataclass, field

PROMPTS_FIRST = ("by_cost", "always")  # SchedulerConfig.prompts_first


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Gemma-3 text model. Defaults are Gemma-3-270M."""

    name: str = "gemma-3-270m"
    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta_global: float = 1_000_000.0
    rope_theta_local: float = 10_000.0
    sliding_window: int = 512
    # Layer i is global (full attention) when (i + 1) % global_every == 0; the rest slide.
    global_every: int = 6
    query_pre_attn_scalar: float = 256.0
    max_position: int = 32_768
    bos_token_id: int = 2
    # <eos> and <end_of_turn>.
    eos_token_ids: tuple[int, ...] = (1, 106)
    # Random weights from this seed instead of the real checkpoint (tests only).
    random_seed: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if min(self.hidden_size, self.num_layers, self.head_dim, self.sliding_window) <= 0:
            raise ValueError("hidden_size, num_layers, head_dim and sliding_window must be positive")

    def is_global_layer(self, layer: int) -> bool:
        return (layer + 1) % self.global_every == 0

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4  # float32

    @classmethod
    def tiny(cls, seed: int = 0) -> "ModelConfig":
        """Same code and tokenizer, random weights, small enough for unit tests. The 32-token
        window makes short prompts exercise the sliding-window path."""
        return cls(name="gemma-3-tiny-random", hidden_size=64, intermediate_size=128, num_layers=6,
                   num_heads=2, num_kv_heads=1, head_dim=32, sliding_window=32, random_seed=seed)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool: num_blocks blocks of block_size tokens, all layers in each block."""

    block_size: int = 16
    num_blocks: int = 2048
    enable_prefix_caching: bool = True
    # Host-memory tier for preempted sequences' KV, in blocks (0: preempted sequences recompute).
    swap_blocks: int = 1024

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.num_blocks <= 0:
            raise ValueError(f"block_size and num_blocks must be positive, got {self.block_size}, {self.num_blocks}")
        if self.swap_blocks < 0:
            raise ValueError(f"swap_blocks must be >= 0, got {self.swap_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 16
    max_model_len: int = 4096
    # Prompt tokens computed in one step at most (longer prompts are chunked).
    max_num_batched_tokens: int = 2048
    # Prompt tokens of less urgent sequences (batch) one step may carry while a more urgent one
    # (live) is running: its decode steps stay short, batch prompts are chunked meanwhile.
    max_prompt_tokens_beside_urgent: int = 16
    # Prompts first: up to this many steps in a row may carry prompt work alone while running
    # sequences wait to decode (TTFT before ITL, as vLLM's V0 scheduler and SGLang do); then one
    # step decodes everyone. 0: every step is mixed, decodes first.
    max_prompt_only_steps: int = 4
    # "by_cost": a prompt-only step only when it lowers the summed latency by the steps' measured
    # costs (engine/step_cost.py); "always": whenever prompts and decodes wait.
    prompts_first: str = "by_cost"

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_model_len, self.max_num_batched_tokens) <= 0:
            raise ValueError("scheduler limits must be positive")
        if self.max_prompt_tokens_beside_urgent < 0 or self.max_prompt_only_steps < 0:
            raise ValueError("max_prompt_tokens_beside_urgent and max_prompt_only_steps must be >= 0")
        if self.prompts_first not in PROMPTS_FIRST:
            raise ValueError(f"prompts_first must be one of {', '.join(PROMPTS_FIRST)}, got {self.prompts_first!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine instance needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"
