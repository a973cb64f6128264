"""Runs a placement profile: per pool, filters -> weighted scorers -> picker; decode first, then
the decider, then (if remote prefill pays) the prefill pool.

The runner owns the cross-cutting work: it fills each candidate's prefix match from the prefix
index (only when a plugin of the profile uses it), clamps every score to [0, 1], combines them as
a weighted sum, times each plugin, and records the scores and decision for the request (tracing
puts them on spans). An empty candidate list after filtering raises NoCandidates.
"""

import itertools
import logging
import pathlib
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from services.common.profiles import read_profile
from services.router.placement import registry
from services.router.placement.base import Decision, PlacementRequest, WorkerView
from services.router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)
PROFILES_DIR = pathlib.Path(__file__).parent / "profiles"


class NoCandidates(Exception):
    """No worker of a pool passed the filters."""


class PoolChoice(NamedTuple):
    worker: WorkerView
    scores: dict[str, float]  # worker_id -> weighted total
    plugin_ms: dict[str, float]


class Placement(NamedTuple):
    decode: PoolChoice
    prefill: PoolChoice | None  # None: the decode worker prefills locally
    decision: Decision


@dataclass
class PoolProfile:
    filters: list
    scorers: list[tuple[object, float]]  # (scorer, weight)
    picker: object

    @property
    def uses_prefix_index(self) -> bool:
        return any(getattr(p, "uses_prefix_index", False) for p in [*self.filters, *(s for s, _ in self.scorers),
                                                                    self.picker])

    def choose(self, pool: str, request: PlacementRequest, workers: list[WorkerView]) -> PoolChoice:
        timings: dict[str, float] = {}
        candidates = workers
        for f in self.filters:
            candidates = _timed(timings, f"filter.{f.name}", f.filter, request, candidates)
        if not candidates:
            raise NoCandidates(f"no {pool} worker is available ({len(workers)} known, none passed the filters)")
        ids = [w.worker_id for w in candidates]
        totals = np.zeros(len(ids))
        for scorer, weight in self.scorers:
            raw = _timed(timings, f"scorer.{scorer.name}", scorer.score, request, candidates)
            totals += weight * _clamped(raw, ids)
        totals = totals.tolist()
        chosen = _timed(timings, f"picker.{self.picker.name}", self.picker.pick, request, list(zip(candidates, totals)))
        return PoolChoice(chosen, dict(zip(ids, totals)), timings)


@dataclass
class PlacementProfile:
    name: str
    decode: PoolProfile
    prefill: PoolProfile
    decider: object
    counts: dict[str, int] = field(default_factory=dict)

    def place(self, request: PlacementRequest, workers: list[WorkerView], index: PrefixIndex | None = None) -> Placement:
        decode_pool = [w for w in workers if w.role == "decode"]
        prefill_pool = [w for w in workers if w.role == "prefill"]
        decode_uses_index = index is not None and (
            self.decode.uses_prefix_index or getattr(self.decider, "uses_prefix_index", False))
        if decode_uses_index:
            decode_pool = _with_prefix(request, decode_pool, index)
        decode = self.decode.choose("decode", request, decode_pool)
        if decode_uses_index:
            decode = decode._replace(worker=_with_confirmed(request, decode.worker, index))
        decision = self.decider.decide(request, decode.worker)
        prefill = None
        if decision.remote_prefill:
            if index is not None and self.prefill.uses_prefix_index:
                prefill_pool = _with_prefix(request, prefill_pool, index)
            try:
                prefill = self.prefill.choose("prefill", request, prefill_pool)
                if index is not None and self.prefill.uses_prefix_index:
                    prefill = prefill._replace(worker=_with_confirmed(request, prefill.worker, index))
            except NoCandidates as exc:
                log.warning("%s: %s; prefilling on the decode worker", request.request_id, exc)
                decision = Decision(False, f"no prefill worker available ({decision.reason})")
        outcome = "remote_prefill" if prefill else "local_prefill"
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if index is not None and (self.decode.uses_prefix_index or self.prefill.uses_prefix_index):
            # Both workers will hold the prompt's blocks (decode imports the pulled ones too).
            for choice in filter(None, (decode, prefill)):
                index.expect(choice.worker.worker_id, request.block_hashes)
        return Placement(decode, prefill, decision)


def _with_prefix(request: PlacementRequest, pool: list[WorkerView], index: PrefixIndex) -> list[WorkerView]:
    matched = index.matched_blocks(request.block_hashes, [w.worker_id for w in pool])
    # Most of a large pool matches nothing: keep those views as they are (no copy per worker).
    return [w if (m := matched[w.worker_id]) == w.prefix_blocks else _with_prefix_blocks(w, m) for w in pool]


def _with_prefix_blocks(w: WorkerView, prefix_blocks: int) -> WorkerView:
    # Spelled out rather than w._replace(...), which costs several times more per call.
    return WorkerView(w.worker_id, w.address, w.role, w.healthy, w.load, prefix_blocks, w.confirmed_prefix_blocks)


def _clamped(raw: dict[str, float], ids: list[str]) -> np.ndarray:
    """A scorer's values in candidate order, missing -> 0, NaN -> 0, clamped into [0, 1]. (Vectorized:
    this runs per scorer over every candidate, up to thousands of workers per request; fmax/fmin
    ignore NaN, so NaN becomes 0.)"""
    values = np.fromiter(map(raw.get, ids, itertools.repeat(0.0)), dtype=np.float64, count=len(ids))
    return np.fmin(np.fmax(values, 0.0, out=values), 1.0, out=values)


def _with_confirmed(request: PlacementRequest, worker: WorkerView, index: PrefixIndex) -> WorkerView:
    confirmed = index.matched_blocks(request.block_hashes, [worker.worker_id], include_expected=False)
    return worker._replace(confirmed_prefix_blocks=confirmed[worker.worker_id])


def load_profile(name_or_path: str, seed: int | None = None) -> PlacementProfile:
    """A profile by name (profiles/NAME.yaml) or by path to a YAML file. A seed seeds each pool's
    picker that draws at random (unless the file gives it one), so a run repeats exactly."""
    name, spec = read_profile(name_or_path, PROFILES_DIR, "placement")
    decode_seed, prefill_seed = (None, None) if seed is None else (seed * 2, seed * 2 + 1)
    return PlacementProfile(name, _pool(spec["decode"], decode_seed), _pool(spec["prefill"], prefill_seed),
                            _plugin("decider", spec.get("decider", "always_remote")))


def _pool(spec: dict, seed: int | None = None) -> PoolProfile:
    filters = [_plugin("filter", f) for f in spec.get("filters", [])]
    scorers = []
    for s in spec.get("scorers", []):
        weight = float(s.get("weight", 1.0)) if isinstance(s, dict) else 1.0
        if weight < 0:
            raise ValueError(f"scorer weights must be >= 0, got {weight}")
        scorers.append((_plugin("scorer", s), weight))
    picker = spec.get("picker", "max_score")
    if isinstance(picker, str):
        picker = {"name": picker}
    if seed is not None and registry.takes("picker", picker["name"], "seed"):
        picker = {"seed": seed, **picker}
    return PoolProfile(filters, scorers, _plugin("picker", picker))


def _plugin(kind: str, spec):
    if isinstance(spec, str):
        return registry.build(kind, spec)
    params = {k: v for k, v in spec.items() if k not in ("name", "weight")}
    return registry.build(kind, spec["name"], **params)


def _timed(timings: dict, key: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    timings[key] = (time.perf_counter() - start) * 1000
    return result
