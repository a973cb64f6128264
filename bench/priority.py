"""Live traffic first, batch on the leftovers: interactive TTFT with and without a batch backlog,
and how much of the capacity interactive traffic leaves idle the batch work actually uses.

    python -m bench.priority [--quick] [--json PATH] [--plot PATH]

One mesh on the real model (1 decode worker prefilling locally; the router with its default
headroom rule), three kinds of phase in one run:
  A  interactive alone: open-loop Poisson arrivals at a fixed moderate rate;
  B  the same interactive schedule (same prompts, same offsets) plus a BatchService job big
     enough to saturate the worker, submitted before the slot starts (its first results are in,
     so the slot sees a running backlog, not its ramp);
  C  the mesh's capacity: `capacity_streams` closed-loop streams (the worker's max_num_seqs) of
     the batch work's prompts and lengths sent as interactive requests, so no batch rule caps
     them; every token received inside the slot counts.
Slots run A B C C B A (twice in a full run), so drift on this shared machine hits every arm
alike. Batch items have varied lengths so completions do not come in waves.
Every slot has its own prompts (same word counts and lengths, other words): the first version
replayed slot k of A's prompts in slot k of B, so the later of the two found them in the prefix
cache, and B (running right after A) won that more often than A (a batch backlog churns the
cache before the second A); the two C slots and the two B jobs likewise shared prompts. A
prompt of 30 words caches 2 of its ~3 blocks, ~35 ms of a ~140 ms TTFT on this host.
Interactive TTFT is measured by the client from the scheduled send time. Capacity is counted in
generated tokens per second: the capacity interactive traffic leaves idle is the mesh's capacity
(phase C) minus the interactive tokens/s of phase A (continuous batching lets batch sequences
share a step with live ones, so "idle" is spare tokens per second, not idle time; the fraction of
phase A with a live request in flight is reported too). Headlines:
  interactive_ttft_p99_ratio = TTFT p99 in B / TTFT p99 in A          (target <= 1.2)
  batch_share_of_leftover    = batch tokens/s in B / leftover capacity (target >= 0.8)
Batch tokens are credited when an item's result is stored, inside the phase's window.
The whole interactive request (12 tokens) is reported too: its decode steps are shared with the
batch sequences, so it takes longer beside the backlog even when its first token does not.
Where the TTFT goes (means, from the final message's PhaseTimings; every request's [TTFT, worker
wait] is in the JSON as ttft_samples_ms): the router's admission
queue, the decode worker's wait before the first step that computed the prompt (the step in
flight, a slot), and the rest (the prefill step itself, placement, gRPC and the client).
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
from bench.common import progress as _progress
from bench.common import write_results
from pdmesh.v1 import batch_pb2, batch_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc

TARGET_TTFT_RATIO, TARGET_SHARE = 1.2, 0.8
_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact river mountain city music garden window letter").split()




def _seed(slot: int, n: int) -> int:
    """The text seed of prompt n of a slot: no two slots share a prompt (see the docstring)."""
    return 100_000 * (slot + 1) + n


def _text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return f"Note {seed}: " + " ".join(rng.choice(_WORDS) for _ in range(words))


class Setup:
    def __init__(self, quick: bool):
        self.phase_s = 15.0 if quick else 30.0  # each slot
        self.slots = "ABCCBA" if quick else "ABCCBAABCCBA"
        self.capacity_streams = 16
        self.rate = 0.5  # interactive requests per second
        self.interactive_words, self.interactive_tokens = 30, 12
        self.batch_words, self.batch_tokens = 30, (8, 40)  # max_tokens drawn from this range
        self.batch_items = 300


async def _interactive(stub, setup: Setup, t0: float, record: list, seed: int, slot: int) -> None:
    rng = random.Random(seed)
    offsets, at = [], rng.expovariate(setup.rate)
    while at < setup.phase_s:
        offsets.append(at)
        at += rng.expovariate(setup.rate)

    async def one(i: int, offset: float) -> None:
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        sent = t0 + offset
        request = router_pb2.GenerateRequest(text=_text(_seed(slot, i), setup.interactive_words), ignore_eos=True,
                                             max_tokens=setup.interactive_tokens, tenant_id="live",
                                             sampling=common_pb2.SamplingParams(temperature=0.0))
        ttft, final = None, router_pb2.GenerateResponse()
        async for message in stub.Generate(request, timeout=300):
            if ttft is None and message.token_ids:
                ttft = time.perf_counter() - sent
            if message.HasField("timings"):
                final = message
        record.append({"sent": sent, "ttft_s": ttft, "done": time.perf_counter(),
                       "router_queue_ms": final.timings.queue_ms, "worker_wait_ms": final.timings.decode_queue_ms,
                       "cached_tokens": final.usage.cached_prompt_tokens})
    await asyncio.gather(*(one(i, o) for i, o in enumerate(offsets)))


class BatchLoad:
    """A saturating batch job, its results timestamped as they are stored."""

    def __init__(self, stub, setup: Setup, tag: str, slot: int):
        self.stub, self.setup, self.tag, self.slot = stub, setup, tag, slot
        self.done: list[tuple[float, int]] = []  # (perf_counter when received, completion tokens)
        self.job_id = ""

    async def start(self) -> None:
        s = self.setup
        rng = random.Random(self.tag)
        items = [batch_pb2.BatchItem(custom_id=f"{self.tag}-{i}", request=router_pb2.GenerateRequest(
            text=_text(_seed(self.slot, 10_000 + i), s.batch_words), max_tokens=rng.randint(*s.batch_tokens), ignore_eos=True,
            sampling=common_pb2.SamplingParams(temperature=0.0))) for i in range(s.batch_items)]
        job = await self.stub.CreateBatchJob(batch_pb2.CreateBatchJobRequest(tenant_id="offline", items=items),
                                             timeout=120)
        self.job_id = job.job.job_id
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for message in self.stub.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(
                tenant_id="offline", job_id=self.job_id)):
            self.done.append((time.perf_counter(), message.result.usage.completion_tokens))

    async def stop(self) -> None:
        await self.stub.CancelBatchJob(batch_pb2.CancelBatchJobRequest(tenant_id="offline", job_id=self.job_id))
        await asyncio.gather(self._task, return_exceptions=True)


def _busy_fraction(records: list[dict], start: float, end: float) -> float:
    """Fraction of [start, end] during which at least one request was in flight."""
    busy, cursor = 0.0, start
    for r in sorted(records, key=lambda r: r["sent"]):
        lo, hi = max(r["sent"], cursor), min(r["done"], end)
        if hi > lo:
            busy += hi - lo
            cursor = hi
    return busy / (end - start)


async def _run(address: str, setup: Setup) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        router, batch = router_pb2_grpc.RouterServiceStub(channel), batch_pb2_grpc.BatchServiceStub(channel)
        warm = [router_pb2.GenerateRequest(text=_text(-1 - i, 30), max_tokens=8) for i in range(6)]
        for pair in (warm[:2], warm[2:]):  # warm-up: alone, then several at once
            await asyncio.gather(*(_drain(router.Generate(r)) for r in pair))
        raw = {"t0": time.perf_counter(), "interactive_tokens": setup.interactive_tokens, "phases": []}
        for i, kind in enumerate(setup.slots):
            phase = {"kind": kind, "interactive": [], "batch": []}
            raw["phases"].append(phase)
            what = {"A": "interactive alone", "B": "interactive + batch backlog",
                    "C": f"capacity: {setup.capacity_streams} closed-loop streams"}[kind]
            _progress(f"phase {i + 1}/{len(setup.slots)} {kind}: {what}")
            load = BatchLoad(batch, setup, f"{kind}{i}", slot=i) if kind == "B" else None
            if load:  # the backlog is running (first results in) before the slot's clock starts
                await load.start()
                ramp_end = time.perf_counter() + 10.0
                while len(load.done) < 2 and time.perf_counter() < ramp_end:
                    await asyncio.sleep(0.1)
            phase["start"] = time.perf_counter()
            if kind == "C":
                await _saturate(router, setup, phase["start"], phase["batch"], tag=i)
            else:  # slot k of A and slot k of B share arrival times (A B B A: seeds 1 1 2 2), not prompts
                seed = 1 + sum(1 for p in raw["phases"][:-1] if p["kind"] == kind)
                await _interactive(router, setup, phase["start"], phase["interactive"], seed=seed, slot=i)
            phase["end"] = phase["start"] + setup.phase_s
            if load:
                await load.stop()
                phase["batch"] = load.done
            await asyncio.sleep(2.0)  # cancelled work leaves the worker
        return raw


async def _saturate(router, setup: Setup, start: float, record: list, tag: int) -> None:
    """Closed-loop streams of batch-like requests until the slot ends; records (time, tokens)."""
    rng = random.Random(f"C{tag}")
    end = start + setup.phase_s

    async def stream(k: int) -> None:
        n = 0
        while time.perf_counter() < end:
            n += 1
            request = router_pb2.GenerateRequest(
                text=_text(_seed(tag, 20_000 + 1000 * k + n), setup.batch_words), max_tokens=rng.randint(*setup.batch_tokens),
                ignore_eos=True, tenant_id="capacity", sampling=common_pb2.SamplingParams(temperature=0.0))
            call = router.Generate(request, timeout=300)
            async for message in call:
                now = time.perf_counter()
                if now > end:
                    call.cancel()
                    return
                record.append((now, len(message.token_ids)))
    await asyncio.gather(*(stream(k) for k in range(setup.capacity_streams)), return_exceptions=True)


async def _drain(call) -> None:
    async for _ in call:
        pass


def summarize(raw: dict) -> dict:
    phases = {k: [p for p in raw["phases"] if p["kind"] == k] for k in "ABC"}
    ttft = {k: [r["ttft_s"] * 1000 for p in phases[k] for r in p["interactive"] if r["ttft_s"] is not None]
            for k in "AB"}
    seconds = {k: sum(p["end"] - p["start"] for p in phases[k]) for k in "ABC"}
    tokens = {k: sum(n for p in phases[k] for t, n in p["batch"] if p["start"] <= t <= p["end"]) for k in "BC"}
    capacity = tokens["C"] / seconds["C"]
    busy = sum(_busy_fraction(p["interactive"], p["start"], p["end"]) for p in phases["A"]) / len(phases["A"])
    interactive_tokens_per_s = sum(len(p["interactive"]) for p in phases["A"]) * raw["interactive_tokens"] / seconds["A"]
    leftover = capacity - interactive_tokens_per_s
    batch_b = tokens["B"] / seconds["B"]
    records = {k: [r for p in phases[k] for r in p["interactive"] if r["ttft_s"] is not None] for k in "AB"}
    return {
        "interactive_ttft_p99_ratio": _pct(ttft["B"], 99) / _pct(ttft["A"], 99),
        "batch_share_of_leftover": batch_b / leftover if leftover > 0 else float("nan"),
        "interactive_ttft_p50_ratio": statistics.median(ttft["B"]) / statistics.median(ttft["A"]),
        "ttft_p50_ms_alone": statistics.median(ttft["A"]), "ttft_p99_ms_alone": _pct(ttft["A"], 99),
        "ttft_p50_ms_with_batch": statistics.median(ttft["B"]), "ttft_p99_ms_with_batch": _pct(ttft["B"], 99),
        "interactive_requests_alone": len(ttft["A"]), "interactive_requests_with_batch": len(ttft["B"]),
        "interactive_busy_fraction": busy, "capacity_tokens_per_s": capacity,
        "interactive_tokens_per_s": interactive_tokens_per_s,
        "leftover_capacity_tokens_per_s": leftover, "batch_tokens_per_s_with_interactive": batch_b,
        "request_p50_ms_alone": statistics.median(_e2e_ms(records["A"])),
        "request_p50_ms_with_batch": statistics.median(_e2e_ms(records["B"])),
        "ttft_breakdown_ms": {"alone": _breakdown(records["A"]), "with_batch": _breakdown(records["B"])},
        "ttft_samples_ms": {arm: sorted([round(r["ttft_s"] * 1000, 1), round(r["worker_wait_ms"], 1)]
                                        for r in records[k]) for arm, k in (("alone", "A"), ("with_batch", "B"))},
    }


def _e2e_ms(records: list[dict]) -> list[float]:
    return [(r["done"] - r["sent"]) * 1000 for r in records]


def _breakdown(records: list[dict]) -> dict:
    """Mean TTFT split into router queue, decode worker wait and the rest (prefill step, relay)."""
    mean = lambda key: statistics.fmean(r[key] for r in records)  # noqa: E731
    ttft = statistics.fmean(r["ttft_s"] * 1000 for r in records)
    router, worker = mean("router_queue_ms"), mean("worker_wait_ms")
    return {"ttft": ttft, "router_queue": router, "decode_worker_wait": worker,
            "prefill_step_and_relay": ttft - router - worker, "cached_prompt_tokens": mean("cached_tokens")}


def print_table(r: dict) -> None:
    print(f"\n{'':<34}{'interactive alone':>18}{'+ batch backlog':>18}{'ratio':>8}")
    for label, key in (("interactive TTFT p50 (ms)", "ttft_p50_ms"), ("interactive TTFT p99 (ms)", "ttft_p99_ms"),
                       ("interactive request p50 (ms)", "request_p50_ms")):
        alone, mixed = r[f"{key}_alone"], r[f"{key}_with_batch"]
        print(f"{label:<34}{alone:>18.0f}{mixed:>18.0f}{mixed / alone:>8.2f}")
    parts = r["ttft_breakdown_ms"]
    for label, key in (("  mean TTFT (ms)", "ttft"), ("    router admission queue", "router_queue"),
                       ("    decode worker: wait for a step", "decode_worker_wait"),
                       ("    prefill step, placement, relay", "prefill_step_and_relay"),
                       ("  prompt tokens from prefix cache", "cached_prompt_tokens")):
        print(f"{label:<34}{parts['alone'][key]:>18.0f}{parts['with_batch'][key]:>18.0f}")
    print(f"\nmesh capacity (saturated)         {r['capacity_tokens_per_s']:8.1f} tokens/s")
    print(f"interactive traffic (A)           {r['interactive_tokens_per_s']:8.1f} tokens/s "
          f"(a live request in flight {r['interactive_busy_fraction']:.0%} of the time)")
    print(f"leftover = capacity - interactive {r['leftover_capacity_tokens_per_s']:8.1f} tokens/s")
    print(f"batch throughput beside live      {r['batch_tokens_per_s_with_interactive']:8.1f} tokens/s")
    ratio, share = r["interactive_ttft_p99_ratio"], r["batch_share_of_leftover"]
    print(f"\ninteractive_ttft_p99_ratio {ratio:.2f} (target <= {TARGET_TTFT_RATIO}: "
          f"{'met' if ratio <= TARGET_TTFT_RATIO else 'NOT met'}); batch_share_of_leftover {share:.2f} "
          f"(target >= {TARGET_SHARE}: {'met' if share >= TARGET_SHARE else 'NOT met'})")


def _plot(path: pathlib.Path, raw: dict, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t0 = raw["t0"]
    colors = {"A": ("tab:blue", "#e8f0ff"), "B": ("tab:red", "#fff0e0"), "C": ("tab:green", "#e8ffe8")}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    labelled = set()
    for phase in raw["phases"]:
        kind = phase["kind"]
        color, shade = colors[kind]
        for axis in (top, bottom):
            axis.axvspan(phase["start"] - t0, phase["end"] - t0, color=shade, zorder=-1)
        if phase["interactive"]:
            top.plot([r["sent"] - t0 for r in phase["interactive"]], [r["ttft_s"] * 1000 for r in phase["interactive"]],
                     "o", color=color, ms=4, label=None if ("i", kind) in labelled else f"interactive TTFT ({kind})")
            labelled.add(("i", kind))
        bins = {}
        for t, n in phase["batch"]:
            bins[int(t - t0)] = bins.get(int(t - t0), 0) + n
        if bins:
            bottom.bar(list(bins), list(bins.values()), width=1.0, color=color,
                       label=None if ("b", kind) in labelled else
                       ("capacity tokens per s (C)" if kind == "C" else "batch tokens completed per s (B)"))
            labelled.add(("b", kind))
    top.set_ylabel("TTFT (ms)")
    bottom.set_ylabel("batch tokens / s")
    bottom.set_xlabel("seconds (A: interactive alone, B: interactive + batch backlog, C: saturated capacity)")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"priority: TTFT p99 ratio {result['interactive_ttft_p99_ratio']:.2f}, "
                 f"batch share of leftover {result['batch_share_of_leftover']:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.priority", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter phases (about two minutes)")
    p.add_argument("--json", default=None, help="write headline figures here")
    p.add_argument("--plot", default=None, help="PNG timeline (default: priority.png beside --json)")
    p.add_argument("--torch-threads", type=int, default=2)
    args = p.parse_args(argv)
    from engine.weights import prepare
    from pdmesh.launcher import MeshSpec, start_mesh

    prepare()
    setup = Setup(args.quick)
    run = pathlib.Path(tempfile.mkdtemp(prefix="pdmesh-bench-priority-"))
    _progress(f"starting a mesh: router + 1 decode worker (local prefill), real model ({run})")
    mesh = start_mesh(MeshSpec(num_prefill=0, num_decode=1, router_port=0, kv_transports="grpc", num_blocks=1024,
                               torch_threads=args.torch_threads, max_model_len=1024, metrics=False),
                      str(run), lambda *_: None)
    try:
        raw = asyncio.run(_run(mesh.router_address, setup))
    finally:
        mesh.stop()
    result = summarize(raw)
    print_table(result)
    if args.json:
        out = {**result, "target_interactive_ttft_p99_ratio": TARGET_TTFT_RATIO,
               "target_batch_share_of_leftover": TARGET_SHARE,
               "setup": {**vars(setup), "mesh": "router + 1 decode worker (local prefill), real model, "
                                                f"{args.torch_threads} torch threads, default headroom rule"}}
        write_results(args.json, out, "priority.png", lambda png: _plot(png, raw, result), args.plot)


if __name__ == "__main__":
    main()
