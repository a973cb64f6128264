"""Placement by KV-cache locality vs round-robin and random, on the real model and real processes.

    python -m bench.placement [--quick] [--json PATH] [--plot PATH]

--json out/placement.json also draws out/placement.png (TTFT distribution per profile) unless
--plot names another path.

Workload, shaped like inference-perf's shared_prefix: G groups x P prompts; each prompt is its
group's long shared system prompt plus a short unique suffix; short outputs (ignore_eos, so every
request decodes the same number of tokens). Token ids are drawn (seeded) from the ids of real text,
so the model sees ordinary tokens. Prompts go out open loop: arrival times fixed in advance at a
constant rate, group order shuffled with a fixed seed, at most MAX_IN_FLIGHT outstanding. TTFT and
end-to-end latency are measured by the client from each request's scheduled arrival time, so any
wait for a concurrency slot counts against the profile that caused it.

Each profile gets a fresh mesh (2 prefill + 2 decode workers, caches cold) and the same workload.
Each worker's KV cache is sized so one worker cannot hold every group's prefix (about 60% of them)
while the pool of two decode workers can hold them all when they are placed well.

Hit rate = sum(usage.cached_prompt_tokens) / sum(prompt tokens). The router fills
cached_prompt_tokens from the prefill worker's prefix-cache hit on remote prefill, and from the
decode worker's hit on local prefill; a remote prefill's KV that the decode worker pulls is not a
hit. Oracle = what a perfect placement reuses: every prompt after the first of its group finds the
group's shared full blocks.

Negative control: the same sizes with no shared prefix (every prompt unique), prefix_aware vs
round_robin; there is nothing to reuse, so TTFT should match (a large gain there would mean the
benchmark measures something other than locality).
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import NamedTuple

import grpc

from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

BLOCK_SIZE = 16
KV_BYTES_PER_TOKEN = 36_864
TORCH_THREADS = 1  # 4 workers + router share 2 cores: one thread each, no oversubscription
MAX_IN_FLIGHT = 8
PROFILES = ("prefix_aware", "round_robin", "random")
CONTROL_PROFILES = ("prefix_aware", "round_robin")
CACHE_SHARE_PER_WORKER = 0.6  # one worker's KV cache holds ~60% of all groups' shared prefixes


class Shape(NamedTuple):
    groups: int
    per_group: int
    shared_tokens: int
    unique_tokens: int
    output_tokens: int
    rate_per_s: float
    seed: int = 0

    @property
    def num_prompts(self) -> int:
        return self.groups * self.per_group

    @property
    def prompt_tokens(self) -> int:
        return self.shared_tokens + self.unique_tokens

    @property
    def shared_blocks(self) -> int:
        return self.shared_tokens // BLOCK_SIZE

    @property
    def num_blocks(self) -> int:
        """Per worker: fewer than every group's prefix, enough for all across two decode workers."""
        return int(CACHE_SHARE_PER_WORKER * self.groups * self.shared_blocks)


QUICK = Shape(groups=6, per_group=4, shared_tokens=512, unique_tokens=32, output_tokens=8, rate_per_s=0.5)
FULL = Shape(groups=8, per_group=6, shared_tokens=1024, unique_tokens=64, output_tokens=16, rate_per_s=0.3)


class Prompt(NamedTuple):
    group: int  # -1: unique (negative control)
    token_ids: list[int]
    arrival_s: float


class Result(NamedTuple):
    group: int
    prompt_tokens: int
    cached_tokens: int
    ttft_ms: float  # from the scheduled arrival
    e2e_ms: float
    router_ttft_ms: float  # the router's own view, from when it received the request
    decision: str
    decode_worker: str
    prefill_worker: str
    expected_cached_tokens: int  # what the router believed the chosen worker held (placement info)


# ---- workload -----------------------------------------------------------------------------------

def _token_pool() -> list[int]:
    """Distinct ids of real text (this repository's docs and code), so prompts are ordinary tokens."""
    from engine.tokenizer import load_tokenizer
    tokenizer = load_tokenizer()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = "".join(open(os.path.join(root, name), encoding="utf-8").read()
                   for name in ("README.md", "engine/llm_engine.py", "engine/block_manager.py"))
    return sorted(set(tokenizer.encode(text, add_bos=False)))


def build_workload(shape: Shape, pool: list[int], shared: bool) -> list[Prompt]:
    """G x P prompts in a seeded shuffled order with fixed arrival times. shared=False draws every
    prompt's 'shared' part afresh (the negative control: same sizes, nothing to reuse)."""
    rng = random.Random(shape.seed)
    draw = lambda n: [rng.choice(pool) for _ in range(n)]  # noqa: E731
    prefixes = [draw(shape.shared_tokens) for _ in range(shape.groups)]
    prompts = []
    for group in range(shape.groups):
        for _ in range(shape.per_group):
            prefix = prefixes[group] if shared else draw(shape.shared_tokens)
            prompts.append((group if shared else -1, [2, *prefix, *draw(shape.unique_tokens - 1)]))  # 2 = <bos>
    rng.shuffle(prompts)
    return [Prompt(g, ids, i / shape.rate_per_s) for i, (g, ids) in enumerate(prompts)]


def oracle_cached_tokens(prompts: list[Prompt]) -> int:
    """A perfect placement: every prompt after its group's first reuses the shared full blocks
    (the <bos> plus the shared system prompt, cut to whole blocks)."""
    seen, cached = set(), 0
    for p in prompts:
        if p.group >= 0 and p.group in seen:
            shared_len = 1 + len(_shared_part(p, prompts))
            cached += shared_len // BLOCK_SIZE * BLOCK_SIZE
        seen.add(p.group)
    return cached


def _shared_part(p: Prompt, prompts: list[Prompt]) -> list[int]:
    others = [q.token_ids for q in prompts if q.group == p.group and q is not p]
    n = min(len(os.path.commonprefix([p.token_ids, o])) for o in others) if others else 0
    return p.token_ids[1:n]


# ---- one profile on a fresh mesh ----------------------------------------------------------------

async def _send(stub, prompt: Prompt, shape: Shape, t0: float, slots: asyncio.Semaphore) -> Result:
    await asyncio.sleep(max(0.0, t0 + prompt.arrival_s - time.perf_counter()))
    arrival = t0 + prompt.arrival_s
    async with slots:
        request = router_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=prompt.token_ids), max_tokens=shape.output_tokens,
            sampling=common_pb2.SamplingParams(temperature=0.0), ignore_eos=True)
        first, last = None, None
        async for message in stub.Generate(request, timeout=600):
            if message.token_ids and first is None:
                first = time.perf_counter()
            last = message
    done = time.perf_counter()
    p = last.placement
    return Result(prompt.group, last.usage.prompt_tokens, last.usage.cached_prompt_tokens,
                  (first - arrival) * 1000, (done - arrival) * 1000, last.timings.time_to_first_token_ms,
                  p.decision, p.decode_worker_id, p.prefill_worker_id,
                  p.prefill_cached_tokens if p.prefill_worker_id else p.decode_cached_tokens)


async def _warm_up(stub, pool: list[int], shape: Shape) -> None:
    """First calls into torch are slow; touch every worker with prompts that share nothing with the
    workload (their few cached blocks are evicted first, being least recently used). Pairs run
    concurrently so load-aware pickers spread them too."""
    rng = random.Random(shape.seed + 1)
    for _ in range(3):
        requests = [router_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=[2, *(rng.choice(pool) for _ in range(191))]), max_tokens=2,
            sampling=common_pb2.SamplingParams(temperature=0.0), ignore_eos=True) for _ in range(2)]
        await asyncio.gather(*(_drain(stub.Generate(r, timeout=300)) for r in requests))


async def _drain(stream) -> None:
    async for _ in stream:
        pass


async def _drive(address: str, prompts: list[Prompt], pool: list[int], shape: Shape) -> tuple[list[Result], float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        await _warm_up(stub, pool, shape)
        await asyncio.sleep(1.0)  # let the warm-up's KV events and load reports settle
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_send(stub, p, shape, t0, slots) for p in prompts))
        return list(results), time.perf_counter() - t0


def run_profile(profile: str, prompts: list[Prompt], pool: list[int], shape: Shape, run_dir: str) -> dict:
    spec = MeshSpec(num_prefill=2, num_decode=2, router_port=0, profile=profile, num_blocks=shape.num_blocks,
                    torch_threads=TORCH_THREADS, max_model_len=2048)
    mesh = start_mesh(spec, os.path.join(run_dir, profile), progress=lambda m: None)
    try:
        results, wall_s = asyncio.run(_drive(mesh.router_address, prompts, pool, shape))
    finally:
        mesh.stop()
    return summarize(profile, results, wall_s, oracle_cached_tokens(prompts))


# ---- numbers ------------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(profile: str, results: list[Result], wall_s: float, oracle_tokens: int) -> dict:
    prompt_tokens = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    ttft = [r.ttft_ms for r in results]
    groups = {r.group for r in results if r.group >= 0}
    decode_per_group = {g: sorted({r.decode_worker for r in results if r.group == g}) for g in groups}
    return {
        "profile": profile, "requests": len(results), "wall_s": round(wall_s, 1),
        "ttft_p50_ms": round(_pct(ttft, 0.5), 1), "ttft_p90_ms": round(_pct(ttft, 0.9), 1),
        "e2e_p50_ms": round(_pct([r.e2e_ms for r in results], 0.5), 1),
        "router_ttft_p50_ms": round(_pct([r.router_ttft_ms for r in results], 0.5), 1),
        "prompt_tokens": prompt_tokens, "cached_tokens": cached,
        "hit_rate": round(cached / prompt_tokens, 4),
        "oracle_hit_rate": round(oracle_tokens / prompt_tokens, 4),
        "local_prefill": sum(r.decision == "local_prefill" for r in results),
        # Placed for reuse the router expected (its index includes in-flight placements) that the
        # worker did not have yet: the prefix's KV was still being computed or pulled.
        "expected_but_missed": sum(r.cached_tokens + BLOCK_SIZE <= r.expected_cached_tokens for r in results),
        "remote_prefill": sum(r.decision == "remote_prefill" for r in results),
        "decode_workers_per_group": round(statistics.mean(len(w) for w in decode_per_group.values()), 2)
        if groups else None,
        "per_request": [r._asdict() for r in results],
    }


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def run(shape: Shape, progress) -> dict:
    pool = _token_pool()
    shared = build_workload(shape, pool, shared=True)
    unique = build_workload(shape, pool, shared=False)
    oracle = oracle_cached_tokens(shared)
    progress(f"workload: {shape.groups} groups x {shape.per_group} prompts, {shape.shared_tokens} shared + "
             f"{shape.unique_tokens} unique tokens (incl. <bos>), {shape.output_tokens} output tokens, "
             f"{shape.rate_per_s}/s open loop, <= {MAX_IN_FLIGHT} in flight, seed {shape.seed}")
    kv_mib = shape.num_blocks * BLOCK_SIZE * KV_BYTES_PER_TOKEN / 2**20
    progress(f"KV cache per worker: {shape.num_blocks} blocks x {BLOCK_SIZE} tokens = "
             f"{shape.num_blocks * BLOCK_SIZE} tokens ({kv_mib:.0f} MiB); all {shape.groups} shared prefixes need "
             f"{shape.groups * shape.shared_blocks} blocks, so one worker holds at most "
             f"{shape.num_blocks // shape.shared_blocks} of them, two decode workers all of them")
    progress(f"workers: 2 prefill + 2 decode, torch_threads={TORCH_THREADS} each, not pinned to cores "
             f"({os.cpu_count()} cores shared with the router and the client)")
    run_dir = tempfile.mkdtemp(prefix="pdmesh-bench-placement-")
    rows, control = [], []
    for profile in PROFILES:
        progress(f"{profile}: fresh mesh, {len(shared)} shared-prefix requests (load {_load()})")
        rows.append(run_profile(profile, shared, pool, shape, run_dir))
        progress(f"  {_row_line(rows[-1])}")
    for profile in CONTROL_PROFILES:
        progress(f"control {profile}: fresh mesh, {len(unique)} unique requests (load {_load()})")
        control.append(run_profile(profile, unique, pool, shape, run_dir))
        control[-1]["profile"] = f"control:{profile}"
        progress(f"  {_row_line(control[-1])}")
    by = {r["profile"]: r for r in rows + control}
    pa, rr = by["prefix_aware"], by["round_robin"]
    report = {
        "ttft_p50_ratio_prefix_vs_rr": _ratio(pa["ttft_p50_ms"], rr["ttft_p50_ms"]),
        "ttft_p90_ratio_prefix_vs_rr": _ratio(pa["ttft_p90_ms"], rr["ttft_p90_ms"]),
        "hit_rate_vs_oracle": _ratio(pa["hit_rate"], pa["oracle_hit_rate"]),
        "control_ttft_p50_ratio": _ratio(by["control:prefix_aware"]["ttft_p50_ms"],
                                         by["control:round_robin"]["ttft_p50_ms"]),
        "e2e_p50_ratio_prefix_vs_rr": _ratio(pa["e2e_p50_ms"], rr["e2e_p50_ms"]),
        "oracle_cached_tokens": oracle,
        "shape": shape._asdict(), "num_blocks_per_worker": shape.num_blocks,
        "kv_bytes_per_worker": shape.num_blocks * BLOCK_SIZE * KV_BYTES_PER_TOKEN,
        "torch_threads_per_worker": TORCH_THREADS, "pinned": False, "max_in_flight": MAX_IN_FLIGHT,
        "cpu_count": os.cpu_count(), "run_dir": run_dir,
        "table": rows + control,
    }
    report["targets"] = {
        "ttft_p50_ratio_prefix_vs_rr <= 0.3": report["ttft_p50_ratio_prefix_vs_rr"] <= 0.3,
        "hit_rate_vs_oracle >= 0.95": report["hit_rate_vs_oracle"] >= 0.95,
        "control_ttft_p50_ratio in [0.85, 1.15]": 0.85 <= report["control_ttft_p50_ratio"] <= 1.15,
    }
    return report


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _row_line(r: dict) -> str:
    return (f"TTFT p50 {r['ttft_p50_ms']:.0f} ms, p90 {r['ttft_p90_ms']:.0f} ms, e2e p50 {r['e2e_p50_ms']:.0f} ms, "
            f"hit {r['hit_rate']:.1%} (oracle {r['oracle_hit_rate']:.1%}), local/remote prefill "
            f"{r['local_prefill']}/{r['remote_prefill']}, expected-but-missed {r['expected_but_missed']}, {r['wall_s']} s")


def print_table(report: dict) -> None:
    head = ("profile", "TTFT p50", "TTFT p90", "e2e p50", "router TTFT p50", "hit rate", "oracle", "local/remote",
            "exp. but missed", "decode/group")
    print(f"{head[0]:<22}" + "".join(f"{h:>16}" for h in head[1:]))
    for r in report["table"]:
        cells = (f"{r['ttft_p50_ms']:.0f} ms", f"{r['ttft_p90_ms']:.0f} ms", f"{r['e2e_p50_ms']:.0f} ms",
                 f"{r['router_ttft_p50_ms']:.0f} ms", f"{r['hit_rate']:.1%}", f"{r['oracle_hit_rate']:.1%}",
                 f"{r['local_prefill']}/{r['remote_prefill']}", str(r["expected_but_missed"]),
                 "-" if r["decode_workers_per_group"] is None else f"{r['decode_workers_per_group']:.2f}")
        print(f"{r['profile']:<22}" + "".join(f"{c:>16}" for c in cells))


def _plot(report: dict, path: str) -> None:
    """TTFT of every request per profile (sorted: an empirical CDF), log y; controls dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in report["table"]:
        ttft = sorted(q["ttft_ms"] for q in r["per_request"])
        ax.plot([(i + 0.5) / len(ttft) for i in range(len(ttft))], ttft, marker=".",
                linestyle="--" if r["profile"].startswith("control") else "-",
                label=f"{r['profile']} (hit {r['hit_rate']:.0%})")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of requests")
    ax.set_ylabel("TTFT from scheduled arrival (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    s = report["shape"]
    ax.set_title(f"{s['groups']}x{s['per_group']} prompts, {s['shared_tokens']}+{s['unique_tokens']} tokens, "
                 f"{report['num_blocks_per_worker']} KV blocks/worker, {s['rate_per_s']}/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _progress(message: str) -> None:
    print(f"[placement {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="prefix-aware placement vs round-robin and random")
    parser.add_argument("--quick", action="store_true", help="smaller workload (~3 min)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="draw TTFT per profile here (default: placement.png next to --json)")
    args = parser.parse_args(argv)
    report = run(QUICK if args.quick else FULL, _progress)
    print_table(report)
    for key in ("ttft_p50_ratio_prefix_vs_rr", "ttft_p90_ratio_prefix_vs_rr", "hit_rate_vs_oracle",
                "control_ttft_p50_ratio", "e2e_p50_ratio_prefix_vs_rr", "targets"):
        print(f"{key}: {report[key]}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        _progress(f"wrote {args.json}")
    plot = args.plot or (args.json and os.path.join(os.path.dirname(args.json), "placement.png"))
    if plot:
        _plot(report, plot)
        _progress(f"wrote {plot}")


if __name__ == "__main__":
    main()
