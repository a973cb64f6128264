"""The serving overhead: how much slower our engine computes inside a live mesh than bare.

    python -m sim.calibrate --serving-only --out sim/profiles/cpu-local.yaml   # ~2 min

Starts a real 1 prefill + 1 decode mesh (router, gRPC, the KV handoff, load reports, KV events),
workers as the validation runs them (1 torch thread), and sends probe prompts of PROBE_TOKENS
one at a time (fresh random tokens: nothing cached, every one prefilled remotely and pulled). For
each it records the client's TTFT, the router's KV pull time and the gaps between later tokens.
Then it stops the mesh and times the same prompt lengths on the bare engine (LLMEngine in this
process, same thread count): the prefill, and a decode step of one sequence of that context.

    prefill_overhead = sum(TTFT - KV pull - 2 rpc_s) / sum(bare prefill)
    decode_overhead  = median token gap in the mesh / median bare decode step

TTFT minus the pull and the two router hops is what the simulator puts on compute for a lone
remote prefill (sim/cluster.py), so the factor closes exactly the gap the simulator leaves. The
per-length ratios and an affine fit (fixed + factor x bare) are kept with the points so a reader
can see whether a fixed part would fit better.

The mesh's shape is a parameter (`shape`, 1 prefill + 1 decode by default). A 2 + 2 mesh was
tested too, to see whether its idle workers (load reports, gRPC threads) slow the computing ones
on two cores: no; a lone probe costs the bare engine's time there as well (cpu-local.yaml,
measured.serving_2p2d_run). The pulls give the transfer model: least squares
of pull time on prompt tokens, latency + bytes / bandwidth.
"""

import asyncio
import itertools
import os
import random
import statistics
import time

import numpy as np

PROBE_TOKENS = (256, 512, 1024)
PROBE_OUTPUT = 12  # tokens per probe: 11 gaps of one-sequence decode steps
REPEATS = 2  # per length, the faster one kept (as the bare engine's timings are)


def random_tokens(rng: random.Random, n: int) -> list[int]:
    """n random token ids in [1000, 200_000): the range every probe, warm-up and replayed prompt here uses."""
    return [rng.randrange(1000, 200_000) for _ in range(n)]


async def generate(stub, ids: list[int], max_tokens: int, timeout_s: float = 600) -> tuple[list[float], object]:
    """One greedy request through the router, every token forced out (ignore_eos): the
    perf_counter time each token arrived, and the stream's last message (timings, placement)."""
    from pdmesh.v1 import common_pb2, router_pb2
    request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=ids), max_tokens=max_tokens,
                                         sampling=common_pb2.SamplingParams(temperature=0.0), ignore_eos=True)
    arrivals, last = [], None
    async for message in stub.Generate(request, timeout=timeout_s):
        arrivals += [time.perf_counter()] * len(message.token_ids)
        last = message
    return arrivals, last


async def probe(stub, ids: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    arrivals, last = await generate(stub, ids, max_tokens)
    gaps = [b - a for a, b in itertools.pairwise(arrivals) if b > a]  # tokens sent together: one gap
    return {"prompt_tokens": len(ids), "ttft_s": round(arrivals[0] - start, 4),
            "kv_pull_s": round(last.timings.kv_transfer_ms / 1000, 5), "decision": last.placement.decision,
            "token_gap_s": round(statistics.median(gaps), 5)}


async def _probe_all(address: str, seed: int) -> list[dict]:
    import grpc

    from pdmesh.v1 import router_pb2_grpc
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for _ in range(2):  # warm-up: both workers, the pull path, the router's tokenizer
            await probe(stub, random_tokens(rng, 160), 4)
        await asyncio.sleep(1.0)
        out = []
        for n in PROBE_TOKENS:
            runs = [await probe(stub, random_tokens(rng, n), PROBE_OUTPUT) for _ in range(REPEATS)]
            out.append(min(runs, key=lambda r: r["ttft_s"]))
        return out


def measure_mesh(threads: int, shape: tuple[int, int], progress) -> list[dict]:
    from pdmesh.launcher import MeshSpec, start_mesh
    spec = MeshSpec(num_prefill=shape[0], num_decode=shape[1], router_port=0, profile="prefix_aware", num_blocks=512,
                    torch_threads=threads, max_model_len=4096)
    progress(f"serving overhead: starting a {shape[0]} prefill + {shape[1]} decode mesh ({threads} torch thread(s) "
             f"per worker)")
    mesh = start_mesh(spec, progress=lambda m: None)
    try:
        probes = asyncio.run(_probe_all(mesh.router_address, seed=-2))
    finally:
        mesh.stop()
    for p in probes:
        progress(f"  mesh, {p['prompt_tokens']} tokens: TTFT {p['ttft_s'] * 1000:.0f} ms (pull "
                 f"{p['kv_pull_s'] * 1000:.1f} ms, {p['decision']}), token gap {p['token_gap_s'] * 1000:.1f} ms")
    return probes


def measure_bare(threads: int, progress) -> list[dict]:
    import torch

    from sim.calibrate import Bench
    torch.set_num_threads(threads)
    bench = Bench(num_blocks=512)
    bench.warm_up()
    out = []
    for n in PROBE_TOKENS:
        prefill = min(bench.prefill_s(n, 0) for _ in range(REPEATS))
        step = min(bench.decode_step_s(1, n, steps=PROBE_OUTPUT - 1) for _ in range(REPEATS))
        out.append({"prompt_tokens": n, "prefill_s": round(prefill, 4), "decode_step_s": round(step, 5)})
        progress(f"  bare engine, {n} tokens: prefill {prefill * 1000:.0f} ms, decode step {step * 1000:.1f} ms")
    return out


def overheads(mesh: list[dict], bare: list[dict], rpc_s: float) -> dict:
    """The factors, the per-length ratios and the affine fit, from matching mesh and bare points."""
    served = [m["ttft_s"] - m["kv_pull_s"] - 2 * rpc_s for m in mesh]
    engine = [b["prefill_s"] for b in bare]
    fixed, factor = np.polyfit(engine, served, 1)[::-1] if len(engine) > 1 else (0.0, served[0] / engine[0])
    return {
        "prefill_overhead": round(sum(served) / sum(engine), 3),
        "decode_overhead": round(statistics.median(m["token_gap_s"] for m in mesh)
                                 / statistics.median(b["decode_step_s"] for b in bare), 3),
        "prefill_ratio_by_length": {m["prompt_tokens"]: round(s / e, 3) for m, s, e in zip(mesh, served, engine)},
        "decode_ratio_by_length": {m["prompt_tokens"]: round(m["token_gap_s"] / b["decode_step_s"], 3)
                                   for m, b in zip(mesh, bare)},
        "prefill_affine_fit": {"fixed_s": round(float(fixed), 4), "factor": round(float(factor), 3)},
    }


def transfer_fit(mesh: list[dict], kv_bytes_per_token: int) -> dict | None:
    """transfer_latency_s and transfer_bytes_per_s from the remote pulls (None without two lengths)."""
    pulls = [m for m in mesh if m["decision"] == "remote_prefill" and m["kv_pull_s"] > 0]
    if len({m["prompt_tokens"] for m in pulls}) < 2:
        return None
    per_token, latency = np.polyfit([m["prompt_tokens"] for m in pulls], [m["kv_pull_s"] for m in pulls], 1)
    if per_token <= 0:
        return None
    return {"transfer_latency_s": round(max(0.0, float(latency)), 5),
            "transfer_bytes_per_s": round(kv_bytes_per_token / float(per_token))}


def measure(threads: int, rpc_s: float, kv_bytes_per_token: int, progress, shape: tuple[int, int] = (1, 1)) -> dict:
    """The serving section of a profile: raw points, factors, and the pull fit (or None)."""
    mesh = measure_mesh(threads, shape, progress)
    bare = measure_bare(threads, progress)
    factors = overheads(mesh, bare, rpc_s)
    progress(f"serving overhead: prefill x{factors['prefill_overhead']} (by length "
             f"{factors['prefill_ratio_by_length']}), decode x{factors['decode_overhead']}")
    return {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_at_end": round(os.getloadavg()[0], 2), "mesh_shape": {"prefill": shape[0], "decode": shape[1]},
            "mesh": mesh, "bare": bare,
            **factors, "transfer": transfer_fit(mesh, kv_bytes_per_token)}
