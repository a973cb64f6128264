"""Soak: the mesh at twice its capacity for a bounded time. Every request must end served or shed
with a retry hint; no process may grow; no KV block or lease may be left behind.

    python -m bench.soak [--quick] [--minutes M] [--json PATH]

Mesh: tiny model (real processes: 1 prefill + 2 decode workers and the router, round_robin so
every request ships KV over gRPC and takes a lease), router admission limited to 16 running + 32
queued so overload meets admission control rather than an unbounded queue.

1. warm-up, then **capacity** (closed loop): CONCURRENCY clients send requests back to back;
   capacity = requests served per second.
2. **overload** (open loop): Poisson arrivals at 2x capacity for the overload time, each with a
   deadline. Every request is classified: served (finish reason, exactly max_tokens tokens),
   shed (RESOURCE_EXHAUSTED or UNAVAILABLE with a `retry-after-ms` trailer), or unaccounted
   (anything else: another status, a shed without a hint, a short or long stream, a deadline).
3. **idle**: wait until every worker reports 0 KV blocks used and the prefill worker 0 leases
   (up to 45 s: longer than a lease's 30 s TTL would mean a leak).

RSS (VmRSS of /proc/PID/status) of every process is sampled each second; growth = end of the
idle phase vs the start of the capacity phase (after warm-up). Keys: `requests_unaccounted`
(must be 0), `rss_growth_max` (0.1 = 10%), `leaked_blocks`, `leaked_leases`, `capacity_rps`,
`offered_rps`, `served`, `shed`. Writes a PNG (latency and RSS over time) beside the JSON.
"""

import argparse
import asyncio
import pathlib
import random
import time

import grpc

from bench.common import metric_sum, scrape, write_results
from bench.common import percentile as _pct
from bench.common import progress as _progress
from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

CONCURRENCY = 16
MAX_TOKENS = 16
DEADLINE_S = 60.0
SHED_CODES = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}



def rss_kb(pid: int) -> int:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler:
    """RSS of every process of the mesh, once a second, in the background."""

    def __init__(self, mesh):
        self.pids = {p.name: p.popen.pid for p in mesh.processes}
        self.samples: list[tuple[float, dict[str, int]]] = []

    def sample(self) -> dict[str, int]:
        rss = {name: rss_kb(pid) for name, pid in self.pids.items()}
        self.samples.append((time.monotonic(), rss))
        return rss

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(1.0)


class Outcomes:
    def __init__(self):
        self.rows: list[dict] = []  # t (s since overload start), outcome, latency_s, detail

    def add(self, t: float, outcome: str, latency: float, detail: str = "") -> None:
        self.rows.append({"t": t, "outcome": outcome, "latency_s": latency, "detail": detail})

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.rows if r["outcome"] == outcome)


def _prompt(rng: random.Random) -> list[int]:
    return [2] + [rng.randrange(1000, 200_000) for _ in range(rng.randrange(16, 80))]


async def one_request(stub, prompt: list[int]) -> tuple[str, str]:
    """(outcome, detail) of one request: served, shed or unaccounted."""
    request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=prompt), max_tokens=MAX_TOKENS,
                                         ignore_eos=True)
    call = stub.Generate(request, timeout=DEADLINE_S)
    tokens, finish = 0, 0
    try:
        async for message in call:
            tokens += len(message.token_ids)
            finish = message.finish_reason or finish
    except grpc.aio.AioRpcError as exc:
        trailers = dict(exc.trailing_metadata() or ())
        if exc.code() in SHED_CODES and trailers.get("retry-after-ms"):
            return "shed", exc.code().name
        return "unaccounted", f"{exc.code().name}: {exc.details()} (trailers {trailers})"
    if finish == common_pb2.FINISH_REASON_LENGTH and tokens == MAX_TOKENS:
        return "served", ""
    return "unaccounted", f"stream ended with {tokens} tokens, finish {finish}"


async def closed_loop(stub, seconds: float, rng: random.Random) -> tuple[int, list[float]]:
    served, latencies = 0, []
    end = time.monotonic() + seconds

    async def client():
        nonlocal served
        while time.monotonic() < end:
            t0 = time.monotonic()
            outcome, _ = await one_request(stub, _prompt(rng))
            if outcome == "served":
                served += 1
                latencies.append(time.monotonic() - t0)

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return served, latencies


async def open_loop(stub, rate: float, seconds: float, rng: random.Random, outcomes: Outcomes) -> int:
    start = time.monotonic()
    tasks, offered = [], 0

    async def timed(prompt):
        t0 = time.monotonic()
        outcome, detail = await one_request(stub, prompt)
        outcomes.add(t0 - start, outcome, time.monotonic() - t0, detail)

    next_at = start
    while next_at < start + seconds:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        tasks.append(asyncio.create_task(timed(_prompt(rng))))
        offered += 1
        next_at += rng.expovariate(rate)
        if offered % max(1, int(rate * 10)) == 0:
            _progress(f"  overload: {offered} offered, {outcomes.count('served')} served, "
                      f"{outcomes.count('shed')} shed, {outcomes.count('unaccounted')} unaccounted so far")
    await asyncio.gather(*tasks)
    return offered


def worker_leftovers(mesh) -> tuple[float, float]:
    """(KV blocks used, leases held), summed over the workers."""
    blocks = leases = 0.0
    for p in mesh.processes:
        if p.info.get("role") in ("prefill", "decode") and p.info.get("metrics_address"):
            m = scrape(p.info["metrics_address"])
            blocks += metric_sum(m, "pdmesh_kv_blocks_used")
            leases += metric_sum(m, "pdmesh_kv_leases")
    return blocks, leases


async def wait_idle(mesh, timeout_s: float = 45.0) -> tuple[float, float, float]:
    start = time.monotonic()
    while True:
        blocks, leases = await asyncio.to_thread(worker_leftovers, mesh)
        if (blocks == 0 and leases == 0) or time.monotonic() - start > timeout_s:
            return blocks, leases, time.monotonic() - start
        await asyncio.sleep(0.5)


async def soak(mesh, warmup_s: float, capacity_s: float, overload_s: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    sampler = Sampler(mesh)
    async with grpc.aio.insecure_channel(mesh.router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        _progress(f"warm-up {warmup_s:.0f}s")
        await closed_loop(stub, warmup_s, rng)
        sampling = asyncio.create_task(sampler.run())
        await asyncio.sleep(0)
        rss_start = sampler.sample()
        _progress(f"capacity: {CONCURRENCY} closed-loop clients for {capacity_s:.0f}s")
        served, latencies = await closed_loop(stub, capacity_s, rng)
        capacity = served / capacity_s
        _progress(f"capacity {capacity:.1f} req/s (p50 {_pct(latencies, 50):.2f}s); offering {2 * capacity:.1f} "
                  f"req/s for {overload_s:.0f}s")
        outcomes = Outcomes()
        overload_t0 = time.monotonic()
        offered = await open_loop(stub, 2 * capacity, overload_s, rng, outcomes)
        _progress(f"overload done: {offered} offered; waiting for the workers to go idle")
        blocks, leases, idle_s = await wait_idle(mesh)
        rss_end = sampler.sample()
        sampling.cancel()
    growth = {name: (rss_end[name] - rss_start[name]) / rss_start[name] for name in rss_start if rss_start[name]}
    unaccounted = [r for r in outcomes.rows if r["outcome"] == "unaccounted"]
    served_latencies = [r["latency_s"] for r in outcomes.rows if r["outcome"] == "served"]
    return {
        "capacity_rps": round(capacity, 2), "offered_rps": round(offered / overload_s, 2), "offered": offered,
        "served": outcomes.count("served"), "shed": outcomes.count("shed"), "requests_unaccounted": len(unaccounted),
        "unaccounted_examples": [r["detail"] for r in unaccounted[:5]],
        "overload_latency_p50_s": round(_pct(served_latencies, 50), 3),
        "overload_latency_p99_s": round(_pct(served_latencies, 99), 3),
        "rss_start_kb": rss_start, "rss_end_kb": rss_end, "rss_growth": {k: round(v, 4) for k, v in growth.items()},
        "rss_growth_max": round(max(growth.values()), 4), "leaked_blocks": int(blocks), "leaked_leases": int(leases),
        "idle_after_s": round(idle_s, 2),
        "_series": {"rss": [(t - overload_t0, r) for t, r in sampler.samples], "requests": outcomes.rows},
    }



def print_table(result: dict) -> None:
    rows = [("capacity (closed loop)", f"{result['capacity_rps']} req/s"),
            ("offered (open loop, 2x)", f"{result['offered_rps']} req/s, {result['offered']} requests"),
            ("served / shed with retry hint", f"{result['served']} / {result['shed']}"),
            ("requests_unaccounted", result["requests_unaccounted"]),
            ("served latency p50 / p99 under overload", f"{result['overload_latency_p50_s']} / "
                                                         f"{result['overload_latency_p99_s']} s"),
            ("rss_growth_max", f"{result['rss_growth_max']:.1%}"),
            ("leaked_blocks / leaked_leases", f"{result['leaked_blocks']} / {result['leaked_leases']}"),
            ("idle after", f"{result['idle_after_s']} s")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    print("  RSS start -> end (MB): " + ", ".join(
        f"{name} {result['rss_start_kb'][name] / 1024:.0f}->{result['rss_end_kb'][name] / 1024:.0f}"
        for name in result["rss_start_kb"]))


def plot(path: pathlib.Path, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["_series"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for outcome, color in (("served", "tab:blue"), ("shed", "tab:orange"), ("unaccounted", "tab:red")):
        rows = [r for r in series["requests"] if r["outcome"] == outcome]
        top.scatter([r["t"] for r in rows], [r["latency_s"] for r in rows], s=6, color=color,
                    label=f"{outcome} ({len(rows)})")
    top.set_ylabel("latency (s)")
    top.set_title(f"soak: {result['offered_rps']} req/s offered vs capacity {result['capacity_rps']} req/s")
    top.legend()
    names = sorted(series["rss"][0][1]) if series["rss"] else []
    for name in names:
        bottom.plot([t for t, _ in series["rss"]], [r[name] / 1024 for _, r in series["rss"]], label=name)
    bottom.set_xlabel("seconds since the overload started (negative: capacity phase)")
    bottom.set_ylabel("RSS (MB)")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about 2 minutes: 20 s capacity, 45 s overload")
    p.add_argument("--minutes", type=float, default=None, help="overload time in minutes (default 5; quick 0.75)")
    p.add_argument("--json", default=None, help="write results here (and soak.png beside it)")
    args = p.parse_args(argv)
    overload_s = 60 * (args.minutes if args.minutes is not None else (0.75 if args.quick else 5))
    capacity_s = 20.0 if args.quick else 60.0
    spec = MeshSpec(num_prefill=1, num_decode=2, router_port=0, http_port=None, model="tiny", profile="round_robin",
                    kv_transports="grpc", num_blocks=256, torch_threads=1, max_model_len=512,
                    extra_env=(("PDMESH_MAX_INFLIGHT", "16"), ("PDMESH_MAX_QUEUED", "32")))
    _progress("starting a tiny-model mesh (1 prefill + 2 decode + router)")
    mesh = start_mesh(spec, progress=lambda *_: None)
    try:
        result = asyncio.run(soak(mesh, 5.0, capacity_s, overload_s))
    finally:
        mesh.stop()
    print_table(result)
    if args.json:
        headline = {k: v for k, v in result.items() if k != "_series"}
        write_results(args.json, headline, "soak.png", lambda png: plot(png, result))


if __name__ == "__main__":
    main()
