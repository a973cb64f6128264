"""Sampling parameters and the sampler.

Seeded sampling is reproducible wherever a step runs: the randomness of generated token k comes
from (seed, k) alone, so a prefill worker sampling token 0 and a decode worker sampling tokens
1.. produce the same text as one process doing both (given the same logits).
"""

import secrets
import struct
from dataclasses import dataclass

import torch
import xxhash


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches top_p. seed None: fresh randomness."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {type(self.seed).__name__}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: torch.Tensor, params: list[SamplingParams], token_indices: list[int]) -> list[int]:
    """One token per row of logits [N, vocab]; token_indices[i] is k, the index among the
    generated tokens of the token row i samples (0 for the first)."""
    assert logits.shape[0] == len(params) == len(token_indices)
    greedy = logits.argmax(dim=-1).tolist()
    return [greedy[i] if p.is_greedy else _sample_row(logits[i], p, k)
            for i, (p, k) in enumerate(zip(params, token_indices))]


def step_seed(seed: int, k: int) -> int:
    """Seed of the generator for generated token k of a request seeded with `seed`."""
    mask = (1 << 64) - 1
    return xxhash.xxh3_64_intdigest(struct.pack("<QQ", seed & mask, k & mask)) >> 1


def _sample_row(logits: torch.Tensor, params: SamplingParams, k: int) -> int:
    seed = secrets.randbits(63) if params.seed is None else step_seed(params.seed, k)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    kept = sorted_probs[before < params.top_p]  # a prefix; never empty (the top token has 0 before it)
    # Inverse CDF on the kept prefix: no kernel-specific multinomial, so any machine agrees.
    cdf = torch.cumsum(kept, dim=-1)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    pick = min(int(torch.searchsorted(cdf, u).item()), kept.numel() - 1)
    return int(order[pick].item())
