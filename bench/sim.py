"""The cluster simulator at scale: policies, request rate and prefill:decode split on the Mooncake
conversation trace, and a check of its predictions against the real mesh here.

    python -m bench.sim [--quick] [--json PATH] [--plot PATH] [--no-validate]

1. Speed: the whole trace (12,031 requests) on 64 workers (32 prefill + 32 decode), H100-class
   profile, prefix_aware placement: wall seconds (`wall_s_full_trace_64w`).
2. Policies on that cluster at the headline rate: prefix_aware, load_only, round_robin, random —
   TTFT / TPOT / end-to-end percentiles, goodput under the SLO, prefix hit rate, utilisation.
3. Sweeps: request rate (x trace rate) for several P:D splits of 64 workers (prefix_aware, and
   round_robin at 32:32) -> the latency/throughput frontier; and goodput per split at the
   headline rate -> the best split for the SLO. Drawn to a PNG beside the JSON.
4. Validation (default on; --no-validate skips it): scaled slices replayed against a real
   2 prefill + 2 decode mesh at two request rates and predicted with the calibrated cpu-local
   profile, re-anchored to the machine's speed by lone probes on the live mesh just before the
   replay (sim/validate.py says exactly how the slices are scaled and timed): TTFT p50 and p90,
   measured vs predicted (and vs the profile alone), and the host's CPU utilisation, per rate.
   `ttft_p50_prediction_error` is the worse of the two rates.
The simulator's numbers are deterministic (seed 0); only wall times and the validation drift.
"""

import argparse
import json
import os
import sys
import time

from sim.costs import load_costs
from sim.run import DEFAULT_SLO, simulate
from sim.trace import read_mooncake, reuse_unbounded, scale_time

SLO = DEFAULT_SLO  # Dynamo's Qwen3-32B Mooncake A/B uses TTFT 2 s / ITL 25 ms
GPU = "h100-llama3-8b"
WORKERS = 64
HEADLINE_RATE = 12.0  # x the trace's 3.4 req/s: ~41 req/s on 64 H100s (busy, not saturated)
POLICIES = ("prefix_aware", "load_only", "round_robin", "random")
QUICK = {"sweep_limit": 3000, "rates": (4, 8, 12, 16, 24), "splits": (12, 16, 20, 24, 32, 40),
         "frontier_splits": (16, 24, 32), "slice": {"n": 45, "rates": (0.4, 0.8)}}
FULL = {"sweep_limit": None, "rates": (4, 8, 12, 16, 20, 24, 32), "splits": (8, 12, 16, 20, 24, 28, 32, 40, 48),
        "frontier_splits": (12, 16, 24, 32), "slice": {"n": 60, "rates": (0.4, 0.8)}}


def progress(message: str) -> None:
    print(f"[bench.sim {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cfg: dict, validate: bool) -> dict:
    costs = load_costs(GPU)
    trace = read_mooncake()
    report = {"reuse_unbounded": round(reuse_unbounded(trace), 4), "costs": GPU, "workers": WORKERS,
              "headline_rate_scale": HEADLINE_RATE, "slo": SLO._asdict(), "cpu_count": os.cpu_count()}
    progress(f"trace: {len(trace)} requests, unbounded reuse {report['reuse_unbounded']:.2%}")
    headline = scale_time(trace, HEADLINE_RATE)
    half = WORKERS // 2
    rows = []
    for policy in POLICIES:
        rows.append(simulate(headline, costs, half, half, policy, slo=SLO, progress=True))
        progress(f"  {_line(rows[-1])}")
    report["wall_s_full_trace_64w"] = rows[0]["wall_s"]
    report["policies"] = rows
    by = {r["profile"]: r for r in rows}
    pa, rr = by["prefix_aware"], by["round_robin"]
    report |= {"ttft_p50_ratio_prefix_vs_rr": _ratio(pa["ttft_p50_s"], rr["ttft_p50_s"]),
               "ttft_p90_ratio_prefix_vs_rr": _ratio(pa["ttft_p90_s"], rr["ttft_p90_s"]),
               "goodput_ratio_prefix_vs_rr": _ratio(pa["goodput_rps"], rr["goodput_rps"])}

    sweep_trace = trace[:cfg["sweep_limit"]] if cfg["sweep_limit"] else trace
    frontier = []
    for p in cfg["frontier_splits"]:
        for rate in cfg["rates"]:
            frontier.append(simulate(scale_time(sweep_trace, rate), costs, p, WORKERS - p, "prefix_aware", slo=SLO)
                            | {"rate_scale": rate})
    for rate in cfg["rates"]:
        frontier.append(simulate(scale_time(sweep_trace, rate), costs, half, half, "round_robin", slo=SLO)
                        | {"rate_scale": rate})
    progress(f"rate sweep: {len(frontier)} runs of {len(sweep_trace)} requests")
    splits = []
    for p in cfg["splits"]:
        for policy in ("prefix_aware", "round_robin"):
            splits.append(simulate(headline, costs, p, WORKERS - p, policy, slo=SLO, progress=True))
    best = max((r for r in splits if r["profile"] == "prefix_aware"), key=lambda r: r["goodput_rps"])
    progress(f"split sweep at x{HEADLINE_RATE}: best prefix_aware split {best['prefill']}P:{best['decode']}D, "
             f"goodput {best['goodput_rps']} req/s")
    report |= {"rate_sweep": [_slim(r) for r in frontier], "split_sweep": [_slim(r) for r in splits],
               "best_split": f"{best['prefill']}P:{best['decode']}D", "best_split_goodput_rps": best["goodput_rps"]}
    if validate:
        v = report["validation"] = _validate(cfg["slice"])
        for key in ("ttft_p50_prediction_error", "ttft_p90_prediction_error", "as_calibrated_ttft_p50_prediction_error",
                    "as_calibrated_ttft_p90_prediction_error", "probe_prefill_scale", "probe_decode_scale"):
            report[key] = v[key]
        for key in ("ttft_p50_error", "ttft_p90_error"):
            report[f"{key}_by_rate"] = {str(r["rate"]): r["predicted"][key] for r in v["phases"]}
        for key in ("host_cpu_utilisation", "other_tenants_cpu_utilisation", "background_cores"):
            report[f"{key}_by_rate"] = {str(r["rate"]): r[key] for r in v["phases"]}
    return report


def _validate(slice_cfg: dict) -> dict:
    from sim.validate import Slice, validate
    s = Slice(**slice_cfg)
    progress(f"validation: trace requests from {s.start} with prompt <= {s.max_prompt} after dividing lengths by "
             f"{s.factor} (one 512-token trace block = one 16-token engine block of tokens seeded by its hash id), "
             f"outputs clipped to [2, {s.max_output}]; {s.n} requests per phase at {s.rates} req/s, open loop")
    return validate(load_costs("cpu-local"), s, progress)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def _slim(r: dict) -> dict:
    keep = ("profile", "prefill", "decode", "rate_scale", "offered_rate", "goodput_rps", "slo_attainment",
            "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "e2e_p50_s", "prefix_hit_rate", "wall_s")
    return {k: r[k] for k in keep if k in r} | {"util_prefill": r.get("util_prefill", {}).get("mean"),
                                                "util_decode": r.get("util_decode", {}).get("mean")}


def _line(r: dict) -> str:
    return (f"{r['profile']:<13} TTFT p50 {r['ttft_p50_s']:.2f} s p90 {r['ttft_p90_s']:.2f} s, TPOT p50 "
            f"{r['tpot_p50_s'] * 1000:.1f} ms, goodput {r['goodput_rps']:.1f} req/s, hit {r['prefix_hit_rate']:.1%}, "
            f"{r['wall_s']} s wall")


def print_table(report: dict) -> None:
    head = ("policy", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "TPOT p90", "e2e p50", "goodput", "SLO met",
            "hit rate", "util P/D", "wall")
    print(f"{report['workers']} workers ({report['workers'] // 2}P+{report['workers'] // 2}D), {report['costs']}, "
          f"Mooncake conversation trace x{report['headline_rate_scale']} rate, SLO TTFT <= {report['slo']['ttft_s']} s "
          f"and TPOT <= {report['slo']['tpot_s'] * 1000:.0f} ms")
    print(f"{head[0]:<14}" + "".join(f"{h:>11}" for h in head[1:]))
    for r in report["policies"]:
        cells = (f"{r['ttft_p50_s']:.2f} s", f"{r['ttft_p90_s']:.2f} s", f"{r['ttft_p99_s']:.2f} s",
                 f"{r['tpot_p50_s'] * 1000:.1f} ms", f"{r['tpot_p90_s'] * 1000:.1f} ms", f"{r['e2e_p50_s']:.1f} s",
                 f"{r['goodput_rps']:.1f}/s", f"{r['slo_attainment']:.0%}", f"{r['prefix_hit_rate']:.1%}",
                 f"{r['util_prefill']['mean']:.0%}/{r['util_decode']['mean']:.0%}", f"{r['wall_s']:.1f} s")
        print(f"{r['profile']:<14}" + "".join(f"{c:>11}" for c in cells))
    print("split sweep (goodput req/s, prefix_aware / round_robin):")
    by = {}
    for r in report["split_sweep"]:
        by.setdefault((r["prefill"], r["decode"]), {})[r["profile"]] = r
    for (p, d), rows in by.items():
        pa, rr = rows["prefix_aware"], rows["round_robin"]
        print(f"  {p:>2}P:{d:<2}D  {pa['goodput_rps']:7.1f} / {rr['goodput_rps']:7.1f}   TTFT p90 "
              f"{pa['ttft_p90_s']:.2f} / {rr['ttft_p90_s']:.2f} s   TPOT p90 {pa['tpot_p90_s'] * 1000:.0f} / "
              f"{rr['tpot_p90_s'] * 1000:.0f} ms")
    v = report.get("validation")
    if v:
        from sim.validate import print_report as print_validation
        print(f"validation on the real mesh ({v['slice']['n']} requests per phase, mean prompt "
              f"{v['prompt_tokens_mean']} tokens, mean output {v['output_tokens_mean']}; TTFT in s):")
        print_validation(v)
    for key in ("wall_s_full_trace_64w", "reuse_unbounded", "ttft_p50_ratio_prefix_vs_rr", "ttft_p90_ratio_prefix_vs_rr",
                "goodput_ratio_prefix_vs_rr", "best_split", "ttft_p50_prediction_error", "ttft_p90_prediction_error",
                "ttft_p50_error_by_rate", "ttft_p90_error_by_rate", "host_cpu_utilisation_by_rate",
                "other_tenants_cpu_utilisation_by_rate", "background_cores_by_rate", "as_calibrated_ttft_p50_prediction_error",
                "as_calibrated_ttft_p90_prediction_error", "probe_prefill_scale", "probe_decode_scale"):
        if key in report:
            print(f"{key}: {report[key]}")


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    lines = {}
    for r in report["rate_sweep"]:
        lines.setdefault((r["profile"], r["prefill"], r["decode"]), []).append(r)
    for (profile, p, d), rows in lines.items():
        rows.sort(key=lambda r: r["rate_scale"])
        left.plot([r["offered_rate"] for r in rows], [r["ttft_p90_s"] for r in rows], marker="o",
                  linestyle="--" if profile == "round_robin" else "-", label=f"{profile} {p}P:{d}D")
    left.set_yscale("log")
    left.set_xlabel("offered load (req/s; trace rate x 4 ... x 24)")
    left.set_ylabel("TTFT p90 (s)")
    left.set_title("latency/throughput frontier: request rate swept")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    for profile in ("prefix_aware", "round_robin"):
        rows = sorted((r for r in report["split_sweep"] if r["profile"] == profile), key=lambda r: r["prefill"])
        right.plot([r["prefill"] for r in rows], [r["goodput_rps"] for r in rows], marker="o", label=profile)
    right.set_xlabel(f"prefill workers (of {report['workers']}; the rest decode)")
    right.set_ylabel("goodput (req/s)")
    right.set_title(f"P:D split at x{report['headline_rate_scale']} trace rate, SLO TTFT <= "
                    f"{report['slo']['ttft_s']} s, TPOT <= {report['slo']['tpot_s'] * 1000:.0f} ms")
    right.grid(True, alpha=0.3)
    right.legend()
    fig.suptitle(f"Mooncake conversation trace, {report['costs']} (simulated)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the cluster simulator on the Mooncake trace")
    parser.add_argument("--quick", action="store_true", help="smaller sweeps and validation slice")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="draw the sweeps here (default: sim.png next to --json)")
    parser.add_argument("--no-validate", action="store_true", help="skip the replay against the real mesh")
    args = parser.parse_args(argv)
    report = run(QUICK if args.quick else FULL, validate=not args.no_validate)
    print_table(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        progress(f"wrote {args.json}")
    path = args.plot or (args.json and os.path.join(os.path.dirname(os.path.abspath(args.json)), "sim.png"))
    if path:
        plot(report, path)
        progress(f"wrote {path}")


if __name__ == "__main__":
    main()
