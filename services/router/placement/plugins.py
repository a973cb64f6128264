"""The baseline plugins. Formulas:

- healthy (filter): keep workers whose state stream is up.
- round_robin (picker): the next worker in a fixed cycle over the candidates' ids, ignoring scores.
- random (picker): a uniformly random candidate (seedable).
- max_score (picker): highest total score; ties broken at random.
- always_remote (decider): always prefill on the prefill pool (full disaggregation).
- never_remote (decider): always prefill on the decode worker (no disaggregation).
"""

import itertools
import random as _random

from services.router.placement.base import PlacementRequest, WorkerView
from services.router.placement.registry import register


@register("filter", "healthy")
class HealthyFilter:
    name = "healthy"

    def filter(self, request: PlacementRequest, workers: list[WorkerView]) -> list[WorkerView]:
        return [w for w in workers if w.healthy]


@register("picker", "round_robin")
class RoundRobinPicker:
    name = "round_robin"

    def __init__(self):
        self._counter = itertools.count()

    def pick(self, request, scored):
        ordered = sorted(scored, key=lambda ws: ws[0].worker_id)
        return ordered[next(self._counter) % len(ordered)][0]


@register("picker", "random")
class RandomPicker:
    name = "random"

    def __init__(self, seed: int | None = None):
        self._rng = _random.Random(seed)

    def pick(self, request, scored):
        return self._rng.choice(scored)[0]


@register("picker", "max_score")
class MaxScorePicker:
    name = "max_score"

    def __init__(self, seed: int | None = None):
        self._rng = _random.Random(seed)

    def pick(self, request, scored):
        best = max(score for _, score in scored)
        return self._rng.choice([w for w, score in scored if score == best])


@register("decider", "always_remote")
class AlwaysRemote:
    name = "always_remote"

    def remote_prefill(self, request, decode, prefill_pool) -> bool:
        return True


@register("decider", "never_remote")
class NeverRemote:
    name = "never_remote"

    def remote_prefill(self, request, decode, prefill_pool) -> bool:
        return False
