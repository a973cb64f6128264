"""Small helpers every benchmark shares: a timestamped progress line, a nearest-rank percentile,
a CDF line for the PNGs and a per-process CPU meter."""

import json
import os
import pathlib
import resource
import time
import urllib.request


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def scrape(address: str) -> dict[str, float]:
    """Every pdmesh_* sample on one /metrics endpoint: series (name{labels}) -> value."""
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return {series: float(value) for series, _, value in
            (line.rpartition(" ") for line in body.splitlines() if line.startswith("pdmesh_"))}


def metric_sum(samples: dict[str, float], prefix: str) -> float:
    """The sum of the scraped series that start with prefix (a name, or a name and its labels)."""
    return sum(value for series, value in samples.items() if series.startswith(prefix))


def engine_scheduling(metrics_address: str) -> dict:
    """How a worker's engine scheduled its steps so far (its /metrics): steps, prompt-only steps
    (prompts first, by cost: engine/step_cost.py) and its fitted step cost in ms."""
    samples = scrape(metrics_address)
    cost = {term: [v for k, v in samples.items() if k.startswith("pdmesh_engine_step_cost_seconds{") and f'term="{term}"' in k]
            for term in ("fixed", "per_sequence", "per_token")}
    return {"steps": metric_sum(samples, "pdmesh_engine_steps_total"),
            "prompt_only_steps": metric_sum(samples, "pdmesh_engine_prompt_only_steps_total"),
            # None before the engine has a fit (engine/step_cost.py)
            **{f"step_cost_{term}_ms": 1000 * values[0] if values else None for term, values in cost.items()}}


def step_cost_text(scheduling: dict) -> str:
    """engine_scheduling's fitted step cost, said in words."""
    if scheduling["step_cost_fixed_ms"] is None:
        return "no step cost fit yet"
    return (f"fitted step: fixed {scheduling['step_cost_fixed_ms']:.2f} ms, {scheduling['step_cost_per_sequence_ms']:.3f} "
            f"ms per sequence, {scheduling['step_cost_per_token_ms'] * 1000:.1f} us per token")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def write_results(json_path: str, result: dict, png_name: str = "", plot=None, plot_path: str | None = None) -> None:
    """Writes result as JSON to json_path (making its directory) and, given plot, calls plot(png)
    with plot_path or png_name beside the JSON; says what it wrote."""
    path = pathlib.Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    if plot is None:
        progress(f"wrote {path}")
        return
    png = pathlib.Path(plot_path) if plot_path else path.with_name(png_name)
    plot(png)
    progress(f"wrote {path} and {png}")


def plot_cdf(ax, values: list[float], style: str, label: str) -> None:
    """The empirical CDF of values on a matplotlib axis."""
    ordered = sorted(values)
    ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], style, label=label)


class CpuMeter:
    """CPU seconds (user + system, all threads) used so far by named processes, plus this one as
    "client": read() before and after a batch and divide the difference by its requests."""

    def __init__(self, pids: dict[str, int]):
        self._stats = {name: pathlib.Path(f"/proc/{pid}/stat") for name, pid in pids.items()}

    def read(self) -> dict[str, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        used = {}
        for name, stat in self._stats.items():
            fields = stat.read_text().rpartition(")")[2].split()
            used[name] = (int(fields[11]) + int(fields[12])) / ticks
        me = resource.getrusage(resource.RUSAGE_SELF)
        used["client"] = me.ru_utime + me.ru_stime
        return used


def process_cpu_seconds(pid: int) -> float:
    """CPU time so far of process pid, all its threads (also those that ended), from the kernel's
    per-process CPU clock (Linux); 0 when the process is gone."""
    try:
        return time.clock_gettime((~pid << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    except OSError:
        return 0.0


def add_cpu_seconds(totals: dict[str, float], before: dict[str, float], after: dict[str, float]) -> None:
    """Adds to totals, by process name, the CPU seconds used between two CpuMeter.read()s."""
    for name, seconds in after.items():
        totals[name] = totals.get(name, 0.0) + seconds - before[name]


def pin_process(pid: int, cpus: set[int]) -> None:
    """Restricts every thread of process pid (0: this one) to cpus; threads it starts later inherit
    it. (os.sched_setaffinity on a pid reaches only its main thread: each thread id is set.)"""
    for task in pathlib.Path(f"/proc/{pid or os.getpid()}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def core_split() -> tuple[set[int], set[int]] | None:
    """The CPUs this process may use, split as (front, worker): the first for the router alone,
    the rest for the worker and the load generator. None with fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else None


def layout_names(split: tuple[set[int], set[int]] | None) -> dict[str, str]:
    """The core layouts a router benchmark runs in, by name, each with what it pins (see core_split)."""
    layouts = {"shared": "nothing pinned"}
    if split:
        layouts["pinned"] = (f"router alone on CPU {sorted(split[0])}, decode worker and load generator on "
                             f"CPU {sorted(split[1])}")
    return layouts


def pin_router_apart(split: tuple[set[int], set[int]], router_pid: int, worker_pid: int) -> None:
    """The pinned layout: the router on split's front CPU, the worker and this process on the rest."""
    front, worker = split
    pin_process(router_pid, front)
    pin_process(worker_pid, worker)
    pin_process(0, worker)
