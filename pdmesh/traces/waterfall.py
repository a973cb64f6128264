"""One request's trace as a waterfall (text and PNG), and a per-phase latency report over many.

Spans are the receiver's plain dicts (pdmesh.traces.receiver). A phase is a span name
("router.placement", "kv_transfer", "decode.generate", ...); the report gives count, p50, p99
and mean duration per phase over every collected trace.
"""

import statistics
from collections import defaultdict

SERVICE_COLORS = {"router": "#4C72B0", "prefill": "#DD8452", "decode": "#55A868"}


def by_trace(spans: list[dict]) -> dict[str, list[dict]]:
    traces: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        traces[span["trace_id"]].append(span)
    return dict(traces)


def ordered(spans: list[dict]) -> list[tuple[int, dict]]:
    """(depth, span) in depth-first order, children by start time; orphans count as roots."""
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict]] = defaultdict(list)
    for s in spans:
        children[s["parent_span_id"] if s["parent_span_id"] in ids else ""].append(s)
    out: list[tuple[int, dict]] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: (s["start_ns"], -s["end_ns"])):
            out.append((depth, s))
            walk(s["span_id"], depth + 1)

    walk("", 0)
    return out


def duration_ms(span: dict) -> float:
    return (span["end_ns"] - span["start_ns"]) / 1e6


def _role(span: dict) -> str:
    return next((r for r in SERVICE_COLORS if r in span["service"]), "other")


def text_waterfall(spans: list[dict], width: int = 48) -> str:
    rows = ordered(spans)
    t0 = min(s["start_ns"] for _, s in rows)
    total = max(max(s["end_ns"] for _, s in rows) - t0, 1)
    lines = []
    for depth, s in rows:
        start = int((s["start_ns"] - t0) / total * width)
        length = max(1, int((s["end_ns"] - s["start_ns"]) / total * width))
        bar = " " * start + "#" * min(length, width - start)
        label = f"{'  ' * depth}{s['name']}"
        lines.append(f"{label:<34} {_role(s):<8} {(s['start_ns'] - t0) / 1e6:>8.1f} {duration_ms(s):>8.1f}  |{bar:<{width}}|")
    header = f"{'span':<34} {'service':<8} {'start ms':>8} {'dur ms':>8}"
    return "\n".join([header, *lines])


def render_png(spans: list[dict], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ordered(spans)
    t0 = min(s["start_ns"] for _, s in rows)
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.4))
    for i, (depth, s) in enumerate(rows):
        start, dur = (s["start_ns"] - t0) / 1e6, duration_ms(s)
        ax.barh(i, max(dur, 0.05), left=start, color=SERVICE_COLORS.get(_role(s), "#8C8C8C"),
                edgecolor="black", linewidth=0.4)
        ax.text(start + max(dur, 0.05), i, f" {dur:.1f} ms", va="center", fontsize=8)
        for event in s.get("events", []):
            ax.plot((event["time_ns"] - t0) / 1e6, i, marker="v", color="black", markersize=5)
    ax.set_yticks(range(len(rows)), [f"{s['name']} {'·' * d}" if d else s["name"] for d, s in rows], fontsize=9)
    ax.invert_yaxis()
    end = max((s["end_ns"] - t0) / 1e6 for _, s in rows)
    ax.set_xlim(0, end * 1.15)
    ax.set_xlabel("ms since the request reached the router")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in SERVICE_COLORS.values()]
    ax.legend(handles, list(SERVICE_COLORS), loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8,
              frameon=False)
    ax.set_title(title or f"trace {rows[0][1]['trace_id']}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def percentile(values: list[float], q: float) -> float:
    ordered_values = sorted(values)
    if not ordered_values:
        return float("nan")
    k = (len(ordered_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered_values) - 1)
    return ordered_values[lo] + (ordered_values[hi] - ordered_values[lo]) * (k - lo)


def phase_report(spans: list[dict]) -> list[dict]:
    """Per span name: count, p50, p99 and mean duration in ms, in first-seen pipeline order."""
    durations: dict[str, list[float]] = defaultdict(list)
    services: dict[str, str] = {}
    for _, s in sorted(((s["start_ns"], s) for s in spans), key=lambda x: x[0]):
        durations[s["name"]].append(duration_ms(s))
        services.setdefault(s["name"], _role(s))
    return [{"phase": name, "service": services[name], "count": len(v), "p50_ms": percentile(v, 0.5),
             "p99_ms": percentile(v, 0.99), "mean_ms": statistics.fmean(v)} for name, v in durations.items()]


def format_report(rows: list[dict], num_traces: int) -> str:
    lines = [f"per-phase latency over {num_traces} traces",
             f"{'phase':<22} {'service':<8} {'count':>6} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}"]
    for r in rows:
        lines.append(f"{r['phase']:<22} {r['service']:<8} {r['count']:>6} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} "
                     f"{r['mean_ms']:>9.2f}")
    return "\n".join(lines)
