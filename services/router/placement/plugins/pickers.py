"""Pickers (each returns the index of the chosen row of the pool).

- max_score: highest total score; ties broken at random (seedable).
- round_robin: the next worker in a fixed cycle over the candidates' ids, ignoring scores.
- random: a uniformly random candidate (seedable).
"""

import itertools
import random as _random

import numpy as np

from services.router.placement.registry import register


@register("picker", "max_score")
class MaxScorePicker:
    name = "max_score"

    def __init__(self, seed: int | None = None):
        self._rng = _random.Random(seed)

    def pick(self, request, pool, totals):
        return int(self._rng.choice(np.flatnonzero(totals >= totals.max() - 1e-12)))


@register("picker", "round_robin")
class RoundRobinPicker:
    name = "round_robin"

    def __init__(self):
        self._counter = itertools.count()

    def pick(self, request, pool, totals):
        in_id_order = sorted(range(len(pool)), key=pool.ids.__getitem__)
        return in_id_order[next(self._counter) % len(pool)]


@register("picker", "random")
class RandomPicker:
    name = "random"

    def __init__(self, seed: int | None = None):
        self._rng = _random.Random(seed)

    def pick(self, request, pool, totals):
        return self._rng.choice(range(len(pool)))
