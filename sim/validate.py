"""Replays a scaled-down slice of the Mooncake trace against the real mesh on this machine and
predicts the same run in the simulator with the calibrated CPU profile.

Scaling, exactly: requests [start, start + n) of the trace; every length divided by `factor`
(32: a 512-token trace block becomes one 16-token engine block), prompt tokens = ceil(input /
factor), output tokens = ceil(output / factor) clipped to [2, max_output]; requests whose scaled
prompt exceeds max_prompt are skipped. Each trace hash id becomes a fixed run of 16 token ids
drawn from random.Random(hash id), so equal leading ids are equal leading tokens: the trace's
shared prefixes are real shared prefixes for the engine's prefix cache. Arrivals keep the trace's
order and relative spacing, rescaled so the slice arrives at `rate` requests per second (open loop).
TTFT is measured by the client from each request's scheduled arrival. The simulator runs the same
requests (block hashes from engine/hashing.py over the same tokens) on 2 prefill + 2 decode
workers with the worker's KV size and the cpu-local cost profile — as calibrated, and scaled by
the slowdown of a 512-token probe prompt timed alone on the live mesh before the replay.
"""

import asyncio
import dataclasses
import math
import os
import random
import time
from typing import NamedTuple

from engine.hashing import block_hashes
from sim.costs import CostModel
from sim.metrics import percentile
from sim.run import simulate
from sim.trace import Request, read_mooncake

ENGINE_BLOCK = 16


class Slice(NamedTuple):
    start: int = 0
    n: int = 40
    factor: int = 32
    max_prompt: int = 1024
    max_output: int = 16
    rate: float = 0.4
    num_blocks: int = 512  # per worker: 8,192 tokens
    seed: int = 0


def _run_tokens(hash_id: int) -> list[int]:
    rng = random.Random(hash_id)
    return [rng.randrange(1000, 200_000) for _ in range(ENGINE_BLOCK)]


def scaled_requests(s: Slice) -> tuple[list[Request], dict[str, list[int]]]:
    trace = read_mooncake(limit=s.start + s.n * 4)[s.start:]
    picked, tokens = [], {}
    for r in trace:
        prompt = math.ceil(r.prompt_tokens / s.factor)
        if prompt > s.max_prompt:
            continue
        ids = [t for h in r.hash_ids for t in _run_tokens(h)][:prompt]
        output = min(s.max_output, max(2, math.ceil(r.output_tokens / s.factor)))
        picked.append(Request(r.request_id, r.arrival_s, prompt, output, tuple(block_hashes(ids, ENGINE_BLOCK)),
                              ENGINE_BLOCK, r.hash_ids))
        tokens[r.request_id] = ids
        if len(picked) == s.n:
            break
    # Keep the trace's relative spacing, at `rate` requests per second on average.
    t0, span = picked[0].arrival_s, max(picked[-1].arrival_s - picked[0].arrival_s, 1e-9)
    stretch = (len(picked) - 1) / s.rate / span
    return [r._replace(arrival_s=(r.arrival_s - t0) * stretch) for r in picked], tokens


PROBE_TOKENS = 512


async def _replay(address: str, requests: list[Request], tokens: dict) -> tuple[list[dict], list[float]]:
    """Warm-up, then two probe prompts alone (their prefill time on the live mesh), then the slice."""
    import grpc

    from pdmesh.v1 import router_pb2_grpc
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        rng = random.Random(-1)  # warm-up and probe prompts share nothing with the slice
        draw = lambda n: [rng.randrange(1000, 200_000) for _ in range(n)]  # noqa: E731
        for _ in range(2):
            await asyncio.gather(*(_first_token(stub, draw(160), 2, 0.0) for _ in range(2)))
        probes = [(await _first_token(stub, draw(PROBE_TOKENS), 2, 0.0))["prefill_ms"] / 1000 for _ in range(2)]
        await asyncio.sleep(1.0)
        t0 = time.perf_counter() + 0.5
        measured = await asyncio.gather(*(_first_token(stub, tokens[r.request_id], r.output_tokens, t0 + r.arrival_s)
                                          for r in requests))
        return list(measured), probes


async def _first_token(stub, ids: list[int], max_tokens: int, at: float) -> dict:
    """Sends one request at `at` (0: now); TTFT from `at`, plus the router's phase timings."""
    from pdmesh.v1 import common_pb2, router_pb2
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    at = at or time.perf_counter()
    request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=ids), max_tokens=max_tokens,
                                         sampling=common_pb2.SamplingParams(temperature=0.0), ignore_eos=True)
    first, last = None, None
    async for message in stub.Generate(request, timeout=900):
        if message.token_ids and first is None:
            first = time.perf_counter()
        last = message
    t, p = last.timings, last.placement
    return {"ttft_s": first - at, "router_ttft_ms": round(t.time_to_first_token_ms, 1),
            "prefill_ms": round(t.prefill_ms, 1), "kv_transfer_ms": round(t.kv_transfer_ms, 1),
            "decision": p.decision, "prefill_worker": p.prefill_worker_id, "decode_worker": p.decode_worker_id,
            "cached_tokens": last.usage.cached_prompt_tokens}


def measure_mesh(s: Slice, requests: list[Request], tokens: dict, progress) -> tuple[list[dict], list[float]]:
    from pdmesh.launcher import MeshSpec, start_mesh
    spec = MeshSpec(num_prefill=2, num_decode=2, router_port=0, profile="prefix_aware", num_blocks=s.num_blocks,
                    torch_threads=1, max_model_len=4096)
    progress(f"starting the real mesh: 2 prefill + 2 decode, {s.num_blocks} KV blocks each, 1 torch thread each")
    mesh = start_mesh(spec, progress=lambda m: None)
    try:
        progress(f"replaying {len(requests)} requests open loop over {requests[-1].arrival_s:.0f} s "
                 f"(load average {os.getloadavg()[0]:.1f})")
        return asyncio.run(_replay(mesh.router_address, requests, tokens))
    finally:
        mesh.stop()


def slowed(costs: CostModel, factor: float) -> CostModel:
    """The profile with every compute time multiplied by factor (transfers and RPCs unchanged)."""
    return dataclasses.replace(costs, **{k: getattr(costs, k) * factor for k in (
        "prefill_base_s", "prefill_per_token_s", "prefill_per_token_ctx_s",
        "decode_base_s", "decode_per_seq_s", "decode_per_ctx_token_s")})


def validate(costs: CostModel, s: Slice, progress) -> dict:
    """Measures the slice on the real mesh and predicts it twice: with the calibrated profile as
    is, and with its compute times scaled by the slowdown of a probe prompt measured on the live
    mesh just before the replay (on a shared machine the mesh's processes get less CPU than the
    calibration did; the probe measures how much less, not the slice itself)."""
    requests, tokens = scaled_requests(s)
    costs = dataclasses.replace(costs, kv_capacity_tokens=s.num_blocks * ENGINE_BLOCK)
    per_request, probes = measure_mesh(s, requests, tokens, progress)
    measured = [r["ttft_s"] for r in per_request]
    slowdown = min(probes) / costs.prefill_s(PROBE_TOKENS)
    predicted = simulate(requests, costs, 2, 2, "prefix_aware", seed=s.seed, block_size=ENGINE_BLOCK)
    scaled = simulate(requests, slowed(costs, slowdown), 2, 2, "prefix_aware", seed=s.seed, block_size=ENGINE_BLOCK)
    m50, m90 = percentile(measured, 0.5), percentile(measured, 0.9)
    err = lambda p, m: round(abs(p - m) / m, 3)  # noqa: E731
    return {
        "slice": s._asdict(), "requests": len(requests),
        "prompt_tokens_mean": round(sum(r.prompt_tokens for r in requests) / len(requests), 1),
        "output_tokens_mean": round(sum(r.output_tokens for r in requests) / len(requests), 1),
        "measured_ttft_p50_s": round(m50, 3), "measured_ttft_p90_s": round(m90, 3),
        "predicted_ttft_p50_s": predicted["ttft_p50_s"], "predicted_ttft_p90_s": predicted["ttft_p90_s"],
        "ttft_p50_prediction_error": err(predicted["ttft_p50_s"], m50),
        "ttft_p90_prediction_error": err(predicted["ttft_p90_s"], m90),
        "probe_prefill_s": [round(p, 3) for p in probes], "probe_slowdown": round(slowdown, 2),
        "scaled_ttft_p50_s": scaled["ttft_p50_s"], "scaled_ttft_p90_s": scaled["ttft_p90_s"],
        "ttft_p50_prediction_error_probe_scaled": err(scaled["ttft_p50_s"], m50),
        "ttft_p90_prediction_error_probe_scaled": err(scaled["ttft_p90_s"], m90),
        "predicted_prefix_hit_rate": predicted["prefix_hit_rate"],
        "measured": [{"prompt_tokens": q.prompt_tokens, "arrival_s": round(q.arrival_s, 2)} | r
                     for q, r in zip(requests, per_request)],
        "predicted_ttft_s": predicted["ttft_each_s"], "scaled_ttft_s": scaled["ttft_each_s"],
        "load_average_after": round(os.getloadavg()[0], 2),
    }

def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import sys

    from sim.costs import load_costs
    parser = argparse.ArgumentParser(description="replay a scaled trace slice on the real mesh vs the simulator")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.4)
    parser.add_argument("--costs", default="cpu-local")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    out = validate(load_costs(args.costs), Slice(n=args.n, rate=args.rate),
                   lambda m: print(f"[sim.validate] {m}", file=sys.stderr, flush=True))
    for q, p, sc in zip(out["measured"], out["predicted_ttft_s"], out["scaled_ttft_s"]):
        print(f"{q['prompt_tokens']:>5} tokens at {q['arrival_s']:>6.1f} s: measured {q['ttft_s']:6.2f} s "
              f"(router {q['router_ttft_ms'] / 1000:5.2f}, prefill {q['prefill_ms'] / 1000:5.2f}, pull "
              f"{q['kv_transfer_ms']:5.0f} ms, {q['decision']}, cached {q['cached_tokens']}) predicted {p:6.2f} s, "
              f"probe-scaled {sc:6.2f} s")
    print({k: v for k, v in out.items() if k not in ("measured", "predicted_ttft_s", "scaled_ttft_s")})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
