"""Small helpers every benchmark shares: a timestamped progress line, a nearest-rank percentile
and a CDF line for the PNGs."""

import time


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def plot_cdf(ax, values: list[float], style: str, label: str) -> None:
    """The empirical CDF of values on a matplotlib axis."""
    ordered = sorted(values)
    ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], style, label=label)
