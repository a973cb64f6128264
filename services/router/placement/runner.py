"""Runs a placement profile: per pool, filters -> weighted scorers -> picker; decode first, then
the decider, then (if remote prefill pays) the prefill pool.

The runner owns the cross-cutting work: it takes each pool from the WorkerTable as columns, fills
their prefix columns from the prefix index (one walk for both pools, only when a plugin of the
profile uses it), narrows the pool with each filter's mask, clamps every score to [0, 1],
combines them as a weighted sum, times each plugin, and records every candidate's total and the
decision for the request (tracing puts them on spans). An empty pool after filtering raises
NoCandidates.
"""

import functools
import logging
import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from services.common.profiles import read_profile
from services.router.placement import registry
from services.router.placement.base import Decision, PlacementRequest, Pool, WorkerView
from services.router.placement.table import WorkerTable
from services.router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)
PROFILES_DIR = pathlib.Path(__file__).parent / "profiles"


class NoCandidates(Exception):
    """No worker of a pool passed the filters."""


class PoolChoice(NamedTuple):
    worker: WorkerView
    scores: dict[str, float]  # worker_id -> weighted total, every candidate that passed the filters
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

    @functools.cached_property
    def uses_prefix_index(self) -> bool:
        """Computed once: a profile's plugins do not change after loading (read on every placement)."""
        return any(getattr(p, "uses_prefix_index", False) for p in [*self.filters, *(s for s, _ in self.scorers),
                                                                    self.picker])

    def choose(self, role: str, request: PlacementRequest, pool: Pool) -> PoolChoice:
        timings: dict[str, float] = {}
        known = len(pool)
        for f in self.filters:
            keep = _checked(_timed(timings, f"filter.{f.name}", f.filter, request, pool), bool, len(pool), f.name)
            if not keep.all():
                pool = pool.take(keep)
        if not len(pool):
            raise NoCandidates(f"no {role} worker is available ({known} known, none passed the filters)")
        totals = np.zeros(len(pool))
        for scorer, weight in self.scorers:
            raw = _timed(timings, f"scorer.{scorer.name}", scorer.score, request, pool)
            totals += weight * _clamped(_checked(raw, np.float64, len(pool), scorer.name))
        chosen = _timed(timings, f"picker.{self.picker.name}", self.picker.pick, request, pool, totals)
        return PoolChoice(pool.view(chosen), dict(zip(pool.ids, totals.tolist())), timings)


@dataclass
class PlacementProfile:
    name: str
    decode: PoolProfile
    prefill: PoolProfile
    decider: object
    counts: dict[str, int] = field(default_factory=dict)

    def place(self, request: PlacementRequest, workers: WorkerTable | Sequence[WorkerView],
              index: PrefixIndex | None = None) -> Placement:
        """workers: the router's WorkerTable (a list of views is turned into one, at a cost per worker)."""
        table = workers if isinstance(workers, WorkerTable) else WorkerTable.of(workers)
        decode_uses_index = index is not None and (
            self.decode.uses_prefix_index or getattr(self.decider, "uses_prefix_index", False))
        prefill_uses_index = index is not None and self.prefill.uses_prefix_index
        prefix = _prefix_column(request, table, index) if decode_uses_index or prefill_uses_index else None
        decode = self.decode.choose("decode", request, table.pool("decode", prefix if decode_uses_index else None))
        if decode_uses_index:
            decode = decode._replace(worker=_with_confirmed(request, decode.worker, index))
        decision = self.decider.decide(request, decode.worker)
        prefill = None
        if decision.remote_prefill:
            try:
                prefill = self.prefill.choose("prefill", request,
                                              table.pool("prefill", prefix if prefill_uses_index else None))
                if prefill_uses_index:
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


def _prefix_column(request: PlacementRequest, table: WorkerTable, index: PrefixIndex) -> np.ndarray:
    """prefix_blocks for every row of the table, from one walk of the index. (The confirmed
    count is filled in only for a chosen worker, by _with_confirmed: the one view a decider reads.)"""
    rows = table.rows
    matches = index.prefix_matches(request.block_hashes, rows)
    prefix = np.zeros(len(table), dtype=np.int64)
    if matches:
        prefix[[rows[w] for w in matches]] = list(matches.values())
    return prefix


def _checked(values, dtype, n: int, plugin: str) -> np.ndarray:
    """A plugin's answer as a new array of dtype, one entry per candidate (else ValueError)."""
    values = np.array(values, dtype=dtype)
    if values.shape != (n,):
        raise ValueError(f"{plugin} returned {values.shape} values for {n} candidates")
    return values


def _clamped(values: np.ndarray) -> np.ndarray:
    """Scores clamped into [0, 1] in place, NaN -> 0 (fmax/fmin ignore NaN)."""
    return np.fmin(np.fmax(values, 0.0, out=values), 1.0, out=values)


def _with_confirmed(request: PlacementRequest, worker: WorkerView, index: PrefixIndex) -> WorkerView:
    return worker._replace(confirmed_prefix_blocks=index.confirmed_blocks(request.block_hashes, worker.worker_id))


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
