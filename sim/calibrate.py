"""Measures our engine on this machine and writes a cost profile for the simulator.

    python -m sim.calibrate --out sim/profiles/cpu-local.yaml [--quick] [--threads 1]
    python -m sim.calibrate --serving-only      # just the serving overhead and KV pulls (~2 min)
    python -m sim.calibrate --contention-only   # just the host slowdown (~2 min)

What it times, on the real Gemma-3-270M through LLMEngine (the engine the workers run), with the
workers' thread count (the mesh benchmarks run one torch thread per worker):
  - prefill: wall time of a prompt of u new tokens after c tokens already in the prefix cache
    (max_tokens=1, so the time covers exactly the prefill and its first token);
  - decode: the median step time of B sequences of c context tokens each, once all of them decode;
  - serving overhead and KV transfer (sim/serving.py): probes through a live 1 prefill + 1 decode
    mesh against the bare engine, and the KV pulls those probes made (latency + bandwidth fit);
    bytes per token from the model shape.
Then fits the affine models of sim/costs.py by least squares (a coefficient that would come out
negative is dropped and the rest refitted) and writes the YAML with the raw points and the fit.
Run it on a quiet machine: other processes on the cores inflate every number.
"""

import argparse
import os
import random
import statistics
import sys
import time

import numpy as np
import yaml

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from sim.serving import random_tokens

BLOCK_SIZE = 16
FULL = {"prefill": [(u, c) for c in (0, 512, 1024) for u in (32, 128, 512, 1024, 2048)],
        "decode": [(b, c) for b in (1, 4, 8, 16) for c in (128, 512, 1024)], "repeats": 2}
QUICK = {"prefill": [(u, c) for c in (0, 1024) for u in (64, 512, 1536)],
         "decode": [(b, c) for b in (1, 8, 16) for c in (128, 1024)], "repeats": 1}
SOURCES = {
    "prefill_*, decode_*": "least-squares fit to the points under measured (sim/calibrate.py)",
    "transfer_latency_s, transfer_bytes_per_s": "least-squares fit of the KV pulls the router timed for the "
                                                "serving probes (measured.serving.mesh; sim/serving.py)",
    "prefill_overhead, decode_overhead": "probes through a live 1 prefill + 1 decode mesh vs the bare engine, "
                                         "timed back to back (measured.serving; sim/serving.py)",
    "kv_bytes_per_token": "engine/config.py ModelConfig.kv_bytes_per_token (float32 KV)",
    "kv_capacity_tokens": "a worker's default --num-blocks 1024 x 16 tokens (override per run)",
    "max_batch": "the workers' default max_num_seqs",
    "prefill_chunk_tokens": "engine SchedulerConfig.max_num_batched_tokens default",
    "attention": "engine/model.py pads every sequence of a step to the longest query and context "
                 "(one batched SDPA)",
    "rpc_s": "assumption: a loopback gRPC hop through the router (README: +2.4 ms for one stream)",
    "host_cores": "os.cpu_count() here: the mesh's workers all run on this host",
    "host_slowdown": "measured under contention: n engine processes (1 torch thread each) prefilling or "
                     "decoding at once; the mean of the prefill and decode slowdowns for each n",
}
RPC_S = 0.003
CONTENTION_WORKERS = 4  # as many worker processes as the validation mesh runs on this host


def progress(message: str) -> None:
    print(f"[sim.calibrate {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, num_blocks: int = 2048):
        # torch is imported only where timing needs it (fit() is tested without it)
        from engine.llm_engine import LLMEngine
        from engine.sampling import SamplingParams
        from engine.weights import load_model
        config = EngineConfig(ModelConfig(), CacheConfig(BLOCK_SIZE, num_blocks),
                              SchedulerConfig(max_num_seqs=16, max_model_len=8192))
        self.engine = LLMEngine(config, load_model(config.model))
        self.max_num_seqs = config.scheduler.max_num_seqs
        self._greedy = SamplingParams(temperature=0.0)
        self._rng = random.Random(0)
        self._ids = 0

    def warm_up(self) -> None:
        """First calls into torch are slow: one prefill and two decode steps, untimed."""
        self.prefill_s(64, 0)
        self.decode_step_s(2, 64, steps=2)

    def _prompt(self, n: int) -> list[int]:
        return random_tokens(self._rng, n)

    def _run(self, prompts: list[list[int]], max_tokens: int) -> list[float]:
        """Runs the prompts together; returns the wall time of every step."""
        for p in prompts:
            self._ids += 1
            self.engine.add_request(f"c{self._ids}", p, self._greedy, max_tokens, ignore_eos=True)
        steps = []
        while self.engine.has_unfinished():
            start = time.perf_counter()
            self.engine.step()
            steps.append(time.perf_counter() - start)
        return steps

    def prefill_s(self, uncached: int, cached: int) -> float:
        prefix = self._prompt(cached)
        if cached:
            self._run([prefix + self._prompt(BLOCK_SIZE)], 1)  # puts the prefix in the cache
        return sum(self._run([prefix + self._prompt(uncached)], 1))

    def add_decoding(self, batch: int, context: int, max_tokens: int = 1000) -> None:
        """Starts `batch` sequences of `context` prompt tokens; one step prefills them all (batch x
        context within the step's token budget), so every later step is a decode step."""
        self._decoding = []
        for _ in range(batch):
            self._ids += 1
            self._decoding.append(f"c{self._ids}")
            self.engine.add_request(self._decoding[-1], self._prompt(context), self._greedy, max_tokens,
                                    ignore_eos=True)
        self.engine.step()

    def step_s(self) -> float:
        return _timed(self.engine.step)

    def abort_all(self) -> None:
        for request_id in getattr(self, "_decoding", []):
            self.engine.abort(request_id)
        self._decoding = []
        while self.engine.has_unfinished():
            self.engine.step()

    def decode_step_s(self, batch: int, context: int, steps: int = 8) -> float:
        timings = self._run([self._prompt(context) for _ in range(batch)], steps + 1)
        return statistics.median(timings[-steps:])  # the last steps are pure decode


def fit(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares on relative error (every point counts alike, short prompts as much as long
    ones), coefficients kept non-negative (drop the most negative one and refit)."""
    y = np.array(y, dtype=float)
    x = np.array(rows, dtype=float) / y[:, None]
    ones = np.ones_like(y)
    keep = list(range(x.shape[1]))
    while True:
        coef = np.linalg.lstsq(x[:, keep], ones, rcond=None)[0]
        if (coef >= 0).all() or len(keep) == 1:
            out = [0.0] * x.shape[1]
            for i, c in zip(keep, coef):
                out[i] = max(0.0, float(c))
            return out
        keep.pop(int(np.argmin(coef)))


def fit_coefficients(prefill: list[dict], decode: list[dict]) -> dict:
    p = fit([[1, r["uncached"], r["uncached"] * r["cached"], r["uncached"] ** 2] for r in prefill],
            [r["seconds"] for r in prefill])
    d = fit([[1, r["batch"], r["batch"] * r["context_per_seq"]] for r in decode], [r["seconds"] for r in decode])
    return {"prefill_base_s": p[0], "prefill_per_token_s": p[1], "prefill_per_token_ctx_s": p[2],
            "prefill_per_token_sq_s": p[3],
            "decode_base_s": d[0], "decode_per_seq_s": d[1], "decode_per_ctx_token_s": d[2]}


def copy_bytes_per_s(tokens: int = 2048, repeats: int = 5) -> float:
    import torch
    nbytes = tokens * ModelConfig().kv_bytes_per_token
    src, dst = torch.rand(nbytes // 4), torch.empty(nbytes // 4)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def calibrate(grid: dict, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    progress(f"loading the model ({threads} torch thread(s), load average {os.getloadavg()[0]:.1f})")
    bench = Bench()
    bench.warm_up()
    prefill, decode = [], []
    for u, c in grid["prefill"]:
        s = min(bench.prefill_s(u, c) for _ in range(grid["repeats"]))
        prefill.append({"uncached": u, "cached": c, "seconds": round(s, 5)})
        progress(f"prefill u={u} c={c}: {s * 1000:.1f} ms")
    for b, c in grid["decode"]:
        s = min(bench.decode_step_s(b, c) for _ in range(grid["repeats"]))
        decode.append({"batch": b, "context_per_seq": c, "seconds": round(s, 5)})
        progress(f"decode B={b} context={c}: {s * 1000:.1f} ms/step")
    max_batch = bench.max_num_seqs
    del bench  # its memory, before four more engines load
    shared = contention(CONTENTION_WORKERS, threads)
    return profile_of(prefill, decode, serving_measure(threads), shared, threads, max_batch)


def serving_measure(threads: int) -> dict:
    from sim.serving import measure
    return measure(threads, RPC_S, ModelConfig().kv_bytes_per_token, progress)


def serving_coefficients(serving: dict) -> dict:
    """The profile's coefficients that the serving measurement gives (no transfer fit: keep the old)."""
    return {"prefill_overhead": serving["prefill_overhead"], "decode_overhead": serving["decode_overhead"],
            **(serving["transfer"] or {})}


def profile_of(prefill: list[dict], decode: list[dict], serving: dict, shared: dict, threads: int,
               max_batch: int) -> dict:
    """The profile YAML's content: the measured points, the fit, and where each number comes from."""
    model = ModelConfig()
    return {
        "name": "cpu-local",
        "measured": {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch_threads": threads,
                     "cpu_count": os.cpu_count(), "load_average_at_end": round(os.getloadavg()[0], 2),
                     "model": model.name, "prefill": prefill, "decode": decode,
                     "contention": shared, "serving": serving},
        "coefficients": {
            **fit_coefficients(prefill, decode),
            # a plain copy's bandwidth is only an upper bound: used when no pull fit came out
            "transfer_latency_s": 0.003, "transfer_bytes_per_s": copy_bytes_per_s(),
            **serving_coefficients(serving),
            "kv_bytes_per_token": model.kv_bytes_per_token,
            "kv_capacity_tokens": 1024 * BLOCK_SIZE, "max_batch": max_batch, "rpc_s": RPC_S,
            "prefill_chunk_tokens": SchedulerConfig().max_num_batched_tokens, "attention": "padded",
            "host_cores": os.cpu_count(), "host_slowdown": host_slowdown(shared),
        },
        "sources": SOURCES if serving["transfer"] else SOURCES | {
            "transfer_latency_s, transfer_bytes_per_s": "no pull fit came out of the serving probes: an assumed "
                                                        "3 ms, and a plain copy's bandwidth (an upper bound)"},
    }


CONTENTION_WORK = {"prefill": 384, "decode": 4}  # a 384-token prompt; a decode step of 4 sequences


def _contender(conn, threads: int) -> None:
    """A worker-like process: one engine, one torch thread; repeats the work it is told to from a
    shared start time and reports how long each operation that ended inside the window took."""
    import torch
    torch.set_num_threads(threads)
    bench = Bench(num_blocks=256)
    bench.warm_up()
    conn.send("ready")
    for kind, start, seconds in iter(conn.recv, None):
        if kind == "decode":  # a batch already decoding: every timed operation is one decode step
            bench.add_decoding(CONTENTION_WORK["decode"], 256)
        op = (lambda: bench.prefill_s(CONTENTION_WORK["prefill"], 0)) if kind == "prefill" else bench.step_s
        time.sleep(max(0.0, start - time.time()))
        times, end = [], start + seconds
        while time.time() < end:
            took = op()
            if time.time() <= end:  # every other process was computing all along
                times.append(took)
        bench.abort_all()
        conn.send(times)


def contention(max_workers: int, threads: int, seconds: float = 12.0) -> dict:
    """How much slower each of n worker processes computes while n compute at once (n = 1 ..
    max_workers), for prefill and for decode work: the mean time of the operations that ended
    while all n were computing, over the same with one process alone. Processes that are not in
    the round sit idle (blocked on their pipe), as an idle mesh worker does."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(max_workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_contender, args=(child, threads), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        for pipe in pipes:
            pipe.recv()
        out = {}
        for kind in CONTENTION_WORK:
            means = []
            for n in range(1, max_workers + 1):
                start = time.time() + 1.0
                for pipe in pipes[:n]:
                    pipe.send((kind, start, seconds))
                times = [t for pipe in pipes[:n] for t in pipe.recv()]
                means.append(statistics.mean(times))
                progress(f"contention {kind}: {n} process(es) at once, {means[-1] * 1000:.0f} ms per operation "
                         f"({len(times)} operations)")
            out[kind] = [round(m / means[0], 3) for m in means]
        return out
    finally:
        for pipe in pipes:
            pipe.send(None)
        for proc in procs:
            proc.join(timeout=10)


def host_slowdown(shared: dict) -> list[float]:
    """One slowdown per number of computing workers: the mean over the kinds of work measured."""
    return [round(statistics.mean(col), 3) for col in zip(*shared.values())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="measure the engine here and write a simulator cost profile")
    parser.add_argument("--out", default="sim/profiles/cpu-local.yaml")
    parser.add_argument("--quick", action="store_true", help="fewer points (~2 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as each mesh worker uses")
    parser.add_argument("--refit", help="refit the points measured in this profile YAML (no measuring)")
    parser.add_argument("--contention-only", action="store_true",
                        help="measure only the host slowdown and write it into the --out profile")
    parser.add_argument("--serving-only", action="store_true",
                        help="measure only the serving overhead and KV pulls (~2 min) into the --out profile")
    args = parser.parse_args(argv)
    if args.serving_only:
        with open(args.out) as f:
            profile = yaml.safe_load(f)
        profile["measured"]["serving"] = serving = serving_measure(args.threads)
        profile["coefficients"] |= serving_coefficients(serving)
        profile["sources"] |= {k: v for k, v in SOURCES.items() if "overhead" in k or
                               ("transfer" in k and serving["transfer"])}
        if serving["transfer"]:  # the pull fit replaces the hand-fitted transfer numbers and their notes
            for key in ("transfer_latency_s", "transfer_bytes_per_s"):
                profile["sources"].pop(key, None)
    elif args.contention_only:
        with open(args.out) as f:
            profile = yaml.safe_load(f)
        profile["measured"]["contention"] = shared = contention(CONTENTION_WORKERS, args.threads)
        profile["coefficients"] |= {"host_cores": os.cpu_count(), "host_slowdown": host_slowdown(shared)}
        profile["sources"] |= {k: SOURCES[k] for k in ("host_cores", "host_slowdown")}
    elif args.refit:
        with open(args.refit) as f:
            profile = yaml.safe_load(f)
        profile["coefficients"] |= fit_coefficients(profile["measured"]["prefill"], profile["measured"]["decode"])
    else:
        profile = calibrate(QUICK if args.quick else FULL, args.threads)
    header = ("# Calibrated on this machine by `python -m sim.calibrate`; re-run it on a quiet machine.\n"
              "# coefficients: the fit (sim/costs.py); measured: the raw points it was fitted to.\n")
    with open(args.out, "w") as f:
        f.write(header + yaml.safe_dump(profile, sort_keys=False))
    progress(f"wrote {args.out}: {profile['coefficients']}")


if __name__ == "__main__":
    main()
