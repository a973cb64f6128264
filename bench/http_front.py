"""What the OpenAI-compatible HTTP front adds: TTFT of the same streams through HTTP (server-sent
events) vs the router's gRPC API, side by side in one run.

    python -m bench.http_front [--quick] [--json PATH] [--plot PATH]

One tiny-model mesh in real processes (one decode worker, no prefill worker, prefill kept on the
decode worker, as bench.router_overhead runs it), so both arms run the very same router and engine
work and differ only in the front door. 32 concurrent streams each send requests back to back
(1 KB text prompts, 4 tokens, greedy), `rounds` requests per stream and batch.

The headline (`http_added_ttft_*`) sends half of every batch's streams through each front door
(the halves swap every batch), so both arms meet the very same decode steps at the same moments
and differ only in the door. Also measured, as first reported (`*_separate_batches`,
`*_shared_cores`): one arm per batch, HTTP and gRPC batches alternating (ABBA). That figure is
bimodal from run to run (about 0 or about +10 ms at the median), though the HTTP arm costs the
router less CPU per request: in a lock-step closed loop each arm's arrivals form their own decode
steps, and the median request lands in the first or the second step of a burst.
TTFT is measured at the client: the first gRPC message carrying a token vs the first SSE `data:`
event (the front sends it as soon as the first token arrives). Added TTFT = HTTP percentile -
gRPC percentile. A one-stream-at-a-time diagnostic runs the same comparison without queueing.

The client shares this machine's cores with the mesh, and in a closed loop of 32 streams its own
per-request CPU delays every request behind it, so the HTTP client is aiohttp (C-accelerated
parser; what aiperf uses; installed with the kubernetes client) reading raw bytes, not httpx
(about 1.5 ms more client CPU per request here). To tell the front's cost from the client's, the
CPU time the router process and the client spend per request is recorded for each arm.

The 32-stream comparison runs in two core layouts on the same mesh, as in bench.router_overhead:
first shared (nothing pinned: the figure this benchmark reported first, `*_shared_cores` in the
JSON), then pinned, the headline (the router with both front doors alone on one core, the decode
worker and this load generator on the other, so neither front's CPU is taken from the worker).
"""

import argparse
import asyncio
import os
import pathlib
import statistics
import tempfile
import time

import aiohttp
import grpc

from bench.common import CpuMeter, add_cpu_seconds, core_split, layout_names, pin_process, pin_router_apart, plot_cdf, write_results
from bench.common import percentile as _pct
from bench.common import progress as _progress
from bench.router_overhead import LOCAL_PREFILL_PROFILE, _batch, _text
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

STREAMS = 32
PROMPT_BYTES = 1024
NUM_PROMPTS = 4
MAX_TOKENS = 4
TARGETS = {"http_added_ttft_p50_ms": 2.0}


class Arms:
    """The two front doors for one prompt; each call returns its TTFT in ms."""

    def __init__(self, router_address: str, http_address: str):
        from services.common.server import CHANNEL_OPTIONS
        self._channel = grpc.aio.insecure_channel(router_address, options=CHANNEL_OPTIONS)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._sampling = common_pb2.SamplingParams(temperature=0.0)
        self._url = f"{http_address}/v1/completions"
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=STREAMS * 2),
                                           timeout=aiohttp.ClientTimeout(total=120))

    async def grpc(self, text: str) -> float:
        start = time.perf_counter()
        ttft = None
        async for m in self._stub.Generate(router_pb2.GenerateRequest(
                text=text, max_tokens=MAX_TOKENS, sampling=self._sampling, ignore_eos=True), timeout=120):
            if ttft is None and m.token_ids:
                ttft = (time.perf_counter() - start) * 1000
        return ttft

    async def http(self, text: str) -> float:
        body = {"prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "ignore_eos": True}
        start = time.perf_counter()
        ttft = None
        async with self._http.post(self._url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:300]!r}")
            async for chunk in response.content.iter_any():
                if ttft is None and b"data:" in chunk:
                    ttft = (time.perf_counter() - start) * 1000
        return ttft

    async def check_same_output(self, text: str) -> None:
        grpc_tokens = 0
        async for m in self._stub.Generate(router_pb2.GenerateRequest(
                text=text, max_tokens=MAX_TOKENS, sampling=self._sampling, ignore_eos=True), timeout=120):
            grpc_tokens += len(m.token_ids)
            last = m
        body = {"prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        async with self._http.post(self._url, json=body) as response:
            usage = (await response.json())["usage"]
        if (usage["prompt_tokens"], usage["completion_tokens"]) != (last.usage.prompt_tokens, grpc_tokens):
            raise RuntimeError(f"the arms differ: HTTP usage {usage}, gRPC {last.usage}")

    async def close(self) -> None:
        await self._channel.close()
        await self._http.close()


async def _measure(arms: Arms, prompts: list[str], pairs: int, rounds: int, streams: int, cpu: CpuMeter) -> dict:
    samples = {"http": [], "grpc": [], "cpu": {"http": {}, "grpc": {}}, "pair_added_p50": []}
    for pair in range(pairs):
        medians = {}
        for arm in (("http", "grpc") if pair % 2 == 0 else ("grpc", "http")):
            call = getattr(arms, arm)
            before = cpu.read()
            batch = await _batch(lambda text, _ids, call=call: call(text), [(p, None) for p in prompts], rounds,
                                 streams)
            after = cpu.read()
            samples[arm] += batch
            medians[arm] = statistics.median(batch)
            add_cpu_seconds(samples["cpu"][arm], before, after)
        samples["pair_added_p50"].append(medians["http"] - medians["grpc"])
    return samples


async def _measure_mixed(arms: Arms, prompts: list[str], batches: int, rounds: int, streams: int) -> dict:
    """Both front doors in the same batch: half the streams through each (the slots swap every
    batch), so both arms meet the very same decode steps and differ only in the front door."""
    samples = {"http": [], "grpc": [], "pair_added_p50": []}
    for b in range(batches):
        async def stream(i: int, b=b) -> tuple[str, list[float]]:
            arm = "http" if (i + b) % 2 == 0 else "grpc"
            call = getattr(arms, arm)
            return arm, [await call(prompts[(i + r) % len(prompts)]) for r in range(rounds)]
        batch = {"http": [], "grpc": []}
        for arm, ttfts in await asyncio.gather(*(stream(i) for i in range(streams))):
            batch[arm] += ttfts
        for arm in ("http", "grpc"):
            samples[arm] += batch[arm]
        samples["pair_added_p50"].append(statistics.median(batch["http"]) - statistics.median(batch["grpc"]))
    return samples


def _summarize(samples: dict) -> dict:
    row = {"requests_per_arm": len(samples["http"])}
    for arm in ("http", "grpc"):
        row[f"{arm}_p50_ms"] = statistics.median(samples[arm])
        row[f"{arm}_p99_ms"] = _pct(samples[arm], 99)
        for name, seconds in samples.get("cpu", {}).get(arm, {}).items():  # none for mixed batches
            row[f"{arm}_{name}_cpu_ms_per_request"] = seconds * 1000 / len(samples[arm])
    row["added_p50_ms"] = row["http_p50_ms"] - row["grpc_p50_ms"]
    # Each HTTP batch against the gRPC batch beside it: the spread says how much is drift.
    row["pair_added_p50_ms"] = samples["pair_added_p50"]
    row["median_pair_added_p50_ms"] = statistics.median(samples["pair_added_p50"])
    row["added_p99_ms"] = row["http_p99_ms"] - row["grpc_p99_ms"]
    if "http_router_cpu_ms_per_request" in row:
        row["added_router_cpu_ms_per_request"] = (row["http_router_cpu_ms_per_request"]
                                                  - row["grpc_router_cpu_ms_per_request"])
    return row


def run(quick: bool, progress=_progress) -> tuple[dict, dict, dict, dict, dict]:
    from pdmesh.launcher import MeshSpec, start_mesh

    prompts = [_text(PROMPT_BYTES, seed) for seed in range(NUM_PROMPTS)]
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="pdmesh-http-front-"))
    (run_dir / "local_prefill.yaml").write_text(LOCAL_PREFILL_PROFILE)
    spec = MeshSpec(num_prefill=0, num_decode=1, router_port=0, http_port=0, model="tiny",
                    profile=str(run_dir / "local_prefill.yaml"), kv_transports="grpc", num_blocks=1024,
                    torch_threads=1, max_model_len=1024, extra_env=(("PDMESH_MAX_NUM_SEQS", str(STREAMS)),))
    setup = {"streams": STREAMS, "prompt_bytes": PROMPT_BYTES, "prompts": NUM_PROMPTS, "max_tokens": MAX_TOKENS,
             "mesh": "1 tiny decode worker, 0 prefill workers, profile local_prefill (never_remote)",
             "http_client": f"aiohttp {aiohttp.__version__} (raw bytes)", "grpc_client": f"grpc.aio {grpc.__version__}"}
    progress(f"starting mesh: {setup['mesh']} ({run_dir})")
    mesh = start_mesh(spec, str(run_dir), progress=lambda m: progress(m.strip()))
    pairs, rounds = (24, 3) if quick else (48, 4)
    split, own_cpus = core_split(), os.sched_getaffinity(0)
    setup["layouts"] = layout_names(split)
    try:
        async def go():
            router_pid = mesh.process("router").popen.pid
            decode_pid = mesh.workers("decode")[0].popen.pid
            arms = Arms(mesh.router_address, mesh.http_address)
            cpu = CpuMeter({"router": router_pid, "decode": decode_pid})
            concurrent = {}
            try:
                await arms.check_same_output(prompts[0])
                await _measure(arms, prompts, 2, 1, STREAMS, cpu)  # warm-up: connections, prefix cache
                progress("one stream alone (diagnostic)")
                single = await _measure(arms, prompts, 40 if quick else 100, 1, 1, cpu)
                for layout in setup["layouts"]:  # shared, then pinned when there are two CPUs
                    if layout == "pinned":
                        pin_router_apart(split, router_pid, decode_pid)
                    progress(f"{layout} cores: {pairs} HTTP/gRPC batch pairs of {STREAMS} streams x {rounds} requests")
                    concurrent[layout] = await _measure(arms, prompts, pairs, rounds, STREAMS, cpu)
                progress(f"{layout} cores: {pairs} batches of {STREAMS} streams x {rounds} requests, half of the "
                         "streams HTTP, half gRPC")
                mixed = await _measure_mixed(arms, prompts, pairs, rounds, STREAMS)
                return concurrent, single, mixed
            finally:
                pin_process(0, own_cpus)
                await arms.close()
        concurrent, single, mixed = asyncio.run(go())
    finally:
        mesh.stop()
    rows = {layout: _summarize(samples) for layout, samples in concurrent.items()}
    return rows, _summarize(single), _summarize(mixed), concurrent, setup


def _print_table(rows: dict[str, dict], single: dict, mixed: dict) -> None:
    print()
    print(f"{'':>30} {'n/arm':>6} | {'HTTP p50':>9} {'gRPC p50':>9} {'added p50':>9} | "
          f"{'HTTP p99':>9} {'gRPC p99':>9} {'added p99':>9}")
    named = [(f"{STREAMS} streams, {layout} cores", r) for layout, r in rows.items()]
    last = list(rows)[-1]
    for name, r in [*named, (f"{STREAMS} mixed, {last} cores", mixed), ("1 stream (diagnostic)", single)]:
        print(f"{name:>30} {r['requests_per_arm']:>6} | {r['http_p50_ms']:>9.2f} {r['grpc_p50_ms']:>9.2f} "
              f"{r['added_p50_ms']:>+9.2f} | {r['http_p99_ms']:>9.2f} {r['grpc_p99_ms']:>9.2f} {r['added_p99_ms']:>+9.2f}")
    print(f"TTFT in ms; target: added p50 <= {TARGETS['http_added_ttft_p50_ms']} ms at {STREAMS} streams. Mixed: each "
          f"batch sends half of its {STREAMS} streams through each front door (same decode steps for both)")
    pairs = sorted(mixed["pair_added_p50_ms"])
    print(f"mixed batches: added p50 per batch: median {mixed['median_pair_added_p50_ms']:+.2f} ms, range "
          f"{pairs[0]:+.2f} .. {pairs[-1]:+.2f} ms over {len(pairs)} batches")
    for layout, row in rows.items():
        pairs = sorted(row["pair_added_p50_ms"])
        print(f"{layout} cores: added p50 per HTTP/gRPC batch pair: median {row['median_pair_added_p50_ms']:+.2f} ms, "
              f"range {pairs[0]:+.2f} .. {pairs[-1]:+.2f} ms over {len(pairs)} pairs")
        print(f"{layout} cores: CPU per request: router {row['http_router_cpu_ms_per_request']:.2f} ms HTTP vs "
              f"{row['grpc_router_cpu_ms_per_request']:.2f} ms gRPC ({row['added_router_cpu_ms_per_request']:+.2f} ms); "
              f"client {row['http_client_cpu_ms_per_request']:.2f} ms HTTP vs {row['grpc_client_cpu_ms_per_request']:.2f} "
              f"ms gRPC; decode worker {row['http_decode_cpu_ms_per_request']:.2f} vs "
              f"{row['grpc_decode_cpu_ms_per_request']:.2f} ms")


def _plot(path: pathlib.Path, samples: dict[str, dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for layout, layout_samples in samples.items():
        for arm, style in (("grpc", "-"), ("http", "--")):
            plot_cdf(ax, layout_samples[arm], style, f"{arm}, {layout} cores")
    ax.set_title(f"TTFT, HTTP front vs gRPC, {STREAMS} streams, tiny model")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.http_front", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer batches (~2 minutes)")
    p.add_argument("--json", default=None, help="write results here (and a TTFT CDF PNG beside it)")
    p.add_argument("--plot", default=None, help="PNG path (default: http_front.png beside --json)")
    args = p.parse_args(argv)
    _progress(f"load average {os.getloadavg()[0]:.2f} at start")
    rows, single, mixed, samples, setup = run(args.quick)
    layout = "pinned" if "pinned" in rows else "shared"  # the headline; shared cores without a second CPU
    row, shared = rows[layout], rows["shared"]
    result = {
        "http_added_ttft_p50_ms": mixed["added_p50_ms"], "http_added_ttft_p99_ms": mixed["added_p99_ms"],
        "http_added_router_cpu_ms_per_request": row["added_router_cpu_ms_per_request"],
        "headline_layout": layout,
        "http_added_ttft_p50_ms_separate_batches": row["added_p50_ms"],
        "http_added_ttft_p99_ms_separate_batches": row["added_p99_ms"],
        "http_added_ttft_p50_ms_shared_cores": shared["added_p50_ms"],
        "http_added_ttft_p99_ms_shared_cores": shared["added_p99_ms"],
        "headline_note": ("http_added_ttft_*: 32 streams in the headline layout (pinned: the router alone on its core, "
                          "decode worker and load generator on the other), half of every batch's streams through each "
                          "front door, so both meet the same decode steps; *_separate_batches: HTTP and gRPC in "
                          "alternating batches of 32 streams each, same layout (bimodal: the two arms' arrivals form "
                          "different decode steps); *_shared_cores: separate batches with nothing pinned"),
        "concurrent": row, "concurrent_shared_cores": shared, "mixed": mixed, "single_stream": single, "setup": setup,
        "targets": TARGETS, "load_average_end": os.getloadavg()[0], "quick": args.quick,
    }
    _print_table(rows, single, mixed)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        write_results(args.json, result, "http_front.png", lambda png: _plot(png, samples), args.plot)


if __name__ == "__main__":
    main()
