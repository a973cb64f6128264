"""What tracing costs: TTFT and throughput of the same requests with tracing on (every service
exporting OTLP/gRPC to a receiver running here) and off, in the same run.

    python -m bench.tracing [--quick] [--json PATH] [--plot PATH]

Two meshes run side by side on the real model, identical but for tracing: 1 prefill + 1
decode worker each (round_robin, so every request is disaggregated and every span kind is
produced, KV transfer included), 1 torch thread per worker. The span processor keeps the SDK's
default 5 s export interval, as a deployment would. One batch is `streams` concurrent streams
each sending `rounds` requests; batches alternate on/off/off/on (ABBA) so drift on this shared
machine hits both arms alike. Every request has its own prompt (no prefix reuse), and the two
arms get the same prompts. TTFT is measured by the client, from send to the first token.

Headline: ttft_p50_overhead = p50(on) / p50(off) - 1 (target <= 0.03), and the throughput ratio.
After the run the meshes drain, which flushes the spans; spans per traced request are counted so
the on arm provably traced everything.
"""

import argparse
import asyncio
import pathlib
import random
import statistics
import tempfile
import time

import grpc

from bench.common import percentile as _pct
from bench.common import plot_cdf, write_results
from bench.common import progress as _progress
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

TARGET_TTFT_P50_OVERHEAD = 0.03
PROMPT_WORDS, MAX_TOKENS = 120, 12
_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact river mountain city music garden window letter").split()




def _prompt(seed: int) -> str:
    rng = random.Random(seed)
    return f"Story {seed}: " + " ".join(rng.choice(_WORDS) for _ in range(PROMPT_WORDS))


class Arm:
    def __init__(self, name: str, address: str):
        self.name = name
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
        self.ttft_ms: list[float] = []
        self.tokens = 0
        self.busy_s = 0.0
        self.trace_ids: list[str] = []

    async def one(self, text: str) -> None:
        start = time.perf_counter()
        ttft = None
        call = self.stub.Generate(router_pb2.GenerateRequest(
            text=text, max_tokens=MAX_TOKENS, sampling=common_pb2.SamplingParams(temperature=0.0), ignore_eos=True),
            timeout=300)
        async for message in call:
            if ttft is None and message.token_ids:
                ttft = (time.perf_counter() - start) * 1000
            self.tokens += len(message.token_ids)
        self.ttft_ms.append(ttft)
        trace_id = dict(await call.initial_metadata() or ()).get("x-pdmesh-trace-id")
        if trace_id:
            self.trace_ids.append(trace_id)

    async def batch(self, prompts: list[str], streams: int) -> None:
        start = time.perf_counter()
        per_stream = [prompts[i::streams] for i in range(streams)]

        async def stream(texts):
            for text in texts:
                await self.one(text)
        await asyncio.gather(*(stream(texts) for texts in per_stream))
        self.busy_s += time.perf_counter() - start


def start_meshes(receiver_endpoint: str, progress):
    from concurrent.futures import ThreadPoolExecutor

    from engine.weights import prepare
    from pdmesh.launcher import MeshSpec, start_mesh

    prepare()
    base = dict(num_prefill=1, num_decode=1, router_port=0, profile="round_robin", kv_transports="nixl,grpc",
                num_blocks=512, torch_threads=1, max_model_len=1024, metrics=False)
    specs = {"on": MeshSpec(**base, otlp_endpoint=receiver_endpoint,
                            extra_env=(("OTEL_BSP_SCHEDULE_DELAY", "5000"),)),
             "off": MeshSpec(**base)}
    root = pathlib.Path(tempfile.mkdtemp(prefix="pdmesh-bench-tracing-"))
    progress(f"starting two meshes (tracing on / off), 1 prefill + 1 decode each, real model ({root})")
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(start_mesh, spec, str(root / name), lambda *_: None)
                   for name, spec in specs.items()}
        return {name: f.result() for name, f in futures.items()}


async def _run(meshes, batches: int, streams: int, rounds: int, progress) -> dict:
    arms = {name: Arm(name, mesh.router_address) for name, mesh in meshes.items()}
    per_batch = streams * rounds
    seed = 0
    try:
        for arm in arms.values():  # warm-up: channels, tokenizer, first NIXL handshake
            await arm.batch([_prompt(-1 - i) for i in range(streams)], streams)
            arm.ttft_ms.clear()
            arm.tokens, arm.busy_s, arm.trace_ids = 0, 0.0, []
        for b in range(batches):
            prompts = [_prompt(seed + i) for i in range(per_batch)]
            seed += per_batch
            for name in (("on", "off") if b % 2 == 0 else ("off", "on")):
                await arms[name].batch(prompts, streams)
            on, off = arms["on"], arms["off"]
            progress(f"batch pair {b + 1}/{batches}: TTFT p50 on {statistics.median(on.ttft_ms):.1f} ms, "
                     f"off {statistics.median(off.ttft_ms):.1f} ms ({len(on.ttft_ms)} requests each)")
    finally:
        await asyncio.gather(*(a.channel.close() for a in arms.values()))
    return {name: {"ttft_ms": a.ttft_ms, "tokens": a.tokens, "busy_s": a.busy_s, "trace_ids": a.trace_ids}
            for name, a in arms.items()}


def summarize(raw: dict, spans: list[dict]) -> dict:
    on, off = raw["on"], raw["off"]
    traced = set(on["trace_ids"])
    spans_per_request = sum(1 for s in spans if s["trace_id"] in traced) / max(1, len(traced))
    row = {}
    for name, arm in (("on", on), ("off", off)):
        row[f"ttft_p50_ms_{name}"] = statistics.median(arm["ttft_ms"])
        row[f"ttft_p99_ms_{name}"] = _pct(arm["ttft_ms"], 99)
        row[f"tokens_per_s_{name}"] = arm["tokens"] / arm["busy_s"]
    return {
        "ttft_p50_overhead": row["ttft_p50_ms_on"] / row["ttft_p50_ms_off"] - 1,
        "ttft_p99_overhead": row["ttft_p99_ms_on"] / row["ttft_p99_ms_off"] - 1,
        "throughput_ratio_on_vs_off": row["tokens_per_s_on"] / row["tokens_per_s_off"],
        "requests_per_arm": len(on["ttft_ms"]),
        "traced_requests": len(traced),
        "spans_per_traced_request": spans_per_request,
        "untraced_arm_trace_ids": len(off["trace_ids"]),
        **row,
    }


def print_table(result: dict) -> None:
    print(f"\n{'':<22}{'tracing on':>14}{'tracing off':>14}{'on/off':>10}")
    for label, key in (("TTFT p50 (ms)", "ttft_p50_ms"), ("TTFT p99 (ms)", "ttft_p99_ms"),
                       ("tokens/s", "tokens_per_s")):
        on, off = result[f"{key}_on"], result[f"{key}_off"]
        print(f"{label:<22}{on:>14.1f}{off:>14.1f}{on / off:>10.3f}")
    verdict = "met" if result["ttft_p50_overhead"] <= TARGET_TTFT_P50_OVERHEAD else "NOT met"
    print(f"\nttft_p50_overhead {result['ttft_p50_overhead']:+.2%} (target <= {TARGET_TTFT_P50_OVERHEAD:.0%}: "
          f"{verdict}); {result['spans_per_traced_request']:.1f} spans per traced request, "
          f"{result['traced_requests']} traced, {result['untraced_arm_trace_ids']} trace ids from the off arm")


def _plot(path: pathlib.Path, raw: dict, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, style in (("on", "-"), ("off", "--")):
        plot_cdf(ax, raw[name]["ttft_ms"], style, f"tracing {name}")
    ax.set_xlabel("TTFT (ms, client side)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"tracing overhead: TTFT p50 {result['ttft_p50_overhead']:+.1%}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.tracing", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer batches (about two minutes)")
    p.add_argument("--json", default=None, help="write headline figures here")
    p.add_argument("--plot", default=None, help="PNG path (default: tracing.png beside --json)")
    args = p.parse_args(argv)
    from pdmesh.traces.receiver import OtlpReceiver

    batches, streams, rounds = (8, 2, 2) if args.quick else (20, 4, 2)
    receiver = OtlpReceiver()
    meshes = start_meshes(receiver.endpoint, _progress)
    try:
        _progress(f"{batches} on/off batch pairs of {streams} streams x {rounds} requests, "
                  f"{PROMPT_WORDS}-word prompts, {MAX_TOKENS} tokens each")
        raw = asyncio.run(_run(meshes, batches, streams, rounds, _progress))
    finally:
        for mesh in meshes.values():
            mesh.stop()  # draining flushes the spans still buffered
    spans = list(receiver.spans)
    receiver.stop()
    result = summarize(raw, spans)
    print_table(result)
    if args.json:
        out = {**result, "target_ttft_p50_overhead": TARGET_TTFT_P50_OVERHEAD,
               "setup": {"batches": batches, "streams": streams, "rounds": rounds, "prompt_words": PROMPT_WORDS,
                         "max_tokens": MAX_TOKENS, "mesh": "1 prefill + 1 decode, real model, round_robin, "
                                                           "1 torch thread per worker, OTLP/gRPC to an in-process receiver"}}
        write_results(args.json, out, "tracing.png", lambda png: _plot(png, raw, result), args.plot)


if __name__ == "__main__":
    main()
