"""Requests for the simulator: the Mooncake trace reader, synthetic generators, and scaling.

A request names its prompt by chained block hashes (equal hash = equal prefix up to and including
that block), exactly what the router's prefix index and the workers' prefix caches key on. The
Mooncake trace already ships such ids, one per 512-token block, so trace requests use them as the
block hashes at block_size 512; only full blocks count (the engine never caches a partial block).

Unbounded reuse (`reuse_unbounded`): the share of the trace's hash ids (all of them, the partial
last block included, as in Dynamo's figure) that some earlier request already had. Because the
ids are chained, "seen before" and "on a cached prefix" are the same thing here: 36.64% for the
conversation trace.
"""

import json
import pathlib
import random
from typing import NamedTuple

TRACE_BLOCK_SIZE = 512
MOONCAKE_TRACE = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data" / \
    "mooncake_conversation_trace.jsonl"
_SYNTHETIC_ID_BASE = 1 << 40  # synthetic block ids never collide with the trace's


class Request(NamedTuple):
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...]  # chained hashes of the prompt's full blocks
    block_size: int
    hash_ids: tuple[int, ...] = ()  # the trace's ids, partial last block included (for reuse)


def read_mooncake(path: str | pathlib.Path = MOONCAKE_TRACE, limit: int | None = None) -> list[Request]:
    requests = []
    with open(path) as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            r = json.loads(line)
            ids = tuple(r["hash_ids"])
            full = r["input_length"] // TRACE_BLOCK_SIZE
            requests.append(Request(f"t{i}", r["timestamp"] / 1000.0, r["input_length"], r["output_length"],
                                    ids[:full], TRACE_BLOCK_SIZE, ids))
    return requests


def reuse_unbounded(requests: list[Request]) -> float:
    """Share of prompt block ids already seen in an earlier request (an infinite cache)."""
    seen: set[int] = set()
    reused = total = 0
    for r in requests:
        ids = r.hash_ids or r.block_hashes
        reused += sum(1 for h in ids if h in seen)
        total += len(ids)
        seen.update(ids)
    return reused / total if total else 0.0


def scale_time(requests: list[Request], rate_scale: float = 1.0, time_scale: float = 1.0) -> list[Request]:
    """Arrival times multiplied by time_scale / rate_scale (rate_scale 2: twice the request rate)."""
    if rate_scale <= 0 or time_scale <= 0:
        raise ValueError("rate_scale and time_scale must be positive")
    factor = time_scale / rate_scale
    t0 = requests[0].arrival_s if requests else 0.0
    return [r._replace(arrival_s=(r.arrival_s - t0) * factor) for r in requests]


def _ids(start: int, n: int) -> tuple[int, ...]:
    return tuple(range(start, start + n))


def poisson_arrivals(n: int, rate_per_s: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


def no_reuse(n: int, rate_per_s: float, prompt_tokens: int, output_tokens: int, block_size: int = 512,
             seed: int = 0) -> list[Request]:
    """The negative control: Poisson arrivals, every prompt unique."""
    blocks = prompt_tokens // block_size
    return [Request(f"u{i}", t, prompt_tokens, output_tokens, _ids(_SYNTHETIC_ID_BASE + i * blocks, blocks), block_size)
            for i, t in enumerate(poisson_arrivals(n, rate_per_s, seed))]


def shared_prefix(groups: int, per_group: int, shared_tokens: int, unique_tokens: int, output_tokens: int,
                  rate_per_s: float, block_size: int = 512, seed: int = 0) -> list[Request]:
    """inference-perf's shared_prefix shape: each group's prompts share a system prompt of
    shared_tokens, then unique_tokens of their own; group order shuffled, Poisson arrivals."""
    rng = random.Random(seed)
    shared_blocks = shared_tokens // block_size
    prompt_tokens = shared_tokens + unique_tokens
    own_blocks = prompt_tokens // block_size - shared_blocks
    order = [g for g in range(groups) for _ in range(per_group)]
    rng.shuffle(order)
    next_id = _SYNTHETIC_ID_BASE + groups * shared_blocks
    requests = []
    for i, (g, t) in enumerate(zip(order, poisson_arrivals(len(order), rate_per_s, seed))):
        hashes = _ids(_SYNTHETIC_ID_BASE + g * shared_blocks, shared_blocks) + _ids(next_id, own_blocks)
        next_id += own_blocks
        requests.append(Request(f"s{i}", t, prompt_tokens, output_tokens, hashes, block_size))
    return requests
