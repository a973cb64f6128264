"""Where a decode step of the built-in engine spends its time, as bench.engines drives it.

    python -m bench.profile_decode [--batches 8 1] [--steps 20] [--threads 1] [--json PATH]

The engine is built as bench.engines builds it (LLMEngine, 1 torch thread by default), a batch of
32-token prompts is prefilled and a few decode steps warm up; then:

1. `--steps` decode steps through LLMEngine.step() timed with no profiler (median ms per step,
   and how much of it is the model's forward, the logits, the sampling, and the rest: scheduler,
   metadata, bookkeeping in Python);
2. the same number of steps under torch.profiler (CPU, record_shapes): every top-level aten op of a
   step is put in a component by name and shapes (linear layers by weight shape, the paged KV
   gather/write, SDPA, the elementwise ops of norms/RoPE/GeGLU/residuals, the pass plan, the LM
   head, sampling); what no op covers inside the forward is Python/dispatch between the ops.
3. memcpy bandwidth in the same run, and per linear component its floor: the weight bytes it
   reads per step / that bandwidth (as bench.engine's step_vs_floor).

The profiler adds a few microseconds per op, so its components are read as shares of the
profiled step and scaled onto the unprofiled median (both are printed).
"""

import argparse
import functools
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import progress, write_results
from bench.engine import memcpy_bandwidth

PROMPT_LEN = 32
RANGES = ("schedule", "forward", "plan", "logits", "sample", "advance")


class Instrumented:
    """Wraps the engine's parts in record_function ranges and perf_counter totals (the engine's
    code is untouched: instance/module attributes are replaced for this process only)."""

    def __init__(self, engine):
        import engine.llm_engine as llm_engine_module
        self.totals: dict[str, float] = defaultdict(float)
        model = engine.model
        model.forward = self._wrap("forward", model.forward)
        model._plan = self._wrap("plan", model._plan)
        model.compute_logits = self._wrap("logits", model.compute_logits)
        engine.scheduler.schedule = self._wrap("schedule", engine.scheduler.schedule)
        engine._advance = self._wrap("advance", engine._advance)
        llm_engine_module.sample = self._wrap("sample", llm_engine_module.sample)

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            with torch.profiler.record_function(name):
                out = fn(*args, **kwargs)
            self.totals[name] += time.perf_counter() - start
            return out
        return wrapped


def linear_names(config) -> dict[tuple[int, int], str]:
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    return {(q + 2 * kv, h): "linear qkv", (h, q): "linear o", (2 * i, h): "linear gate_up",
            (h, i): "linear down", (config.vocab_size, h): "LM head"}


def linears_vocab(linears: dict) -> int:
    return next(shape[0] for shape, name in linears.items() if name == "LM head")


def classify(event, parent: str, linears: dict) -> str:
    name, shapes = event.name, event.input_shapes or []
    if parent == "plan":
        return "plan (masks, block ids, RoPE tables)"
    if parent == "sample":
        return "sampling (argmax, tolist)"
    if parent == "schedule" or parent == "advance":
        return "scheduler/bookkeeping ops"
    if name == "aten::linear" and len(shapes) > 1 and len(shapes[1]) == 2:
        return linears.get(tuple(shapes[1]), f"linear other {shapes[1]}")
    if parent == "logits":
        return "LM head top-32 exact recompute"
    if name == "aten::index" and shapes and len(shapes[0]) >= 4:
        return "attention: paged KV gather"
    if name == "aten::index_put_":
        return "attention: KV write"
    if name == "aten::scaled_dot_product_attention":
        return "attention: SDPA (scores, softmax, PV)"
    if name == "aten::embedding" or (name == "aten::index" and shapes and shapes[0] == [linears_vocab(linears), shapes[0][-1]]):
        return "embedding"
    if name in ("aten::index", "aten::permute", "aten::reshape", "aten::view", "aten::select",
                "aten::flatten", "aten::transpose", "aten::split", "aten::chunk", "aten::slice"):
        return "attention: query/output reshapes, views"
    return "elementwise (norms, RoPE, GeGLU, residual)"


def step_components(prof, linears: dict, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """(ms per step per component from top-level ops under our ranges; ms per step per range)."""
    comps: dict[str, float] = defaultdict(float)
    ranges: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name in RANGES:
            ranges[event.name] += event.cpu_time_total / 1000
            continue
        parent = event.cpu_parent
        if parent is None or parent.name not in RANGES:
            continue  # a nested op (counted in its parent) or outside any range
        comps[classify(event, parent.name, linears)] += event.cpu_time_total / 1000
    return ({k: v / steps for k, v in comps.items()}, {k: v / steps for k, v in ranges.items()})


def profile_batch(engine, batch: int, steps: int, salt: int) -> dict:
    from bench.engines import prompts
    from engine.sampling import SamplingParams
    warmup = 4
    ids = [f"prof{salt}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts(batch, PROMPT_LEN, salt)):
        engine.add_request(rid, prompt, SamplingParams(), max_tokens=1 + warmup + 2 * steps + 2, ignore_eos=True)
    started = set()
    while len(started) < batch:
        started |= {o.request_id for o in engine.step() if o.token_id is not None}
    for _ in range(warmup):
        engine.step()

    inst = engine._instrumented
    inst.totals.clear()
    plain = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        plain.append(time.perf_counter() - start)
    plain_ranges = {k: 1000 * v / steps for k, v in inst.totals.items()}
    inst.totals.clear()

    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            with torch.profiler.record_function("step"):
                engine.step()
            walls.append(time.perf_counter() - start)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()

    comps, ranges = step_components(prof, linear_names(engine.model.config), steps)
    profiled_ms = 1000 * statistics.mean(walls)
    forward_ops = sum(v for k, v in comps.items()
                      if not k.startswith(("plan", "sampling", "scheduler", "LM head")))
    comps["Python/dispatch between ops in the forward"] = ranges["forward"] - ranges.get("plan", 0) - forward_ops
    comps["outside forward/logits/sample (scheduler, metadata, Python)"] = (
        profiled_ms - ranges["forward"] - ranges.get("logits", 0) - ranges.get("sample", 0))
    comps["sampling (argmax, tolist)"] = ranges.get("sample", 0)
    comps.pop("scheduler/bookkeeping ops", None)
    plain_median = 1000 * statistics.median(plain)
    return {
        "batch": batch, "steps": steps,
        "step_ms_median": plain_median, "step_ms_mean": 1000 * statistics.mean(plain),
        "tokens_per_s": batch / (plain_median / 1000),
        "unprofiled_ranges_ms": plain_ranges,
        "profiled_step_ms_mean": profiled_ms,
        "components_profiled_ms": dict(sorted(comps.items(), key=lambda kv: -kv[1])),
    }


def weight_bytes(model) -> dict[str, int]:
    cfg = model.config
    layer = model.layers[0]
    per = {"linear qkv": layer.qkv_proj, "linear o": layer.o_proj, "linear gate_up": layer.gate_up_proj,
           "linear down": layer.down_proj}
    out = {k: cfg.num_layers * p.numel() * p.element_size() for k, p in per.items()}
    out["LM head"] = model.lm_head.numel() * model.lm_head.element_size()
    return out


def print_report(report: dict) -> None:
    bw = report["memcpy_gb_per_s"]
    print(f"torch threads {report['torch_threads']}, memcpy {bw:.1f} GB/s, LM head {report['lm_head_dtype']}, "
          f"load average {report['loadavg_start']} -> {report['loadavg_end']}")
    for entry in report["batches"]:
        scale = entry["step_ms_median"] / entry["profiled_step_ms_mean"]
        print(f"\nbatch {entry['batch']}: step {entry['step_ms_median']:.1f} ms median unprofiled "
              f"({entry['tokens_per_s']:.1f} tok/s), {entry['profiled_step_ms_mean']:.1f} ms profiled; "
              f"unprofiled ranges ms/step: "
              + ", ".join(f"{k} {v:.1f}" for k, v in entry["unprofiled_ranges_ms"].items()))
        print(f"  {'component':58s} {'ms prof':>8s} {'%':>6s} {'ms scaled':>9s} {'floor ms':>8s} {'x floor':>7s}")
        for name, ms in entry["components_profiled_ms"].items():
            floor = report["floor_ms"].get(name)
            pct = 100 * ms / entry["profiled_step_ms_mean"]
            extra = f" {floor:8.1f} {ms * scale / floor:7.2f}" if floor else ""
            print(f"  {name:58s} {ms:8.2f} {pct:5.1f}% {ms * scale:9.2f}{extra}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--weights-in-out", action="store_true", help="experiment: store the layer "
                        "linears' weights [in, out] contiguous (same shapes, transposed strides) before profiling")
    args = parser.parse_args(argv)
    os.environ["PDMESH_TORCH_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    loadavg_start = os.getloadavg()
    from bench.engines import build
    progress("building the engine (as bench.engines does)")
    engine = build("builtin")
    if args.weights_in_out:
        for layer in engine.model.layers:
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                weight = getattr(layer, name)
                setattr(layer, name, torch.nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False))
    engine._instrumented = Instrumented(engine)
    batches = []
    for salt, batch in enumerate(args.batches):
        progress(f"batch {batch}: {args.steps} plain + {args.steps} profiled decode steps")
        batches.append(profile_batch(engine, batch, args.steps, salt=100 + salt))
    progress("memcpy bandwidth")
    bandwidth = memcpy_bandwidth()
    wbytes = weight_bytes(engine.model)
    report = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "lm_head_dtype": str(engine.model.lm_head_dtype), "weights_in_out": args.weights_in_out,
        "memcpy_gb_per_s": bandwidth / 1e9, "weight_bytes": wbytes,
        "floor_ms": {k: 1000 * v / bandwidth for k, v in wbytes.items()},
        "loadavg_start": " ".join(f"{x:.2f}" for x in loadavg_start),
        "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "batches": batches,
    }
    print_report(report)
    if args.json:
        write_results(args.json, report)


if __name__ == "__main__":
    main()
