"""The cost model of one hardware profile: how long prefill, a decode step and a KV transfer take.

    prefill_s(uncached u, cached c) = prefill_base_s + prefill_per_token_s * u
                                      + prefill_per_token_ctx_s * u * c + prefill_per_token_sq_s * u * u
    decode_step_s(batch B, context C) = decode_base_s + decode_per_seq_s * B + decode_per_ctx_token_s * C
    transfer_s(bytes) = transfer_latency_s + bytes / transfer_bytes_per_s

Serving overhead: a worker inside the mesh (gRPC threads, load reports, KV events, lending with
a checksum) computes more slowly than the bare engine the coefficients were fitted to. Every
prefill time is multiplied by prefill_overhead and every decode step by decode_overhead (measured
on a live 1 prefill + 1 decode mesh by `sim.calibrate --serving-only`; 1.0 when a profile has no
measurement, as the GPU profiles, whose figures are published engine throughputs).

The quadratic prefill terms are attention: new token i attends to c + i earlier tokens, so u new
tokens after c cached ones make u * c pairs with the cache and u * u / 2 among themselves. On a
GPU every pair costs alike (prefill_per_token_sq_s = prefill_per_token_ctx_s / 2, the default:
u * (c + u/2) pairs); our CPU engine's cost is not one per pair (5 of 6 layers see only a
512-token window of the cache, and a step materialises its u x (c + u) masks and scores), so
sim.calibrate fits the two apart. C in decode is the batch's total context (the KV a step reads).

A profile YAML (sim/profiles/NAME.yaml) gives the coefficients directly (`coefficients:`, e.g.
fitted by sim.calibrate from measurements) or the published figures they follow from (`derive:`
hardware FLOPs and bandwidth, model size and shape, assumed efficiencies; each with its source),
plus the worker's KV capacity and batch limit.
"""

import pathlib
from dataclasses import dataclass

from services.common.profiles import read_profile
from sim.host import slowdown_curve

PROFILES_DIR = pathlib.Path(__file__).parent / "profiles"
_INTS = ("kv_bytes_per_token", "kv_capacity_tokens", "max_batch", "prefill_chunk_tokens")


@dataclass(frozen=True)
class CostModel:
    name: str
    prefill_base_s: float
    prefill_per_token_s: float
    prefill_per_token_ctx_s: float  # per (new token, cached token) pair
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_ctx_token_s: float
    transfer_latency_s: float
    transfer_bytes_per_s: float
    kv_bytes_per_token: int
    kv_capacity_tokens: int  # per worker
    max_batch: int = 256  # sequences per step
    prefill_chunk_tokens: int = 8192  # prompt tokens computed per step at most (chunked prefill)
    # How a step of several sequences pays for attention: "varlen" (each sequence its own
    # n * (c + n/2), as FlashAttention's variable-length kernels do) or "padded" (every sequence
    # padded to the step's longest query and context, as our CPU engine's batched SDPA does).
    attention: str = "varlen"
    rpc_s: float = 0.0  # router <-> worker round trip, paid once per RPC on the request's path
    # Workers sharing one host's CPU (sim/host.py): 0 = a device per worker (no sharing); else all
    # workers share a host of host_cores cores, each computing host_slowdown[n - 1] times slower
    # while n of them compute at once (measured for n = 1 .. len; processor sharing beyond).
    host_cores: float = 0.0
    host_slowdown: tuple[float, ...] = (1.0,)
    # Cores' worth of the host's CPU that other processes take meanwhile (other tenants of a shared
    # machine, the router): not a property of the hardware, so no profile sets it; a validation
    # run measures it and predicts with it (sim/validate.py).
    host_background_cores: float = 0.0
    # per (new token, new token) in a step; None = prefill_per_token_ctx_s / 2 (every pair alike)
    prefill_per_token_sq_s: float | None = None
    prefill_overhead: float = 1.0  # served / bare-engine prefill time
    decode_overhead: float = 1.0  # served / bare-engine decode step time

    def __post_init__(self) -> None:
        if self.transfer_bytes_per_s <= 0 or self.kv_capacity_tokens <= 0 or self.max_batch <= 0:
            raise ValueError(f"{self.name}: transfer bandwidth, KV capacity and max_batch must be positive")
        if self.attention not in ("varlen", "padded"):
            raise ValueError(f"{self.name}: attention must be 'varlen' or 'padded', got {self.attention!r}")
        if min(self.prefill_per_token_s, self.decode_base_s) <= 0:
            raise ValueError(f"{self.name}: prefill_per_token_s and decode_base_s must be positive")
        if min(self.prefill_overhead, self.decode_overhead) <= 0:
            raise ValueError(f"{self.name}: serving overheads are positive factors (1.0 = none)")
        if self.host_cores:
            slowdown_curve(self.host_slowdown, self.host_cores, self.host_background_cores)  # ValueError if malformed

    def prefill_s(self, uncached: int, cached: int = 0) -> float:
        """One prompt prefilled alone in one step."""
        return self.prefill_fixed_s() + self.prefill_tokens_s(uncached) + self.attention_s([(uncached, cached)])

    def prefill_fixed_s(self) -> float:
        """The fixed cost of a prefill step (reading the weights once)."""
        return self.prefill_overhead * self.prefill_base_s

    def prefill_tokens_s(self, tokens: int) -> float:
        """The per-token cost of `tokens` new prompt tokens in a step (attention aside)."""
        return self.prefill_overhead * self.prefill_per_token_s * tokens

    def attention_s(self, chunks: list[tuple[int, int]]) -> float:
        """The attention term of one step over (new tokens, context before them) per sequence."""
        if self.attention == "padded" and len(chunks) > 1:
            longest = max(n for n, _ in chunks)
            chunks = [(longest, max(c for _, c in chunks))] * len(chunks)
        sq = self.prefill_per_token_ctx_s / 2 if self.prefill_per_token_sq_s is None else self.prefill_per_token_sq_s
        return self.prefill_overhead * sum(n * (self.prefill_per_token_ctx_s * c + sq * n) for n, c in chunks)

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        return self.decode_overhead * (self.decode_base_s + self.decode_per_seq_s * batch
                                       + self.decode_per_ctx_token_s * context_tokens)

    def prompts_first_pays(self, prompts: int) -> bool:
        """The decode engine's prompts-first rule (engine/step_cost.py) on these costs: `prompts`
        waiting prompts go before the running decodes when prompts x a decode's cost exceeds a
        step's fixed cost (never on the shipped profiles' weight-bound steps but for a dozen)."""
        return prompts * self.decode_per_seq_s > self.decode_base_s

    def decode_growth_s(self, batch: int) -> float:
        """How much longer each decode step of `batch` sequences gets than the one before it."""
        return self.decode_overhead * self.decode_per_ctx_token_s * batch

    def transfer_s(self, num_tokens: int) -> float:
        return self.transfer_latency_s + num_tokens * self.kv_bytes_per_token / self.transfer_bytes_per_s

    def kv_capacity_blocks(self, block_size: int) -> int:
        return self.kv_capacity_tokens // block_size


def derive(spec: dict) -> dict:
    """Coefficients from published figures: compute-bound prefill at prefill_mfu of peak FLOPs
    (2 FLOPs per parameter per token + 4 * layers * q_width per attended token-pair), memory-bound
    decode at decode_mbu of HBM bandwidth (all weights plus the batch's KV read per step)."""
    hw, model, eff = ({k: float(v["value"]) for k, v in spec[s].items()} for s in ("hardware", "model", "efficiency"))
    flops = hw["peak_bf16_flops"] * eff["prefill_mfu"]
    hbm = hw["hbm_bytes_per_s"] * eff["decode_mbu"]
    params, layers = model["params"], model["num_layers"]
    kv_bytes = int(2 * layers * model["num_kv_heads"] * model["head_dim"] * model["dtype_bytes"])
    weight_bytes = params * model["dtype_bytes"]
    kv_budget = hw["hbm_bytes"] * eff["gpu_memory_utilization"] - weight_bytes - eff["activation_reserve_bytes"]
    return {
        "prefill_base_s": eff["prefill_overhead_s"],
        "prefill_per_token_s": 2 * params / flops,
        "prefill_per_token_ctx_s": 4 * layers * model["num_heads"] * model["head_dim"] / flops,
        "decode_base_s": eff["decode_overhead_s"] + weight_bytes / hbm,
        "decode_per_seq_s": 2 * params / flops,
        "decode_per_ctx_token_s": kv_bytes / hbm,
        "transfer_latency_s": hw["link_latency_s"],
        "transfer_bytes_per_s": hw["link_bytes_per_s"],
        "kv_bytes_per_token": kv_bytes,
        "kv_capacity_tokens": int(kv_budget // kv_bytes),
        "max_batch": int(eff["max_batch"]),
        "prefill_chunk_tokens": int(eff["prefill_chunk_tokens"]),
        "rpc_s": hw.get("rpc_s", 0.0),
    }


def load_costs(name_or_path: str) -> CostModel:
    """A profile by name (sim/profiles/NAME.yaml) or path."""
    name, spec = read_profile(name_or_path, PROFILES_DIR, "cost")
    coefficients = derive(spec["derive"]) if "derive" in spec else dict(spec["coefficients"])
    coefficients = {k: (v if k == "attention" else tuple(map(float, v)) if k == "host_slowdown"
                        else int(v) if k in _INTS else float(v)) for k, v in coefficients.items()}
    return CostModel(name=name, **coefficients)
