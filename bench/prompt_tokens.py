"""The router's prefix token cache against plain tokenization, on the real Gemma tokenizer.

    python -m bench.prompt_tokens [--quick] [--json PATH] [--plot PATH]

Workloads (text made of README words, so it tokenizes like English prose and markup):
  shared_NKB   a system prompt of N KB shared by every prompt + a unique ~1 KB question each
               (chat or RAG traffic: the router sees the same long prefix again and again);
  unique_16KB  16 KB prompts that share nothing (the negative control: the cache can only cost).
Each prompt is tokenized by both arms back to back, alternating which goes first, with a fresh
cache per workload (its first prompt warms it); the ids must be identical (`mismatches`). Times
are the median per prompt. --json also draws prompt_tokens.png beside it (ms per prompt per arm).
"""

import argparse
import os
import pathlib
import random
import statistics
import sys
import time

from bench.common import write_results
from engine.tokenizer import load_tokenizer
from services.router.prefix_tokens import PrefixTokenCache

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
SHARED_KB = (4, 16, 64)
QUESTION_CHARS = 1024


def _text(rng: random.Random, chars: int) -> str:
    words = README.split(" ")
    out, n = [], 0
    while n < chars:
        out.append(rng.choice(words))
        n += len(out[-1]) + 1
    return " ".join(out)[:chars]


def _workloads(prompts: int) -> dict[str, list[str]]:
    rng = random.Random(0)
    out = {}
    for kb in SHARED_KB:
        system = _text(rng, kb * 1024)
        out[f"shared_{kb}KB"] = [f"{system}\n\n{_text(rng, QUESTION_CHARS)}" for _ in range(prompts)]
    out["unique_16KB"] = [_text(rng, 16 * 1024) for _ in range(prompts)]
    return out


def _timed(fn, text: str) -> tuple[float, list[int]]:
    start = time.perf_counter()
    ids = fn(text)
    return time.perf_counter() - start, ids


def run(prompts: int) -> dict:
    tokenizer = load_tokenizer()
    report = {"prompts_per_workload": prompts, "question_chars": QUESTION_CHARS, "cpu_count": os.cpu_count(),
              "workloads": {}, "mismatches": 0}
    for name, texts in _workloads(prompts).items():
        cache = PrefixTokenCache(tokenizer)
        plain_s, cached_s = [], []
        for i, text in enumerate(texts):
            arms = [("plain", tokenizer.encode), ("cache", cache.encode)]
            for arm, fn in (arms if i % 2 else arms[::-1]):
                seconds, ids = _timed(fn, text)
                (plain_s if arm == "plain" else cached_s).append(seconds)
                if arm == "plain":
                    expected = ids
                else:
                    got = ids
            report["mismatches"] += got != expected
        row = {"chars": round(statistics.mean(len(t) for t in texts)), "tokens": len(expected),
               "plain_ms": round(statistics.median(plain_s[1:]) * 1000, 3),
               "cache_ms": round(statistics.median(cached_s[1:]) * 1000, 3),
               "cache_first_ms": round(cached_s[0] * 1000, 3), "served_from_cache": round(cache.hit_chars / (
                   cache.hit_chars + cache.missed_chars), 3)}
        row["speedup"] = round(row["plain_ms"] / row["cache_ms"], 2)
        report["workloads"][name] = row
        print(f"[bench.prompt_tokens {time.strftime('%H:%M:%S')}] {name}: plain {row['plain_ms']} ms, cache "
              f"{row['cache_ms']} ms per prompt", file=sys.stderr, flush=True)
    for kb in SHARED_KB:
        report[f"shared_{kb}kb_speedup"] = report["workloads"][f"shared_{kb}KB"]["speedup"]
    report["unique_16kb_cache_vs_plain"] = round(1 / report["workloads"]["unique_16KB"]["speedup"], 2)
    return report


def print_table(report: dict) -> None:
    print(f"{'workload':<13} {'chars':>7} {'tokens':>7} {'plain ms':>9} {'cache ms':>9} {'speedup':>8} "
          f"{'from cache':>11} {'first (cold) ms':>16}")
    for name, r in report["workloads"].items():
        print(f"{name:<13} {r['chars']:>7} {r['tokens']:>7} {r['plain_ms']:>9.3f} {r['cache_ms']:>9.3f} "
              f"{r['speedup']:>7.2f}x {r['served_from_cache']:>10.0%} {r['cache_first_ms']:>16.3f}")
    for key in ("shared_4kb_speedup", "shared_16kb_speedup", "shared_64kb_speedup", "unique_16kb_cache_vs_plain",
                "mismatches"):
        print(f"{key}: {report[key]}")


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["workloads"])
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - 0.2 for i in x], [report["workloads"][n]["plain_ms"] for n in names], 0.4, label="plain tokenizer")
    ax.bar([i + 0.2 for i in x], [report["workloads"][n]["cache_ms"] for n in names], 0.4, label="prefix token cache")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("ms per prompt (median)")
    ax.set_title(f"Router tokenization, {report['prompts_per_workload']} prompts per workload")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the router's prefix token cache vs plain tokenization")
    parser.add_argument("--quick", action="store_true", help="fewer prompts (well under a minute)")
    parser.add_argument("--prompts", type=int, default=0, help="prompts per workload")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="draw the bars here (default: prompt_tokens.png next to --json)")
    args = parser.parse_args(argv)
    report = run(args.prompts or (40 if args.quick else 200))
    print_table(report)
    if args.json:
        write_results(args.json, report, "prompt_tokens.png", lambda png: plot(report, str(png)), args.plot)
    elif args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
