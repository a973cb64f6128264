"""Failover: decode workers SIGKILLed mid-stream, outputs compared token by token with the
uninterrupted greedy run.

    python -m bench.failover [--quick] [--trials N] [--json PATH]

Mesh: the tiny random-weight model (real processes: 1 prefill + 2 decode workers and the router,
round_robin, KV over gRPC). Each trial starts STREAMS concurrent greedy streams of MAX_TOKENS
tokens (distinct prompts, ignore_eos), waits until the first stream has delivered a random number
of tokens, then SIGKILLs a random decode worker that is running sequences. The router resumes the
affected streams on the surviving worker. When every stream has ended, the killed worker is
restarted on its port (same id) and the router reconnects before the next trial.

Per stream: tokens_lost = expected tokens not delivered, tokens_duplicated = tokens delivered
beyond the expected, wrong_outputs = streams whose tokens differ from the uninterrupted run (or
that failed). Also the longest gap between two messages of each stream (the failover stall).
Keys: `trials`, `streams`, `streams_failed_over`, `tokens_lost`, `tokens_duplicated`,
`wrong_outputs`, `stall_p50_ms`, `stall_max_ms`. Writes failover.png beside the JSON.
"""

import argparse
import pathlib
import random
import threading
import time

import grpc

from bench.common import metric_sum, percentile, scrape, write_results
from bench.common import progress as _progress
from pdmesh.launcher import MeshSpec, restart, start_mesh
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

STREAMS = 4
MAX_TOKENS = 200



def prompt_of(i: int) -> list[int]:
    return [2] + list(range(6000 + 97 * i, 6000 + 97 * i + 40))


def request_of(prompt: list[int]) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=prompt), max_tokens=MAX_TOKENS,
                                      ignore_eos=True)


def metric(process, name: str) -> float:
    return metric_sum(scrape(process.info["metrics_address"]), name)


class Stream(threading.Thread):
    """One streaming request; records tokens, message times and the error, if any."""

    def __init__(self, stub, prompt: list[int]):
        super().__init__(daemon=True)
        self.stub, self.prompt = stub, prompt
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.error = ""
        self.decode_worker = ""

    def run(self) -> None:
        try:
            for message in self.stub.Generate(request_of(self.prompt), timeout=180):
                self.tokens.extend(message.token_ids)
                self.times.append(time.monotonic())
                if message.finish_reason:
                    self.decode_worker = message.placement.decode_worker_id
        except grpc.RpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"

    def stall_ms(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return max(gaps, default=0.0) * 1000


def busy_decode_workers(mesh) -> list:
    alive = [p for p in mesh.workers("decode") if p.popen.poll() is None]
    return [p for p in alive if metric(p, "pdmesh_running_sequences") > 0]


def run_trial(mesh, stub, trial: int, expected: dict, rng: random.Random) -> dict:
    prompts = [prompt_of(trial * STREAMS + i) for i in range(STREAMS)]
    streams = [Stream(stub, p) for p in prompts]
    for s in streams:
        s.start()
    kill_at = rng.randrange(5, MAX_TOKENS - 20)
    while len(streams[0].tokens) < kill_at and streams[0].is_alive():
        time.sleep(0.005)
    candidates = busy_decode_workers(mesh)
    victim = rng.choice(candidates) if candidates else None
    delivered_at_kill = [len(s.tokens) for s in streams]
    if victim is not None:
        victim.popen.kill()  # SIGKILL: no drain
        victim.popen.wait()
    for s in streams:
        s.join(180)
    rows = []
    for s, at_kill in zip(streams, delivered_at_kill):
        want = expected[tuple(s.prompt)]
        rows.append({"lost": max(0, len(want) - len(s.tokens)), "duplicated": max(0, len(s.tokens) - len(want)),
                     "wrong": s.tokens != want or bool(s.error), "error": s.error, "stall_ms": s.stall_ms(),
                     "finished_on": s.decode_worker, "delivered_at_kill": at_kill})
    if victim is not None:
        restart(mesh, victim)
        wait_until_placed_on(stub, victim.name)
    return {"trial": trial, "victim": victim.name if victim else "", "kill_at_tokens": kill_at, "streams": rows}


def wait_until_placed_on(stub, worker_id: str, timeout_s: float = 60.0) -> None:
    """Short probe requests until one runs on worker_id: the router sees the restarted worker."""
    deadline = time.monotonic() + timeout_s
    probe = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[2, 5, 6]), max_tokens=1)
    while time.monotonic() < deadline:
        last = list(stub.Generate(probe, timeout=30))[-1]
        if last.placement.decode_worker_id == worker_id:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the router did not place anything on the restarted {worker_id} within {timeout_s:.0f}s")


def reference_outputs(stub, trials: int) -> dict:
    """The uninterrupted greedy output of every prompt the trials use."""
    out = {}
    for i in range(trials * STREAMS):
        prompt = prompt_of(i)
        out[tuple(prompt)] = [t for m in stub.Generate(request_of(prompt), timeout=120) for t in m.token_ids]
    return out


def summarize(trials: list[dict], failovers: float) -> dict:
    rows = [r for t in trials for r in t["streams"]]
    stalls = [r["stall_ms"] for r in rows]
    return {"model": "tiny (random weights, Gemma-3 architecture)", "trials": len(trials), "streams": len(rows),
            "kills": sum(1 for t in trials if t["victim"]), "streams_failed_over": int(failovers),
            "tokens_lost": sum(r["lost"] for r in rows), "tokens_duplicated": sum(r["duplicated"] for r in rows),
            "wrong_outputs": sum(1 for r in rows if r["wrong"]),
            "errors": [r["error"] for r in rows if r["error"]][:5],
            "stall_p50_ms": round(percentile(stalls, 50), 1) if stalls else 0.0,
            "stall_max_ms": round(max(stalls), 1) if stalls else 0.0, "per_trial": trials}


def print_table(result: dict) -> None:
    print(f"  {'trial':>5} {'killed':>9} {'at token':>8} {'lost':>5} {'dup':>4} {'wrong':>5} {'max stall ms':>12}")
    for t in result["per_trial"]:
        s = t["streams"]
        print(f"  {t['trial']:>5} {t['victim'] or '-':>9} {t['kill_at_tokens']:>8} {sum(r['lost'] for r in s):>5} "
              f"{sum(r['duplicated'] for r in s):>4} {sum(r['wrong'] for r in s):>5} "
              f"{max(r['stall_ms'] for r in s):>12.0f}")
    print(f"  trials {result['trials']}, streams {result['streams']}, streams failed over "
          f"{result['streams_failed_over']}: tokens_lost {result['tokens_lost']}, tokens_duplicated "
          f"{result['tokens_duplicated']}, wrong_outputs {result['wrong_outputs']}; stall p50 "
          f"{result['stall_p50_ms']} ms, max {result['stall_max_ms']} ms")


def plot(path: pathlib.Path, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for t in result["per_trial"] for r in t["streams"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for wrong, color, label in ((False, "tab:blue", "output identical"), (True, "tab:red", "output differs")):
        pick = [r for r in rows if r["wrong"] == wrong]
        ax.scatter([r["delivered_at_kill"] for r in pick], [r["stall_ms"] for r in pick], color=color,
                   label=f"{label} ({len(pick)})")
    ax.set_xlabel("tokens the stream had delivered when a decode worker was SIGKILLed")
    ax.set_ylabel("longest gap between messages (ms)")
    ax.set_title(f"failover: {result['trials']} kills, {result['streams']} streams, tokens lost "
                 f"{result['tokens_lost']}, duplicated {result['tokens_duplicated']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.failover", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6 trials (about 2 minutes)")
    p.add_argument("--trials", type=int, default=None, help="default 20 (quick: 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results here (and failover.png beside it)")
    args = p.parse_args(argv)
    trials = args.trials or (6 if args.quick else 20)
    rng = random.Random(args.seed)
    spec = MeshSpec(num_prefill=1, num_decode=2, router_port=0, http_port=None, model="tiny", profile="round_robin",
                    kv_transports="grpc", num_blocks=256, torch_threads=1, max_model_len=512)
    _progress("starting a tiny-model mesh (1 prefill + 2 decode + router)")
    mesh = start_mesh(spec, progress=lambda *_: None)
    channel = grpc.insecure_channel(mesh.router_address)
    stub = router_pb2_grpc.RouterServiceStub(channel)
    try:
        _progress(f"reference outputs of {trials * STREAMS} prompts (uninterrupted)")
        expected = reference_outputs(stub, trials)
        results = []
        for trial in range(trials):
            results.append(run_trial(mesh, stub, trial, expected, rng))
            s = results[-1]["streams"]
            _progress(f"trial {trial + 1}/{trials}: killed {results[-1]['victim'] or 'nothing'} at token "
                      f"{results[-1]['kill_at_tokens']}; wrong outputs {sum(r['wrong'] for r in s)}")
        router = mesh.process("router")
        failovers = metric(router, 'pdmesh_failovers_total{phase="decode"}')
    finally:
        channel.close()
        mesh.stop()
    result = summarize(results, failovers)
    print_table(result)
    if args.json:
        write_results(args.json, result, "failover.png", lambda png: plot(png, result))


if __name__ == "__main__":
    main()
