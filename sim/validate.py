"""Replays scaled-down slices of the Mooncake trace against the real mesh on this machine and
predicts the same run in the simulator with the calibrated CPU profile.

Scaling, exactly: the trace's requests from `start` on; every length divided by `factor` (32: a
512-token trace block becomes one 16-token engine block), prompt tokens = ceil(input / factor),
output tokens = ceil(output / factor) clipped to [2, max_output]; requests whose scaled prompt
exceeds max_prompt are skipped. Each trace hash id becomes a fixed run of 16 token ids drawn from
random.Random(hash id), so equal leading ids are equal leading tokens: the trace's shared prefixes
are real shared prefixes for the engine's prefix cache.

Arrivals: the trace's timestamps are 3-second ticks (every request of a tick has the same one),
so its requests arrive in bursts of up to ~15 at one instant. We spread the requests of one tick
evenly over the tick (the order and the per-tick counts are the trace's), then rescale the slice
so it arrives at `rate` requests per second on average (open loop).

Phases: the replay runs one phase per rate in `rates`, each with the next `n` requests of the
trace, one after the other on one mesh (a phase starts `gap_s` after the previous one's last
request finished; the caches carry over). TTFT is measured by the client from each request's
scheduled arrival, and the mesh's CPU use (utime + stime of every mesh process and the client)
over each phase gives the host's utilisation; the machine's busy time (/proc/stat) minus the four
workers' CPU gives the cores' worth of CPU everything else took meanwhile (other tenants of this
shared machine, the router, the client): the phase's background. The simulator runs exactly
that schedule (each phase at the offset where it really started) on 2 prefill + 2 decode workers
with the workers' KV size and the cpu-local profile: its costs, its host sharing (2 cores,
measured slowdown, less the phase's background), the engine's chunked prefill and padded
attention, the engine-thread handoffs of the services, the transfer and RPC costs.

Re-anchoring: before the replay, PROBES lone 512-token prompts through the live mesh measure how
fast this machine computes now, prefill and decode, against the profile (probe_scales); the
headline prediction scales the profile's compute times by those two factors. The profile alone
(`as_calibrated`) is reported beside it: it is as good as the machine's speed on the day of the
calibration is close to its speed now.
"""

import asyncio
import dataclasses
import math
import os
import random
import statistics
import time
from itertools import groupby
from typing import NamedTuple

from bench.common import CpuMeter, engine_scheduling, step_cost_text
from engine.hashing import block_hashes
from sim.costs import CostModel
from sim.metrics import percentile
from sim.run import simulate
from sim.serving import generate, random_tokens
from sim.trace import Request, read_mooncake

ENGINE_BLOCK = 16
TRACE_TICK_S = 3.0  # the Mooncake conversation trace's timestamp resolution
PROBE_TOKENS = 512
PROBE_OUTPUT = 12  # 11 gaps of one-sequence decode steps per probe
PROBES = 4  # lone probe prompts before the replay; the median of each measure is kept


class Slice(NamedTuple):
    start: int = 0
    n: int = 30  # requests per phase
    rates: tuple[float, ...] = (0.4, 0.8)  # one phase per rate, requests per second
    factor: int = 32
    max_prompt: int = 1024
    max_output: int = 16
    num_blocks: int = 512  # per worker: 8,192 tokens
    gap_s: float = 3.0
    seed: int = 0


def _run_tokens(hash_id: int) -> list[int]:
    return random_tokens(random.Random(hash_id), ENGINE_BLOCK)


def _scaled(s: Slice, count: int) -> tuple[list[Request], dict[str, list[int]]]:
    """The first `count` requests from s.start that fit, scaled; their token ids by request id."""
    picked, tokens = [], {}
    for r in read_mooncake(limit=s.start + count * 4)[s.start:]:
        prompt = math.ceil(r.prompt_tokens / s.factor)
        if prompt > s.max_prompt:
            continue
        ids = [t for h in r.hash_ids for t in _run_tokens(h)][:prompt]
        output = min(s.max_output, max(2, math.ceil(r.output_tokens / s.factor)))
        picked.append(Request(r.request_id, r.arrival_s, prompt, output, tuple(block_hashes(ids, ENGINE_BLOCK)),
                              ENGINE_BLOCK, r.hash_ids))
        tokens[r.request_id] = ids
        if len(picked) == count:
            break
    return picked, tokens


def spread_ticks(requests: list[Request], tick_s: float = TRACE_TICK_S) -> list[Request]:
    """The requests of one timestamp spread evenly over [timestamp, timestamp + tick_s)."""
    out = []
    for t, group in groupby(requests, key=lambda r: r.arrival_s):
        group = list(group)
        out += [r._replace(arrival_s=t + tick_s * i / len(group)) for i, r in enumerate(group)]
    return out


def at_rate(requests: list[Request], rate: float) -> list[Request]:
    """Arrivals from 0 with the same relative spacing, `rate` requests per second on average."""
    t0 = requests[0].arrival_s
    span = max(requests[-1].arrival_s - t0, 1e-9)
    stretch = (len(requests) - 1) / rate / span
    return [r._replace(arrival_s=(r.arrival_s - t0) * stretch) for r in requests]


def scaled_phases(s: Slice) -> tuple[list[list[Request]], dict[str, list[int]]]:
    requests, tokens = _scaled(s, s.n * len(s.rates))
    if len(requests) < s.n * len(s.rates):
        raise ValueError(f"the trace has only {len(requests)} requests that fit the slice")
    requests = spread_ticks(requests)
    return [at_rate(requests[i * s.n:(i + 1) * s.n], rate) for i, rate in enumerate(s.rates)], tokens


# -- the real mesh ------------------------------------------------------------------------------


async def _replay(address: str, phases: list[list[Request]], tokens: dict, cpu: CpuMeter,
                  gap_s: float) -> tuple[list[dict], list[dict]]:
    """Warm-up, PROBES probe prompts alone (the machine's speed now, see probe_scales), then each phase."""
    import grpc

    from pdmesh.v1 import router_pb2_grpc
    from sim.serving import probe
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        rng = random.Random(-1)  # warm-up and probe prompts share nothing with the slice
        for n in (160, PROBE_TOKENS):  # both workers of each pool, the probe's shapes
            await asyncio.gather(*(_first_token(stub, random_tokens(rng, n), 2, 0.0) for _ in range(2)))
        probes = [await probe(stub, random_tokens(rng, PROBE_TOKENS), PROBE_OUTPUT) for _ in range(PROBES)]
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        out = []
        for phase in phases:
            start = time.perf_counter() + gap_s
            await asyncio.sleep(max(0.0, start - time.perf_counter() - 0.05))
            cpu0, busy0 = cpu.read(), machine_busy_s()
            measured = await asyncio.gather(*(_first_token(stub, tokens[r.request_id], r.output_tokens,
                                                           start + r.arrival_s) for r in phase))
            wall = time.perf_counter() - start
            cpu1, busy1 = cpu.read(), machine_busy_s()
            by_process = {name: round(cpu1[name] - cpu0[name], 2) for name in cpu1}
            out.append({"offset_s": start - t0, "wall_s": wall, "cpu_s": sum(by_process.values()),
                        "cpu_s_by_process": by_process, "machine_busy_s": busy1 - busy0, "requests": list(measured)})
        return out, probes


def machine_busy_s() -> float:
    """CPU seconds every process on this machine has used (all cores; /proc/stat minus idle and
    iowait): with the mesh's own CPU seconds, what other tenants of the machine took meanwhile."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


async def _first_token(stub, ids: list[int], max_tokens: int, at: float) -> dict:
    """Sends one request at `at` (0: now); TTFT from `at`, plus the router's phase timings."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    at = at or time.perf_counter()
    arrivals, last = await generate(stub, ids, max_tokens, timeout_s=900)
    t, p = last.timings, last.placement
    return {"ttft_s": arrivals[0] - at, "router_ttft_ms": round(t.time_to_first_token_ms, 1),
            "prefill_ms": round(t.prefill_ms, 1), "kv_transfer_ms": round(t.kv_transfer_ms, 1),
            "decision": p.decision, "prefill_worker": p.prefill_worker_id, "decode_worker": p.decode_worker_id,
            "cached_tokens": last.usage.cached_prompt_tokens}


def measure_mesh(s: Slice, phases: list[list[Request]], tokens: dict, progress) -> tuple[list[dict], list[dict], dict]:
    from pdmesh.launcher import MeshSpec, start_mesh
    spec = MeshSpec(num_prefill=2, num_decode=2, router_port=0, profile="prefix_aware", num_blocks=s.num_blocks,
                    torch_threads=1, max_model_len=4096)
    progress(f"starting the real mesh: 2 prefill + 2 decode, {s.num_blocks} KV blocks each, 1 torch thread each")
    mesh = start_mesh(spec, progress=lambda m: None)
    try:
        cpu = CpuMeter({p.name: p.popen.pid for p in mesh.processes})  # and this process, as "client"
        progress(f"replaying {len(phases)} phases of {s.n} requests at {', '.join(map(str, s.rates))} req/s "
                 f"(load average {os.getloadavg()[0]:.1f})")
        runs, probes = asyncio.run(_replay(mesh.router_address, phases, tokens, cpu, s.gap_s))
        # how the decode workers scheduled (prompts first by cost, engine/step_cost.py; the
        # simulator applies the same rule to the profile's costs)
        scheduling = {w.name: engine_scheduling(w.info["metrics_address"]) for w in mesh.workers("decode")}
        return runs, probes, scheduling
    finally:
        mesh.stop()


# -- the prediction -----------------------------------------------------------------------------


def rescaled(costs: CostModel, prefill_scale: float, decode_scale: float) -> CostModel:
    """The profile with every prefill time multiplied by prefill_scale and every decode step by
    decode_scale (transfers and RPCs unchanged): the serving-overhead factors multiply them all."""
    return dataclasses.replace(costs, prefill_overhead=costs.prefill_overhead * prefill_scale,
                               decode_overhead=costs.decode_overhead * decode_scale)


def probe_scales(costs: CostModel, probes: list[dict]) -> tuple[float, float]:
    """How fast the machine computes now against the profile, from lone probes on the live mesh,
    measured as the profile's serving overhead was (sim/serving.py): prefill = median(TTFT - KV
    pull - 2 rpc_s) / the profile's prefill of that prompt; decode = median token gap / the
    profile's one-sequence decode step at that context. A shared machine drifts by 10% and more
    between a calibration and a replay (other tenants, CPU frequency, the host's own state), and
    near saturation queueing amplifies a 10% slower step into a 30-50% later tail."""
    served = statistics.median(p["ttft_s"] - p["kv_pull_s"] - 2 * costs.rpc_s for p in probes)
    gap = statistics.median(p["token_gap_s"] for p in probes)
    tokens = probes[0]["prompt_tokens"]
    return (round(served / costs.prefill_s(tokens), 3),
            round(gap / costs.decode_step_s(1, tokens + PROBE_OUTPUT // 2), 3))


def predict(costs: CostModel, phases: list[list[Request]], offsets: list[float], seed: int,
            background_cores: list[float] | None = None) -> list[list[float]]:
    """Every request's simulated TTFT, phase by phase, with each phase starting at its offset.
    With background_cores (one per phase), phase i is taken from a run of phases 0..i in which
    the host's other processes take background_cores[i] cores (the earlier phases warm the caches)."""
    if background_cores is None:
        ttft = _ttfts(costs, phases, offsets, seed)
        starts = [sum(len(p) for p in phases[:i]) for i in range(len(phases))]
        return [ttft[start:start + len(p)] for start, p in zip(starts, phases)]
    return [_ttfts(dataclasses.replace(costs, host_background_cores=b), phases[:i + 1], offsets, seed)[-len(phases[i]):]
            for i, b in enumerate(background_cores)]


def _ttfts(costs: CostModel, phases: list[list[Request]], offsets: list[float], seed: int) -> list[float]:
    schedule = [r._replace(arrival_s=r.arrival_s + off) for phase, off in zip(phases, offsets) for r in phase]
    return simulate(schedule, costs, 2, 2, "prefix_aware", seed=seed, block_size=ENGINE_BLOCK)["ttft_each_s"]


def background_cores(run: dict) -> float:
    """Cores' worth of CPU that processes other than the four workers used during a phase: the
    machine's other tenants (/proc/stat) plus the router and the client."""
    workers = sum(v for name, v in run["cpu_s_by_process"].items() if name.startswith(("prefill", "decode")))
    return round(max(0.0, run["machine_busy_s"] - workers) / run["wall_s"], 3)


def _error(predicted: float, measured: float) -> float:
    return round(abs(predicted - measured) / measured, 3)


def _phase_report(rate: float, phase: list[Request], run: dict, predictions: dict, costs: CostModel) -> dict:
    measured = [r["ttft_s"] for r in run["requests"]]
    m50, m90 = percentile(measured, 0.5), percentile(measured, 0.9)
    pulled = [(q, r) for q, r in zip(phase, run["requests"]) if r["decision"] == "remote_prefill"]
    out = {"rate": rate, "requests": len(phase), "offset_s": round(run["offset_s"], 3),
           "measured_ttft_p50_s": round(m50, 3),
           "measured_ttft_p90_s": round(m90, 3), "wall_s": round(run["wall_s"], 1),
           "host_cpu_utilisation": round(run["cpu_s"] / run["wall_s"] / os.cpu_count(), 3),
           "cpu_s_by_process": run["cpu_s_by_process"], "background_cores": background_cores(run),
           "other_tenants_cpu_utilisation": round(max(0.0, run["machine_busy_s"] - run["cpu_s"]) / run["wall_s"]
                                                  / os.cpu_count(), 3),
           "kv_pull_ms_mean": {"measured": round(sum(r["kv_transfer_ms"] for _, r in pulled) / max(len(pulled), 1), 1),
                               "model": round(sum(costs.transfer_s(q.prompt_tokens) for q, _ in pulled) * 1000
                                              / max(len(pulled), 1), 1)}}
    for name, ttft in predictions.items():
        p50, p90 = percentile(ttft, 0.5), percentile(ttft, 0.9)
        out[name] = {"ttft_p50_s": round(p50, 3), "ttft_p90_s": round(p90, 3),
                     "ttft_p50_error": _error(p50, m50), "ttft_p90_error": _error(p90, m90), "ttft_each_s": ttft}
    out["measured"] = [{"prompt_tokens": q.prompt_tokens, "arrival_s": round(q.arrival_s, 2)} | r
                       for q, r in zip(phase, run["requests"])]
    return out


def validate(costs: CostModel, s: Slice, progress) -> dict:
    """Measures the phases on the real mesh and predicts them. `predicted`: the profile re-anchored
    to the machine's speed at replay time (probe_scales: PROBES lone prompts timed on the live mesh
    just before the replay) on a host whose other processes take the cores' worth of CPU they were
    measured to take during each phase (background_cores). Both are inputs measured alongside, like
    the arrival times; nothing is fitted to the TTFTs. Beside it: `as_calibrated`, the same without
    the re-anchoring (the profile's own speed); `no_background`, re-anchored on a host to itself;
    `no_host_sharing`, re-anchored with a core per worker."""
    phases, tokens = scaled_phases(s)
    costs = dataclasses.replace(costs, kv_capacity_tokens=s.num_blocks * ENGINE_BLOCK)
    runs, probes, scheduling = measure_mesh(s, phases, tokens, progress)
    offsets = [run["offset_s"] for run in runs]
    background = [background_cores(run) for run in runs]
    prefill_scale, decode_scale = probe_scales(costs, probes)
    now = rescaled(costs, prefill_scale, decode_scale)
    progress(f"probes: prefill {prefill_scale}x, decode {decode_scale}x the profile; predicting")
    variants = {"predicted": (now, background), "as_calibrated": (costs, background), "no_background": (now, None),
                "no_host_sharing": (dataclasses.replace(now, host_cores=0.0), None)}
    by_variant = {name: predict(c, phases, offsets, s.seed, b) for name, (c, b) in variants.items()}
    reports = [_phase_report(rate, phase, run, {name: p[i] for name, p in by_variant.items()}, costs)
               for i, (rate, phase, run) in enumerate(zip(s.rates, phases, runs))]
    worst = lambda variant, key: max(r[variant][key] for r in reports)
    return {
        "slice": s._asdict(), "phases": reports,
        "prompt_tokens_mean": round(sum(r.prompt_tokens for p in phases for r in p) / (s.n * len(phases)), 1),
        "output_tokens_mean": round(sum(r.output_tokens for p in phases for r in p) / (s.n * len(phases)), 1),
        "ttft_p50_prediction_error": worst("predicted", "ttft_p50_error"),
        "ttft_p90_prediction_error": worst("predicted", "ttft_p90_error"),
        "as_calibrated_ttft_p50_prediction_error": worst("as_calibrated", "ttft_p50_error"),
        "as_calibrated_ttft_p90_prediction_error": worst("as_calibrated", "ttft_p90_error"),
        "probe_prefill_scale": prefill_scale, "probe_decode_scale": decode_scale, "probes": probes,
        "decode_scheduling": scheduling,
        "costs": {"host_cores": costs.host_cores, "host_slowdown": list(costs.host_slowdown),
                  "prefill_overhead": costs.prefill_overhead, "decode_overhead": costs.decode_overhead},
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def print_report(out: dict) -> None:
    print(f"{'rate':>6} {'host CPU':>9} {'background':>11} {'measured p50/p90':>17} {'predicted':>13} "
          f"{'error':>11} {'as calibrated':>14} {'no background':>14} {'no host sharing':>16}")
    for r in out["phases"]:
        p, a, e, n = r["predicted"], r["as_calibrated"], r["no_background"], r["no_host_sharing"]
        print(f"{r['rate']:>6} {r['host_cpu_utilisation']:>9.0%} {r['background_cores']:>6.2f} core "
              f"{r['measured_ttft_p50_s']:>8.2f}/{r['measured_ttft_p90_s']:<8.2f} {p['ttft_p50_s']:>6.2f}/"
              f"{p['ttft_p90_s']:<6.2f} {p['ttft_p50_error']:>5.0%}/{p['ttft_p90_error']:<5.0%} "
              f"{a['ttft_p50_s']:>6.2f}/{a['ttft_p90_s']:<7.2f} {e['ttft_p50_s']:>6.2f}/{e['ttft_p90_s']:<7.2f} "
              f"{n['ttft_p50_s']:>7.2f}/{n['ttft_p90_s']:<8.2f}")
    for r in out["phases"]:
        print(f"KV pull at {r['rate']} req/s, mean: measured {r['kv_pull_ms_mean']['measured']} ms, "
              f"model {r['kv_pull_ms_mean']['model']} ms; CPU s by process {r['cpu_s_by_process']}, other "
              f"tenants of the machine {r['other_tenants_cpu_utilisation']:.0%} of its cores")
    c = out["costs"]
    print(f"serving overhead in the profile: prefill x{c['prefill_overhead']}, decode x{c['decode_overhead']}; "
          f"the probes before the replay: prefill {out['probe_prefill_scale']}x, decode "
          f"{out['probe_decode_scale']}x the profile")
    for name, s in out.get("decode_scheduling", {}).items():
        print(f"{name}: {s['prompt_only_steps']:.0f} of {s['steps']:.0f} steps prompts first (by cost); "
              + step_cost_text(s))
    print(f"worst phase: TTFT p50 error {out['ttft_p50_prediction_error']:.0%}, p90 error "
          f"{out['ttft_p90_prediction_error']:.0%} (as calibrated: {out['as_calibrated_ttft_p50_prediction_error']:.0%}"
          f" / {out['as_calibrated_ttft_p90_prediction_error']:.0%})")


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import sys

    from sim.costs import load_costs
    parser = argparse.ArgumentParser(description="replay scaled trace slices on the real mesh vs the simulator")
    parser.add_argument("--n", type=int, default=30, help="requests per phase")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.4, 0.8], help="one phase per rate (req/s)")
    parser.add_argument("--costs", default="cpu-local")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    out = validate(load_costs(args.costs), Slice(n=args.n, rates=tuple(args.rates)),
                   lambda m: print(f"[sim.validate] {m}", file=sys.stderr, flush=True))
    for r in out["phases"]:
        for q, p in zip(r["measured"], r["predicted"]["ttft_each_s"]):
            print(f"{r['rate']:>4} req/s {q['prompt_tokens']:>5} tokens at {q['arrival_s']:>6.1f} s: measured "
                  f"{q['ttft_s']:6.2f} s (prefill {q['prefill_ms'] / 1000:5.2f}, pull {q['kv_transfer_ms']:4.0f} ms, "
                  f"{q['decision']}, cached {q['cached_tokens']}) predicted {p:6.2f} s")
    print_report(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
