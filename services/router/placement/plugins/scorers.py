"""Scorers, each in [0, 1], higher is better; each returns one score per row of the pool. Formulas:

- prefix_overlap: prefix_blocks / prompt_blocks — the share of the prompt's full blocks the
  worker already holds (0 for a prompt shorter than one block).
- queue_depth: (max_q - q) / (max_q - min_q) over the candidates, q = max(waiting + running
  sequences reported minus this router's requests that ended since, this router's requests in
  flight there); 1 for everyone when all equal.
- kv_utilization: 1 - kv_blocks_used / kv_blocks_total (1 before the first load report).
- queued_prefill_tokens: (max_t - t) / (max_t - min_t) over the candidates, t = max(queued
  prompt tokens reported, prompt tokens of this router's prefills in flight); 1 when all equal.
"""

import numpy as np

from services.router.placement.registry import register


def _lower_is_better(values: np.ndarray) -> np.ndarray:
    """The lowest value scores 1, the highest 0, linear between; all 1 when all equal."""
    lo, hi = values.min(), values.max()
    if hi == lo:
        return np.ones(len(values))
    return (hi - values) / (hi - lo)


@register("scorer", "prefix_overlap")
class PrefixOverlapScorer:
    name = "prefix_overlap"
    uses_prefix_index = True

    def score(self, request, pool):
        blocks = len(request.block_hashes)
        return pool.prefix_blocks * (1.0 / blocks if blocks else 0.0)


@register("scorer", "queue_depth")
class QueueDepthScorer:
    name = "queue_depth"

    def score(self, request, pool):
        return _lower_is_better(pool.queue_depth)


@register("scorer", "kv_utilization")
class KvUtilizationScorer:
    name = "kv_utilization"

    def score(self, request, pool):
        return 1.0 - pool.kv_utilization


@register("scorer", "queued_prefill_tokens")
class QueuedPrefillTokensScorer:
    name = "queued_prefill_tokens"

    def score(self, request, pool):
        return _lower_is_better(pool.pending_prefill_tokens)
