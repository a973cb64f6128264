"""KV handoff throughput between two processes: NIXL (default UCX transports), NIXL with both
descriptor modes, NIXL forced onto TCP, the gRPC fallback, and an in-process memcpy baseline.

    python -m bench.kv_transfer [--quick] [--json PATH] [--plot PATH]

--json out/kv.json also draws out/kv_transfer.png (throughput vs KV size), unless --plot names another path.

Each transport runs in its own puller process with its own holder process (UCX reads UCX_TLS at
agent creation, so the TCP mode needs fresh processes on both sides). The parent drives every
worker in turn, one handoff at a time, rotating the order each repetition so drift on a shared
machine hits all transports alike. A handoff is what a decode worker sees: the holder lends
(checksums) -> pull (handshake cached; bytes + checksum verify) -> release. Throughput counts
only the byte movement (pull minus verify); handoff_ms counts everything.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench.common import process_cpu_seconds
from engine.kv_pool import allocate_host_pool
from kvtransfer.layout import KvLayout

LAYOUT = KvLayout("gemma-3-270m", "float32", 16, 18, 1, 256)  # 36,864 B/token, 589,824 B/block
SIZES_TOKENS = (128, 512, 2048, 8192)
DST_OFFSET_BLOCKS = 4  # land at different ids than the holder's
# mode -> (puller transport, puller options, extra environment for puller and holder)
MODES = {
    "nixl": ("nixl", {"descriptor_mode": "prepped"}, {}),
    "nixl_coalesced": ("nixl", {"descriptor_mode": "coalesced"}, {}),
    "nixl_1thread": ("nixl", {"descriptor_mode": "prepped", "num_threads": 0}, {}),  # no parallel copy threads
    "nixl_tcp": ("nixl", {"descriptor_mode": "prepped"}, {"UCX_TLS": "tcp,self"}),
    "grpc": ("grpc", {}, {}),
}
_PREFIX = "KVBENCH "
# Every pool here is allocated the way engine.kv_pool allocates a real one (transparent huge pages):
# the puller's and the memcpy baseline's through allocate_host_pool; the holder process builds its
# seeded pool with torch.rand, so its torch allocator is asked for huge pages (torch reads this at
# allocation time: 2 MiB alignment + MADV_HUGEPAGE for allocations >= 2 MiB).
HOLDER_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def _blocks(tokens: int) -> int:
    return -(-tokens // LAYOUT.block_size)


# ---- worker: one puller process (plus its holder process) -------------------------------------

async def _worker(mode: str, max_tokens: int) -> None:
    from kvtransfer import make_puller
    from kvtransfer.holder_process import HolderProcess

    transport, options, env = MODES[mode]
    num_blocks = _blocks(max_tokens) + DST_OFFSET_BLOCKS
    holder = HolderProcess(env={**HOLDER_ENV, **env}, num_blocks=num_blocks, model_id=LAYOUT.model_id, no_nixl=transport != "nixl")
    pool = allocate_host_pool((num_blocks, *LAYOUT.block_shape))
    puller = make_puller(transport, pool, LAYOUT, **options)
    await puller.connect(holder.address)
    _answer({"ready": mode})
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        tokens = json.loads(line)["tokens"]
        _answer(await _handoff(holder, puller, tokens))
    await puller.close()
    holder.close()


async def _handoff(holder, puller, tokens: int) -> dict:
    n = _blocks(tokens)
    start = time.perf_counter()
    handle, lend_ms = holder.lend(list(range(n)), num_tokens=tokens)
    lent = time.perf_counter()
    cpu_before = process_cpu_seconds(os.getpid()) + process_cpu_seconds(holder.proc.pid)
    result = await puller.pull(handle, list(range(DST_OFFSET_BLOCKS, DST_OFFSET_BLOCKS + n)))
    pulled = time.perf_counter()
    pull_cpu_ms = (process_cpu_seconds(os.getpid()) + process_cpu_seconds(holder.proc.pid) - cpu_before) * 1000
    await puller.release(handle)
    released = time.perf_counter()
    return {"bytes": result.num_bytes, "transfer_s": result.seconds - result.verify_seconds,
            "verify_s": result.verify_seconds, "lend_ms": lend_ms, "control_ms": (lent - start) * 1000 - lend_ms,
            "pull_ms": (pulled - lent) * 1000, "pull_cpu_ms": pull_cpu_ms, "release_ms": (released - pulled) * 1000,
            "handoff_ms": lend_ms + (released - lent) * 1000}


def _answer(payload: dict) -> None:
    sys.stdout.write(_PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


# ---- parent: drive workers side by side ----------------------------------------------------------

class _Worker:
    def __init__(self, mode: str, max_tokens: int) -> None:
        env = {**os.environ, **MODES[mode][2]}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.kv_transfer", "--worker", mode,
                                      "--max-tokens", str(max_tokens)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def wait_ready(self) -> "_Worker":
        self._read()
        return self

    def handoff(self, tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def _read(self) -> dict:
        while line := self.proc.stdout.readline():
            if line.startswith(_PREFIX):
                return json.loads(line[len(_PREFIX):])
        raise RuntimeError(f"bench worker exited with {self.proc.wait()}")


class _Memcpy:
    """The baseline: torch copy of the same bytes between two pools in one process, with torch's
    default intra-op threads ("memcpy", the reference of every ratio) or one thread ("memcpy_1t")."""

    def __init__(self, max_tokens: int, threads: int = 0) -> None:
        num_blocks = _blocks(max_tokens) + DST_OFFSET_BLOCKS
        self.src = allocate_host_pool((num_blocks, *LAYOUT.block_shape)).uniform_()
        self.dst = allocate_host_pool((num_blocks, *LAYOUT.block_shape))
        self.threads = threads

    def handoff(self, tokens: int) -> dict:
        n = _blocks(tokens)
        default_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or default_threads)
        try:
            start = time.perf_counter()
            self.dst[DST_OFFSET_BLOCKS:DST_OFFSET_BLOCKS + n].copy_(self.src[:n])
            seconds = time.perf_counter() - start
        finally:
            torch.set_num_threads(default_threads)
        return {"bytes": n * LAYOUT.block_bytes, "transfer_s": seconds}


def _summarize(samples: dict, sizes, modes) -> list[dict]:
    rows = []
    for tokens in sizes:
        memcpy_gbps = _gbps(samples[("memcpy", tokens)])
        for mode in ("memcpy", *modes):
            runs = samples[(mode, tokens)]
            gbps = _gbps(runs)
            row = {"tokens": tokens, "mode": mode, "bytes": runs[0]["bytes"], "gbps": round(gbps, 3),
                   "transfer_ms": round(statistics.median(r["transfer_s"] for r in runs) * 1000, 3),
                   "vs_memcpy": round(gbps / memcpy_gbps, 3), "reps": len(runs)}
            for key in ("lend_ms", "pull_ms", "pull_cpu_ms", "release_ms", "handoff_ms"):
                if key in runs[0]:
                    row[key] = round(statistics.median(r[key] for r in runs), 3)
            if "verify_s" in runs[0]:
                row["verify_ms"] = round(statistics.median(r["verify_s"] for r in runs) * 1000, 3)
            rows.append(row)
    return rows


def _gbps(runs: list[dict]) -> float:
    return runs[0]["bytes"] / statistics.median(r["transfer_s"] for r in runs) / 1e9


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'tokens':>6} {'mode':<15} {'MiB':>7} {'GB/s':>7} {'x memcpy':>9} {'xfer ms':>8} "
          f"{'verify ms':>9} {'lend ms':>8} {'handoff ms':>10} {'pull cpu ms':>11}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['mode']:<15} {r['bytes'] / 2**20:>7.1f} {r['gbps']:>7.2f} {r['vs_memcpy']:>9.2f} "
              f"{r['transfer_ms']:>8.2f} {r.get('verify_ms', 0):>9.2f} {r.get('lend_ms', 0):>8.2f} "
              f"{r.get('handoff_ms', 0):>10.2f} {r.get('pull_cpu_ms', 0):>11.1f}")


def _run(args: argparse.Namespace) -> dict:
    from kvtransfer import available_transports

    sizes = SIZES_TOKENS
    reps = args.reps or (15 if args.quick else 40)
    modes = [m for m in MODES if MODES[m][0] != "nixl" or "nixl" in available_transports()]
    max_tokens = max(sizes)
    _progress(f"starting {len(modes)} puller+holder process pairs ({', '.join(modes)}) and the memcpy baseline")
    starting = {m: _Worker(m, max_tokens) for m in modes}  # start all, then wait: startup runs in parallel
    workers = {"memcpy": _Memcpy(max_tokens), "memcpy_1t": _Memcpy(max_tokens, threads=1),
               **{m: w.wait_ready() for m, w in starting.items()}}
    _progress("workers ready; warming up")
    order = list(workers)
    for tokens in sizes:  # warm-up: first touch of pages, connections, NIXL endpoints
        for worker in workers.values():
            worker.handoff(tokens)
    samples: dict = {(mode, tokens): [] for mode in order for tokens in sizes}
    for rep in range(reps):
        order = order[1:] + order[:1]
        for tokens in sizes:
            for mode in order:
                samples[(mode, tokens)].append(workers[mode].handoff(tokens))
        _progress(f"rep {rep + 1}/{reps}: " + ", ".join(
            f"{mode} {_gbps(samples[(mode, 2048)][-1:]):.2f}" for mode in order) + " GB/s at 2048 tokens")
    for mode in modes:
        workers[mode].close()
    rows = _summarize(samples, sizes, ["memcpy_1t", *modes])
    return _report(rows, reps)


def _report(rows: list[dict], reps: int) -> dict:
    at = {(r["mode"], r["tokens"]): r for r in rows}
    report = {"table": rows, "reps": reps, "layout": {"bytes_per_token": LAYOUT.bytes_per_token,
                                                      "block_bytes": LAYOUT.block_bytes},
              "ucx_tls": os.environ.get("UCX_TLS", "(default)"), "memcpy_torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count()}
    if ("nixl", 2048) in at:
        report["nixl_vs_memcpy"] = at[("nixl", 2048)]["vs_memcpy"]
        report["nixl_vs_memcpy_by_tokens"] = {t: at[("nixl", t)]["vs_memcpy"] for t in SIZES_TOKENS}
        report["nixl_vs_memcpy_1thread_2048"] = round(at[("nixl", 2048)]["gbps"] / at[("memcpy_1t", 2048)]["gbps"], 3)
        report["nixl_vs_nixl_1thread_2048"] = round(at[("nixl", 2048)]["gbps"] / at[("nixl_1thread", 2048)]["gbps"], 3)
        report["nixl_coalesced_vs_prepped_2048"] = round(at[("nixl_coalesced", 2048)]["gbps"] / at[("nixl", 2048)]["gbps"], 3)
        report["fallback_vs_nixl_tcp"] = round(at[("grpc", 2048)]["gbps"] / at[("nixl_tcp", 2048)]["gbps"], 3)
        report["fallback_vs_nixl_tcp_by_tokens"] = {
            t: round(at[("grpc", t)]["gbps"] / at[("nixl_tcp", t)]["gbps"], 3) for t in SIZES_TOKENS}
        # Both ends share the host's cores: what a pull costs in CPU, beside how fast it is.
        report["pull_cpu_ms_2048"] = {m: at[(m, 2048)]["pull_cpu_ms"] for m in ("grpc", "nixl_tcp", "nixl")}
        row = at[("nixl", 2048)]
        report["handoff_ms_2048"] = row["handoff_ms"]
        report["handoff_breakdown_2048"] = {k: row[k] for k in ("lend_ms", "pull_ms", "verify_ms", "release_ms")}
        report["targets"] = {
            "nixl_ge_0.8x_memcpy_at_ge_2048": all(at[("nixl", t)]["vs_memcpy"] >= 0.8 for t in SIZES_TOKENS if t >= 2048),
            "fallback_ge_nixl_tcp": report["fallback_vs_nixl_tcp"] >= 1.0}
    report["handoff_ms_2048_grpc"] = at[("grpc", 2048)]["handoff_ms"]
    return report


def _plot(report: dict, path: str) -> None:
    """GB/s against KV size in tokens (log x), one line per transport, memcpy baselines dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    modes = list(dict.fromkeys(r["mode"] for r in report["table"]))
    for mode in modes:
        rows = sorted((r for r in report["table"] if r["mode"] == mode), key=lambda r: r["tokens"])
        ax.plot([r["tokens"] for r in rows], [r["gbps"] for r in rows], marker="o", label=mode,
                linestyle="--" if mode.startswith("memcpy") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(SIZES_TOKENS, [f"{t}\n({t * LAYOUT.bytes_per_token / 2**20:.0f} MiB)" for t in SIZES_TOKENS])
    ax.set_xlabel("KV size (tokens)")
    ax.set_ylabel("throughput (GB/s, median)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"KV handoff throughput, {report['cpu_count']} cores shared by holder and puller "
                 f"({report['reps']} reps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _progress(message: str) -> None:
    print(f"[kv_transfer {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="KV handoff throughput: NIXL vs NIXL/TCP vs gRPC vs memcpy")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~2 min)")
    parser.add_argument("--reps", type=int, default=0, help="repetitions per size and transport")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="draw throughput vs size here (default: kv_transfer.png next to --json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, default=max(SIZES_TOKENS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(_worker(args.worker, args.max_tokens))
        return
    report = _run(args)
    _print_table(report["table"])
    for key in ("nixl_vs_memcpy", "nixl_vs_memcpy_by_tokens", "nixl_vs_memcpy_1thread_2048", "nixl_vs_nixl_1thread_2048", "nixl_coalesced_vs_prepped_2048", "fallback_vs_nixl_tcp",
                "fallback_vs_nixl_tcp_by_tokens", "pull_cpu_ms_2048", "handoff_ms_2048", "handoff_breakdown_2048", "handoff_ms_2048_grpc",
                "targets"):
        if key in report:
            print(f"{key}: {report[key]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        _progress(f"wrote {args.json}")
    plot = args.plot or (args.json and os.path.join(os.path.dirname(args.json), "kv_transfer.png"))
    if plot:
        _plot(report, plot)
        _progress(f"wrote {plot}")


if __name__ == "__main__":
    main()
