"""What the router adds: TTFT through the router vs straight to the decode worker, and the cost of
one placement decision over 1,000 synthetic workers.

    python -m bench.router_overhead [--quick] [--json PATH] [--plot PATH]

Part 1 (real processes, tiny model so model time does not bury the router's cost): a mesh of one
decode worker and no prefill worker, with a profile that keeps prefill on the decode worker
(prefix_aware's decode pool + the never_remote decider), so both arms run the very same engine
work. 64 concurrent streams each send requests back to back; one batch is every stream doing
`rounds` requests through one arm, and router/direct batches alternate (ABBA) so drift on this
shared machine hits both alike. Router requests carry text the router tokenizes; direct requests
carry the same token ids (checked against the router's usage.prompt_tokens). A few fixed prompts
per size are reused, so after warm-up the decode worker serves them from its prefix cache and
model time stays small in both arms. Added TTFT = router percentile - direct percentile.

Every size is measured in two core layouts, one after the other on the same mesh:
- pinned (the headline): the router alone on one core; the decode worker and this load generator
  on the other (bench.common.core_split; every thread of each process is pinned). This is the
  deployment the figure is about (a router has its own Deployment, off the workers' cores) and
  the layout of Dynamo's frontend benchmark (frontend pinned with taskset on its own cores,
  workers and load generator on the rest). The load generator's CPU is the same in both arms
  (it sends and reads the same streams), so it slows the worker alike in both.
- shared (the figure this benchmark reported first; `*_shared_cores` in the JSON): nothing pinned,
  three busy processes on 2 cores. In a saturated closed loop of 64 streams the router's CPU is
  then taken from the decode worker, and TTFT grows by 64 x that loss per request, so the figure
  mixes the worker's lost throughput into the router's latency.
A closed loop of identical requests runs in lock-step: a decode batch ends, all 64 streams send
at once, and the router (one Python event loop) takes the burst one request at a time, so the
k-th waits for the k-1 before it. An open-loop diagnostic in the headline layout (`open_loop`,
1 KB) sends Poisson arrivals at 60% of the direct arm's closed-loop rate, the same arrival times
in both arms: the router's latency when requests do not arrive in bursts of 64. Four more paths
are compared with direct in the headline layout at 1 KB (COMPARISONS): a bare relay in the
router's place (`bench.grpc_relay`: a Python gRPC hop making one call per request); the router's own hop alone
(`bench.grpc_relay --session`: each call one request on a DecodeSession stream, as the router
sends it, with none of the router's work); the router sent token ids, as a client that tokenizes
does (its hop and placement without tokenizing); and direct against itself in the same
alternating batches (A/A: the smallest difference this comparison can resolve on this host).
At the end the decode worker's /metrics say how it scheduled the whole run: how many steps put
waiting prompts first (engine/step_cost.py) and the step cost it fitted.

Part 2 (in process): the real prefix_aware profile places a 4,096-token prompt among 500 decode
and 500 prefill workers whose prefix index holds 100,000 blocks; timed with the block hashing it
does inside, and with the hashes already computed. The workers are in a WorkerTable, as the
router's registry keeps them (a row rewritten per load report, not per decision).
"""

import argparse
import asyncio
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import grpc

from bench.common import (
    CpuMeter,
    add_cpu_seconds,
    core_split,
    engine_scheduling,
    layout_names,
    pin_process,
    pin_router_apart,
    plot_cdf,
    step_cost_text,
    write_results,
)
from bench.common import percentile as _pct
from bench.common import progress as _progress
from pdmesh.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

STREAMS = 64
# Paths compared with direct besides the router's own, at 1 KB in the headline layout:
# (Arms method, JSON name, the process whose CPU it adds, what it shows).
COMPARISONS = (
    ("relay", "bare_relay", "relay", "a bare relay where the router sits: bench.grpc_relay, a Python gRPC hop that "
                                     "forwards each call as a call and does nothing else"),
    ("session_relay", "session_relay", "session_relay",
     "the router's own hop alone: bench.grpc_relay --session, each call one request on a DecodeSession stream, "
     "none of the router's work"),
    ("router_ids", "token_ids", "router", "the router sent token ids: its hop and placement without tokenizing"),
    ("direct_again", "a_a", None, "direct against itself (A/A): the smallest difference the comparison resolves"),
)
PROMPT_KB = (1, 64)
OPEN_LOOP_LOAD = 0.6  # the open-loop diagnostic offers this fraction of the direct arm's closed-loop rate
MAX_TOKENS = 4
NUM_WORKERS, INDEX_BLOCKS, DECISION_PROMPT_TOKENS, SHARED_PREFIX_TOKENS = 1000, 100_000, 4096, 1600
TARGETS = {"added_ttft_p50_ms": 1.0, "added_ttft_p99_ms": 5.0, "decision_ms_1000_workers": 1.0}
LOCAL_PREFILL_PROFILE = """\
# bench.router_overhead: prefix_aware's decode pool, prefill always on the decode worker.
name: local_prefill
decode:
  filters: [healthy, has_capacity]
  scorers:
    - {name: prefix_overlap, weight: 2.0}
    - {name: queue_depth, weight: 1.0}
    - {name: kv_utilization, weight: 0.5}
  picker: max_score
prefill:
  filters: [healthy]
  picker: max_score
decider: never_remote
"""
_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
          "an they you were her she there been one all we their has would when if so no more out up into do any "
          "model cache block token router prefill decode worker stream latency request prompt memory").split()



def _text(num_bytes: int, seed: int) -> str:
    rng = random.Random(seed)
    words, size = [f"#{seed}:"], len(f"#{seed}:")
    while size < num_bytes:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:num_bytes]



# ---- part 1: added TTFT ------------------------------------------------------------------------

class Arms:
    """The ways to send one prompt (router as text or ids, direct, the two relays); each returns its TTFT in ms."""

    def __init__(self, router_address: str, decode_address: str, relay_address: str, session_relay_address: str):
        from services.common.server import CHANNEL_OPTIONS
        self._channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS)
                          for a in (router_address, decode_address, relay_address, session_relay_address)]
        self._router = router_pb2_grpc.RouterServiceStub(self._channels[0])
        self._decode = decode_pb2_grpc.DecodeServiceStub(self._channels[1])
        self._relayed = decode_pb2_grpc.DecodeServiceStub(self._channels[2])
        self._session_relayed = decode_pb2_grpc.DecodeServiceStub(self._channels[3])
        self._sampling = common_pb2.SamplingParams(temperature=0.0)

    async def router(self, text: str, ids: list[int]) -> float:
        return await self._router_call(ids, text)

    async def router_ids(self, text: str, ids: list[int]) -> float:
        """The same request sent as token ids: the router's hop without its tokenizing."""
        return await self._router_call(ids)

    async def direct(self, text: str, ids: list[int]) -> float:
        return await self._decode_call(self._decode, ids)

    # direct under another name: direct against itself (A/A) shows what the comparison resolves.
    direct_again = direct

    async def relay(self, text: str, ids: list[int]) -> float:
        """The direct request through bench.grpc_relay, a relay that does no work of its own."""
        return await self._decode_call(self._relayed, ids)

    async def session_relay(self, text: str, ids: list[int]) -> float:
        """The direct request through bench.grpc_relay --session: the router's hop with none of its work."""
        return await self._decode_call(self._session_relayed, ids)

    async def _router_call(self, ids: list[int], text: str | None = None) -> float:
        """Generate with the prompt as text (when given) or as ids; checks the router counted len(ids) tokens."""
        start = time.perf_counter()
        prompt = {"text": text} if text is not None else {"token_ids": common_pb2.TokenIds(ids=ids)}
        ttft, last = await _first_token_ms(start, self._router.Generate(router_pb2.GenerateRequest(
            max_tokens=MAX_TOKENS, sampling=self._sampling, ignore_eos=True, **prompt), timeout=120))
        if last.usage.prompt_tokens != len(ids):
            raise RuntimeError(f"router counted {last.usage.prompt_tokens} prompt tokens, the bench {len(ids)}")
        return ttft

    async def _decode_call(self, stub, ids: list[int]) -> float:
        start = time.perf_counter()
        request = decode_pb2.DecodeRequest(request_id=f"bench-{uuid.uuid4().hex}", prompt_token_ids=ids,
                                           max_tokens=MAX_TOKENS, sampling=self._sampling, ignore_eos=True)
        return (await _first_token_ms(start, stub.Decode(request, timeout=120)))[0]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))


async def _first_token_ms(start: float, responses) -> tuple[float | None, object]:
    """Reads a response stream to its end: (ms from start to the first message with tokens, the last message)."""
    ttft = last = None
    async for m in responses:
        if ttft is None and m.token_ids:
            ttft = (time.perf_counter() - start) * 1000
        last = m
    return ttft, last


async def _batch(call, prompts: list[tuple[str, list[int]]], rounds: int, streams: int = STREAMS) -> list[float]:
    """`streams` concurrent streams, each sending `rounds` requests back to back."""
    async def stream(i: int) -> list[float]:
        return [await call(*prompts[(i + r) % len(prompts)]) for r in range(rounds)]
    per_stream = await asyncio.gather(*(stream(i) for i in range(streams)))
    return [t for ts in per_stream for t in ts]


async def _single_stream(arms: Arms, prompts, pairs: int) -> dict:
    """Diagnostic: one request at a time, router and direct alternating (no queueing anywhere)."""
    samples = {"router": [], "direct": []}
    for pair in range(pairs):
        for arm in (("router", "direct") if pair % 2 == 0 else ("direct", "router")):
            samples[arm] += await _batch(getattr(arms, arm), prompts, 1, streams=1)
    return samples


async def _measure_size(arms: Arms, prompts, pairs: int, rounds: int, cpu: CpuMeter, front: str = "router") -> dict:
    """`front` (an Arms method other than direct) against direct, in alternating batches; samples keyed by
    arm name."""
    samples = {front: [], "direct": [], "cpu": {front: {}, "direct": {}}, "seconds": {front: 0.0, "direct": 0.0}}
    for prompt in prompts:  # one at a time: 64 uncached 64 KB prefills at once exhaust memory
        await arms.direct(*prompt)
    await _batch(getattr(arms, front), prompts, 1)  # warm-up: channels, tokenizer, detokenizer
    await _batch(arms.direct, prompts, 1)
    for pair in range(pairs):
        order = (front, "direct") if pair % 2 == 0 else ("direct", front)
        for arm in order:
            before, start = cpu.read(), time.perf_counter()
            samples[arm] += await _batch(getattr(arms, arm), prompts, rounds)
            samples["seconds"][arm] += time.perf_counter() - start
            add_cpu_seconds(samples["cpu"][arm], before, cpu.read())
    return samples


async def _open_loop(arms: Arms, prompts, rate_per_s: float, seconds: float, pairs: int, cpu: CpuMeter) -> dict:
    """Poisson arrivals at rate_per_s for `seconds` per batch, router and direct batches alternating
    (ABBA), each pair replaying the same arrival times: every request is sent at its time whether or
    not the earlier ones are done, so streams never fall into the lock-step of a closed loop."""
    samples = {"router": [], "direct": [], "cpu": {"router": {}, "direct": {}}}
    loop = asyncio.get_running_loop()
    for pair in range(pairs):
        rng = random.Random(pair)
        gaps = []
        while sum(gaps) < seconds:
            gaps.append(rng.expovariate(rate_per_s))
        for arm in ("router", "direct") if pair % 2 == 0 else ("direct", "router"):
            call, sent, due, before = getattr(arms, arm), [], loop.time(), cpu.read()
            for i, gap in enumerate(gaps):
                due += gap
                await asyncio.sleep(max(0.0, due - loop.time()))
                sent.append(asyncio.ensure_future(call(*prompts[i % len(prompts)])))
            samples[arm] += await asyncio.gather(*sent)
            add_cpu_seconds(samples["cpu"][arm], before, cpu.read())
    return samples


def _summarize_size(kb: int, num_tokens: int, samples: dict, front: str = "router") -> dict:
    row = {"prompt_kb": kb, "prompt_tokens": num_tokens, "requests_per_arm": len(samples[front])}
    for arm in (front, "direct"):
        row[f"{arm}_p50_ms"] = statistics.median(samples[arm])
        row[f"{arm}_p99_ms"] = _pct(samples[arm], 99)
        for name, seconds in samples.get("cpu", {}).get(arm, {}).items():
            row[f"{arm}_{name}_cpu_ms_per_request"] = seconds * 1000 / len(samples[arm])
        if samples.get("seconds", {}).get(arm):
            row[f"{arm}_requests_per_s"] = len(samples[arm]) / samples["seconds"][arm]
    row["added_p50_ms"] = row[f"{front}_p50_ms"] - row["direct_p50_ms"]
    row["added_p99_ms"] = row[f"{front}_p99_ms"] - row["direct_p99_ms"]
    return row


def run_added_ttft(quick: bool, progress=_progress) -> tuple[dict[str, list[dict]], dict, dict, dict, dict]:
    from engine.tokenizer import load_tokenizer
    from pdmesh.launcher import MeshSpec, start_mesh

    tokenizer = load_tokenizer()
    num_prompts = 4
    prompts = {kb: [(t, tokenizer.encode(t, add_bos=True)) for t in (_text(kb * 1024, s) for s in range(num_prompts))]
               for kb in PROMPT_KB}
    longest = max(len(ids) for ps in prompts.values() for _, ids in ps)
    max_model_len = (longest + MAX_TOKENS + 1024) // 1024 * 1024
    blocks_per_prompt = -(-max_model_len // 16)
    num_blocks = num_prompts * len(PROMPT_KB) * blocks_per_prompt + 4 * STREAMS  # all prompts cached + in flight
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="pdmesh-router-overhead-"))
    (run_dir / "local_prefill.yaml").write_text(LOCAL_PREFILL_PROFILE)
    spec = MeshSpec(num_prefill=0, num_decode=1, router_port=0, model="tiny", profile=str(run_dir / "local_prefill.yaml"),
                    kv_transports="grpc", num_blocks=num_blocks, torch_threads=1, max_model_len=max_model_len,
                    # The prompts repeat, so the router's prefix token cache would serve the 64 KB ones
                    # after their first pass: off, so the per-KB figure is the cost of novel text
                    # (bench.prompt_tokens measures the cache).
                    extra_env=(("PDMESH_MAX_NUM_SEQS", str(STREAMS)), ("PDMESH_PROMPT_CACHE_TOKENS", "0")))
    setup = {"streams": STREAMS, "max_tokens": MAX_TOKENS, "prompts_per_size": num_prompts,
             "max_model_len": max_model_len, "num_blocks": num_blocks, "max_num_seqs": STREAMS, "torch_threads": 1,
             "mesh": "1 tiny decode worker, 0 prefill workers, profile local_prefill (never_remote)"}
    progress(f"starting mesh: {setup['mesh']}, max_model_len {max_model_len}, {num_blocks} blocks ({run_dir})")
    mesh = start_mesh(spec, str(run_dir), progress=lambda m: progress(m.strip()))
    relays = {name: subprocess.Popen([sys.executable, "-m", "bench.grpc_relay", "--target",
                                      mesh.workers("decode")[0].info["address"], *flags],
                                     stdout=subprocess.PIPE, text=True)
              for name, flags in (("relay", ()), ("session_relay", ("--session",)))}
    relay_addresses = [f"127.0.0.1:{process.stdout.readline().split()[1]}" for process in relays.values()]
    pairs, rounds = (4, 2) if quick else (10, 3)
    rows, raw, open_loop, compared = {"shared": [], "pinned": []}, {}, {}, {}
    split, own_cpus = core_split(), os.sched_getaffinity(0)
    setup["layouts"] = layout_names(split)
    try:
        async def go():
            router_pid = mesh.process("router").popen.pid
            decode_pid = mesh.workers("decode")[0].popen.pid
            arms = Arms(mesh.router_address, mesh.workers("decode")[0].info["address"], *relay_addresses)
            cpu = CpuMeter({"router": router_pid, "decode": decode_pid,
                            **{name: process.pid for name, process in relays.items()}})
            try:
                for layout in setup["layouts"]:  # shared, then pinned when there are two CPUs
                    if layout == "pinned":
                        pin_router_apart(split, router_pid, decode_pid)
                        for process in relays.values():  # where the router sits
                            pin_process(process.pid, split[0])
                    for kb in PROMPT_KB:
                        n = statistics.median(len(ids) for _, ids in prompts[kb])
                        progress(f"{layout} cores, {kb} KB prompts (~{n:.0f} tokens): {pairs} router/direct batch "
                                 f"pairs of {STREAMS} streams x {rounds} requests")
                        samples = await _measure_size(arms, prompts[kb], pairs, rounds, cpu)
                        row = _summarize_size(kb, int(n), samples)
                        rows[layout].append(row)
                        if layout == "shared":  # one stream alone: the router's own latency, no queueing
                            single = _summarize_size(kb, int(n), await _single_stream(
                                arms, prompts[kb], 40 if quick else 100))
                            row["single_stream"] = {k: v for k, v in single.items() if k.endswith("_ms")}
                        raw[layout, kb] = samples
                        progress(f"  router p50 {row['router_p50_ms']:.2f} ms, direct p50 {row['direct_p50_ms']:.2f} ms, "
                                 f"added p50 {row['added_p50_ms']:+.2f} ms, added p99 {row['added_p99_ms']:+.2f} ms")
                    if layout == "pinned" or not split:  # the floor and the open loop at 1 KB, headline layout
                        for front, name, _, what in COMPARISONS:
                            progress(f"{layout} cores, 1 KB prompts: {pairs} {front}/direct batch pairs ({what})")
                            samples = await _measure_size(arms, prompts[1], pairs, rounds, cpu, front=front)
                            row = compared[name] = dict(
                                _summarize_size(1, rows[layout][0]["prompt_tokens"], samples, front), layout=layout)
                            raw[layout, front] = samples
                            progress(f"  {front} p50 {row[f'{front}_p50_ms']:.2f} ms, direct p50 "
                                     f"{row['direct_p50_ms']:.2f} ms, added p50 {row['added_p50_ms']:+.2f} ms, "
                                     f"added p99 {row['added_p99_ms']:+.2f} ms")
                        rate = OPEN_LOOP_LOAD * rows[layout][0]["direct_requests_per_s"]
                        progress(f"{layout} cores, 1 KB prompts, open loop: Poisson arrivals at {rate:.0f}/s "
                                 f"({OPEN_LOOP_LOAD:.0%} of the direct closed-loop rate), {pairs} router/direct pairs")
                        samples = await _open_loop(arms, prompts[1], rate, 5.0 if quick else 15.0, pairs, cpu)
                        row = _summarize_size(1, rows[layout][0]["prompt_tokens"], samples)
                        open_loop.update(row, rate_per_s=rate, load=OPEN_LOOP_LOAD, layout=layout)
                        progress(f"  router p50 {row['router_p50_ms']:.2f} ms, direct p50 {row['direct_p50_ms']:.2f} ms, "
                                 f"added p50 {row['added_p50_ms']:+.2f} ms, added p99 {row['added_p99_ms']:+.2f} ms")
            finally:
                pin_process(0, own_cpus)
                await arms.close()
        asyncio.run(go())
        setup["decode_worker_scheduling"] = engine_scheduling(mesh.workers("decode")[0].info["metrics_address"])
    finally:
        for process in relays.values():
            process.kill()
            process.wait()
        mesh.stop()
    return rows, raw, setup, open_loop, compared


# ---- part 2: decision cost ---------------------------------------------------------------------

def _synthetic_mesh(prompt_hashes: list[int], rng: random.Random):
    """NUM_WORKERS workers (half decode, half prefill) with INDEX_BLOCKS blocks in all. Every 10th
    worker holds a leading slice of the prompt (up to 100 blocks); the rest of each worker's
    blocks are hashes no prompt has. Loads are random."""
    from services.router.placement.base import LoadView, WorkerView
    from services.router.prefix_index import PrefixIndex

    index, views = PrefixIndex(), []
    per_worker = INDEX_BLOCKS // NUM_WORKERS
    for i in range(NUM_WORKERS):
        role = "decode" if i % 2 == 0 else "prefill"
        worker_id = f"{role}-{i}"
        shared = prompt_hashes[:rng.randint(1, per_worker)] if i % 10 == 0 else []
        index.stored(worker_id, shared + [rng.getrandbits(64) for _ in range(per_worker - len(shared))])
        total = 4096
        views.append(WorkerView(worker_id, f"10.0.{i // 250}.{i % 250}:50051", role, True,
                                LoadView(rng.randint(0, 8), rng.randint(0, 16), rng.randint(0, total // 2), total,
                                         rng.randint(0, 8192))))
    return index, views


def run_decision(quick: bool, progress=_progress) -> dict:
    from engine.hashing import block_hashes
    from services.router.placement.base import PlacementRequest
    from services.router.placement.runner import load_profile
    from services.router.placement.table import WorkerTable

    rng = random.Random(0)
    reps, warmup = (200 if quick else 1000), 20
    shared = [rng.randrange(3, 262_144) for _ in range(SHARED_PREFIX_TOKENS)]
    # place() records the blocks it expects the chosen workers to store, so each repetition gets
    # its own prompt: the shared prefix some workers hold, then a tail nobody has seen.
    prompts = [shared + [rng.randrange(3, 262_144) for _ in range(DECISION_PROMPT_TOKENS - len(shared))]
               for _ in range(2 * (reps + warmup))]
    index, views = _synthetic_mesh(block_hashes(shared, 16), rng)
    table = WorkerTable.of(views)
    profile = load_profile("prefix_aware")
    progress(f"decision: profile prefix_aware, {NUM_WORKERS} workers (500 decode, 500 prefill), "
             f"{sum(index.num_blocks(v.worker_id) for v in views):,} indexed blocks, {DECISION_PROMPT_TOKENS}-token prompts")
    timings = {"place_incl_hashing": [], "hashing": [], "place_hashes_precomputed": []}
    plugin_ms: dict[str, list[float]] = {}
    placement = None
    for rep in range(reps + warmup):
        request = PlacementRequest(f"r{rep}", prompts[2 * rep], "interactive")
        start = time.perf_counter()
        placement = profile.place(request, table, index)
        full = (time.perf_counter() - start) * 1000
        request = PlacementRequest(f"h{rep}", prompts[2 * rep + 1], "interactive")
        start = time.perf_counter()
        request.block_hashes  # noqa: B018 - the cached property computes the hashes
        hashing = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        profile.place(request, table, index)
        precomputed = (time.perf_counter() - start) * 1000
        if rep < warmup:
            continue
        for key, value in zip(timings, (full, hashing, precomputed)):
            timings[key].append(value)
        for pool, choice in (("decode", placement.decode), ("prefill", placement.prefill)):
            for name, ms in (choice.plugin_ms if choice else {}).items():
                plugin_ms.setdefault(f"{pool}.{name}", []).append(ms)
    out = {f"{k}_p50_ms": statistics.median(v) for k, v in timings.items()}
    out.update({f"{k}_p99_ms": _pct(v, 99) for k, v in timings.items()})
    out["plugin_p50_ms"] = {k: statistics.median(v) for k, v in plugin_ms.items()}
    out["decision"] = placement.decision.reason
    out["chosen"] = {"decode": placement.decode.worker.worker_id,
                     "prefill": placement.prefill.worker.worker_id if placement.prefill else ""}
    out["repetitions"] = reps
    out["workers"] = {"decode": NUM_WORKERS // 2, "prefill": NUM_WORKERS // 2}
    out["index_blocks"] = INDEX_BLOCKS
    progress(f"  place p50 {out['place_incl_hashing_p50_ms']:.3f} ms (hashing {out['hashing_p50_ms']:.3f} ms, "
             f"rest {out['place_hashes_precomputed_p50_ms']:.3f} ms); {out['decision']}")
    return out


# ---- report ------------------------------------------------------------------------------------

def _print_table(rows: dict[str, list[dict]], decision: dict, per_kb: float, open_loop: dict,
                 compared: dict[str, dict]) -> None:
    print()
    print(f"{'cores':>7} {'prompt':>7} {'tokens':>7} {'n/arm':>6} | {'router p50':>10} {'direct p50':>10} "
          f"{'added p50':>9} | {'router p99':>10} {'direct p99':>10} {'added p99':>9}")
    for layout, layout_rows in rows.items():
        for r in layout_rows:
            print(f"{layout:>7} {r['prompt_kb']:>5}KB {r['prompt_tokens']:>7} {r['requests_per_arm']:>6} | "
                  f"{r['router_p50_ms']:>10.2f} {r['direct_p50_ms']:>10.2f} {r['added_p50_ms']:>+9.2f} | "
                  f"{r['router_p99_ms']:>10.2f} {r['direct_p99_ms']:>10.2f} {r['added_p99_ms']:>+9.2f}")
    for layout, layout_rows in rows.items():
        for r in layout_rows:
            print(f"{layout:>7} {r['prompt_kb']:>5}KB, CPU ms per request ({STREAMS} streams): decode worker "
                  f"{r['router_decode_cpu_ms_per_request']:.2f} via router vs {r['direct_decode_cpu_ms_per_request']:.2f} "
                  f"direct; router process {r['router_router_cpu_ms_per_request']:.2f}; load generator "
                  f"{r['router_client_cpu_ms_per_request']:.2f} via router vs {r['direct_client_cpu_ms_per_request']:.2f}")
    for r in rows["shared"]:
        one = r["single_stream"]
        print(f"{r['prompt_kb']:>5}KB, 1 stream alone (diagnostic): router p50 {one['router_p50_ms']:.2f} ms, direct p50 "
              f"{one['direct_p50_ms']:.2f} ms, added p50 {one['added_p50_ms']:+.2f} ms, added p99 {one['added_p99_ms']:+.2f} ms")
    if rows["shared"]:
        print(f"added per KB of prompt (slope of the one-stream added p50, 1 -> 64 KB): {per_kb:+.3f} ms/KB")
    for front, name, process, what in COMPARISONS:
        r = compared.get(name)
        if not r:
            continue
        cpu = f"; {process} CPU {r[f'{front}_{process}_cpu_ms_per_request']:.2f} ms per request" if process else ""
        print(f"    1KB, {what} ({r['layout']} cores, {STREAMS} streams, {r['requests_per_arm']} per arm): {front} p50 "
              f"{r[f'{front}_p50_ms']:.2f} ms, direct p50 {r['direct_p50_ms']:.2f} ms, added p50 "
              f"{r['added_p50_ms']:+.2f} ms, added p99 {r['added_p99_ms']:+.2f} ms{cpu}")
    if open_loop:
        o = open_loop
        print(f"    1KB, open loop ({o['layout']} cores, Poisson {o['rate_per_s']:.0f}/s = {o['load']:.0%} of the direct "
              f"closed-loop rate, {o['requests_per_arm']} per arm): router p50 {o['router_p50_ms']:.2f} ms, direct p50 "
              f"{o['direct_p50_ms']:.2f} ms, added p50 {o['added_p50_ms']:+.2f} ms, added p99 {o['added_p99_ms']:+.2f} ms; "
              f"CPU ms per request: decode worker {o['router_decode_cpu_ms_per_request']:.2f} via router vs "
              f"{o['direct_decode_cpu_ms_per_request']:.2f} direct, router {o['router_router_cpu_ms_per_request']:.2f}")
    print()
    print(f"placement decision, {NUM_WORKERS} workers, {INDEX_BLOCKS:,} indexed blocks, {DECISION_PROMPT_TOKENS} tokens:")
    print(f"  {'incl. block hashing':<28} p50 {decision['place_incl_hashing_p50_ms']:.3f} ms  "
          f"p99 {decision['place_incl_hashing_p99_ms']:.3f} ms")
    print(f"  {'block hashing alone':<28} p50 {decision['hashing_p50_ms']:.3f} ms  p99 {decision['hashing_p99_ms']:.3f} ms")
    print(f"  {'hashes precomputed':<28} p50 {decision['place_hashes_precomputed_p50_ms']:.3f} ms  "
          f"p99 {decision['place_hashes_precomputed_p99_ms']:.3f} ms")
    for name, ms in decision["plugin_p50_ms"].items():
        print(f"    {name:<34} {ms:.3f} ms")


_PLOTTED = [front for front, *_ in COMPARISONS if front != "direct_again"]  # A/A would only draw direct twice


def _plot(path: pathlib.Path, raw: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PROMPT_KB), figsize=(5 * len(PROMPT_KB), 3.8))
    for ax, kb in zip(axes, PROMPT_KB):
        for (layout, size), samples in raw.items():
            if size in _PLOTTED and kb == 1:
                plot_cdf(ax, samples[size], ":", f"{size}, {layout} cores")
            if size != kb:
                continue
            for arm, style in (("direct", "-"), ("router", "--")):
                plot_cdf(ax, samples[arm], style, f"{arm}, {layout} cores")
        ax.set_title(f"{kb} KB prompt, {STREAMS} streams")
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.router_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer batches and repetitions (~2 minutes)")
    p.add_argument("--json", default=None, help="write results here (and a TTFT CDF PNG beside it)")
    p.add_argument("--plot", default=None, help="PNG path (default: router_overhead.png beside --json)")
    p.add_argument("--skip-mesh", action="store_true", help="only the decision cost (no processes)")
    args = p.parse_args(argv)
    _progress(f"load average {os.getloadavg()[0]:.2f} at start")
    decision = run_decision(args.quick)
    rows, raw, setup, open_loop, compared = ({"shared": [], "pinned": []}, {}, {}, {}, {}) if args.skip_mesh else \
        run_added_ttft(args.quick)
    shared = {r["prompt_kb"]: r for r in rows["shared"]}
    # The headline: the pinned layout (the router off the worker's core); shared cores without a second CPU.
    headline = {r["prompt_kb"]: r for r in rows["pinned"]} or shared
    # Per KB from one stream alone: the router's own cost of a longer prompt. (The 64-stream slope
    # mixes in how the decode worker batches the arrivals, and can even come out negative.)
    per_kb = ((shared[64]["single_stream"]["added_p50_ms"] - shared[1]["single_stream"]["added_p50_ms"]) / 63
              if shared else float("nan"))
    result = {
        "added_ttft_p50_ms": headline[1]["added_p50_ms"] if headline else None,
        "added_ttft_p99_ms": headline[1]["added_p99_ms"] if headline else None,
        "added_ms_per_kb": per_kb if shared else None,
        "added_ms_per_kb_64_streams": ((headline[64]["added_p50_ms"] - headline[1]["added_p50_ms"]) / 63
                                       if headline else None),
        "headline_layout": "pinned" if rows["pinned"] else "shared",
        "added_ttft_p50_ms_shared_cores": shared[1]["added_p50_ms"] if shared else None,
        "added_ttft_p99_ms_shared_cores": shared[1]["added_p99_ms"] if shared else None,
        **{f"added_ttft_{p}_ms_{name}": compared.get(name, {}).get(f"added_{p}_ms")
           for _, name, _, _ in COMPARISONS for p in ("p50", "p99")},
        "added_ttft_p50_ms_open_loop": open_loop.get("added_p50_ms"),
        "added_ttft_p99_ms_open_loop": open_loop.get("added_p99_ms"),
        "decision_ms_1000_workers": decision["place_incl_hashing_p50_ms"],
        "headline_note": ("added_ttft_* are at 1 KB prompts, 64 streams, in the headline layout (pinned: the router "
                          "alone on its core, decode worker and load generator on the other); *_shared_cores: the "
                          "same with nothing pinned (the figure first reported); "
                          + "; ".join(f"*_{name}: {what}, 64 streams, 1 KB, headline layout"
                                      for _, name, _, what in COMPARISONS)
                          + "; *_open_loop: Poisson arrivals at 60% of the direct closed-loop rate, headline "
                          "layout, 1 KB; added_ms_per_kb: one stream alone"),
        "sizes": rows["pinned"] or rows["shared"], "sizes_shared_cores": rows["shared"], "open_loop": open_loop,
        **compared,
        "setup": setup,
        "decision": decision, "targets": TARGETS, "load_average_end": os.getloadavg()[0], "quick": args.quick,
    }
    _print_table(rows, decision, per_kb, open_loop, compared)
    if "decode_worker_scheduling" in setup:
        s = setup["decode_worker_scheduling"]
        print(f"decode worker, whole run: {s['prompt_only_steps']:.0f} of {s['steps']:.0f} steps prompts first "
              f"(by cost); {step_cost_text(s)}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        write_results(args.json, result, "router_overhead.png", (lambda png: _plot(png, raw)) if raw else None,
                      args.plot)


if __name__ == "__main__":
    main()
