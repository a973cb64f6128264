"""Latency percentiles, goodput under an SLO, prefix hit rate and utilisation of a finished run.

TTFT = first token - arrival; TPOT = (last token - first token) / (output tokens - 1), the mean
inter-token latency of one request (requests with one output token have none); end-to-end =
last token - arrival. Goodput = requests meeting both the TTFT and the TPOT bound, per second of
the arrival span (DistServe's definition: the rate of requests served within the SLO). Prefix
hit rate = prompt tokens found cached on the worker that prefilled them / all prompt tokens.
"""

from typing import NamedTuple


class Slo(NamedTuple):
    ttft_s: float
    tpot_s: float


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(jobs, cluster, slo: Slo) -> dict:
    done = [j for j in jobs if j.end_s is not None]
    ttft = [j.first_token_s - j.req.arrival_s for j in done]
    tpot = [(j.end_s - j.first_token_s) / (j.req.output_tokens - 1) for j in done if j.req.output_tokens > 1]
    e2e = [j.end_s - j.req.arrival_s for j in done]
    arrivals = [j.req.arrival_s for j in jobs]
    span = max(arrivals) - min(arrivals) if len(arrivals) > 1 else 1.0
    good = sum(1 for j in done if j.first_token_s - j.req.arrival_s <= slo.ttft_s and
               (j.req.output_tokens <= 1 or (j.end_s - j.first_token_s) / (j.req.output_tokens - 1) <= slo.tpot_s))
    makespan = max((j.end_s for j in done), default=0.0) - min(arrivals, default=0.0)
    prompt_tokens = sum(j.req.prompt_tokens for j in done)
    out = {
        "requests": len(jobs), "completed": len(done), "rejected": sum(1 for j in jobs if j.rejected),
        "offered_rate": round(len(jobs) / span, 3),
        "goodput_rps": round(good / span, 3), "slo_attainment": round(good / len(jobs), 4) if jobs else 0.0,
        "prefix_hit_rate": round(sum(j.cached_tokens for j in done) / prompt_tokens, 4) if prompt_tokens else 0.0,
        "local_prefill": sum(1 for j in done if not j.prefill_id),
        "makespan_s": round(makespan, 2),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = round(percentile(values, q / 100), 4)
        out[f"{name}_mean_s"] = round(sum(values) / len(values), 4) if values else float("nan")
    if makespan > 0:
        out["util_prefill"] = _utilisation(cluster.prefill.values(), makespan)
        out["util_decode"] = _utilisation(cluster.decode.values(), makespan)
    return out


def _utilisation(workers, makespan: float) -> dict:
    """Busy share per worker: mean, min, max over the pool (per-worker values in 'each')."""
    each = [round(w.busy_s / makespan, 4) for w in workers]
    if not each:
        return {}
    return {"mean": round(sum(each) / len(each), 4), "min": min(each), "max": max(each), "each": each}
