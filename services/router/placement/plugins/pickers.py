"""Pickers.

- max_score: highest total score; ties broken at random (seedable).
- round_robin: the next worker in a fixed cycle over the candidates' ids, ignoring scores.
- random: a uniformly random candidate (seedable).
"""

import itertools
import random as _random

from services.router.placement.registry import register


@register("picker", "max_score")
class MaxScorePicker:
    name = "max_score"

    def __init__(self, seed: int | None = None):
        self._rng = _random.Random(seed)

    def pick(self, request, scored):
        best = max(score for _, score in scored)
        return self._rng.choice([w for w, score in scored if score >= best - 1e-12])


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
