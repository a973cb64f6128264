"""One simulation from flags: a workload, a cluster, a placement profile, a cost profile.

    python -m sim --costs h100-llama3-8b --profile prefix_aware --prefill 32 --decode 32 \
        [--trace mooncake | --synthetic shared_prefix | --synthetic no_reuse] [--limit N] \
        [--rate-scale R] [--time-scale T] [--slo-ttft S] [--slo-tpot S] [--seed N] [--json PATH]
"""

import argparse
import json
import logging
import sys
import time

from sim.cluster import Cluster
from sim.costs import load_costs
from sim.metrics import Slo, summarize
from sim.trace import (
    MOONCAKE_TRACE,
    no_reuse,
    read_mooncake,
    reuse_unbounded,
    scale_time,
    shared_prefix,
)

DEFAULT_SLO = Slo(ttft_s=2.0, tpot_s=0.025)  # the thresholds of Dynamo's Mooncake A/B


def workload(args) -> list:
    if args.synthetic == "shared_prefix":
        reqs = shared_prefix(groups=32, per_group=64, shared_tokens=8192, unique_tokens=1024, output_tokens=256,
                             rate_per_s=args.rate, seed=args.seed)
    elif args.synthetic == "no_reuse":
        reqs = no_reuse(2048, args.rate, 9216, 256, seed=args.seed)
    else:
        reqs = read_mooncake(args.trace_path or MOONCAKE_TRACE, limit=args.limit)
    return scale_time(reqs[:args.limit], args.rate_scale, args.time_scale)


def simulate(requests, costs, num_prefill: int, num_decode: int, profile: str, seed: int = 0,
             slo: Slo = DEFAULT_SLO, progress: bool = False, block_size: int | None = None) -> dict:
    """Runs one configuration; returns the summary (metrics.summarize) plus wall time."""
    logging.getLogger("services.router.placement.runner").setLevel(logging.ERROR)  # fallbacks counted instead
    cluster = Cluster(costs, num_prefill, num_decode, profile, block_size or requests[0].block_size, seed)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc=f"{profile} {num_prefill}P+{num_decode}D", unit="req",
                   file=sys.stderr, mininterval=0.5, leave=False)
    start = time.perf_counter()
    jobs = cluster.run(requests, progress=bar.update if bar else None)
    wall = time.perf_counter() - start
    if bar:
        bar.close()
    out = summarize(jobs, cluster, slo) | {"wall_s": round(wall, 2), "profile": profile,
                                           "prefill": num_prefill, "decode": num_decode}
    if len(jobs) <= 1000:  # small runs (validation) keep every request's TTFT
        out["ttft_each_s"] = [round(j.first_token_s - j.req.arrival_s, 3) if j.first_token_s is not None else None
                              for j in jobs]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="simulate a pdmesh cluster with the router's placement plugins")
    p.add_argument("--costs", default="h100-llama3-8b", help="cost profile name (sim/profiles) or YAML path")
    p.add_argument("--profile", default="prefix_aware", help="placement profile name or YAML path")
    p.add_argument("--prefill", type=int, default=32)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--trace-path", help="a Mooncake-format JSONL (default: the conversation trace)")
    p.add_argument("--synthetic", choices=("shared_prefix", "no_reuse"))
    p.add_argument("--rate", type=float, default=20.0, help="synthetic: requests per second")
    p.add_argument("--limit", type=int, help="first N requests only")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the request rate")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every arrival time")
    p.add_argument("--slo-ttft", type=float, default=DEFAULT_SLO.ttft_s)
    p.add_argument("--slo-tpot", type=float, default=DEFAULT_SLO.tpot_s)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    reqs = workload(args)
    result = simulate(reqs, load_costs(args.costs), args.prefill, args.decode, args.profile, args.seed,
                      Slo(args.slo_ttft, args.slo_tpot), progress=True)
    result["reuse_unbounded"] = round(reuse_unbounded(reqs), 4)
    for key, value in result.items():
        if key not in ("util_prefill", "util_decode"):
            print(f"{key:>16}: {value}")
    for pool in ("util_prefill", "util_decode"):
        u = result.get(pool, {})
        if u:
            print(f"{pool:>16}: mean {u['mean']:.1%} (min {u['min']:.1%}, max {u['max']:.1%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
