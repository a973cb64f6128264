"""Scorers, each in [0, 1], higher is better. Formulas:

- prefix_overlap: prefix_blocks / prompt_blocks — the share of the prompt's full blocks the
  worker already holds (0 for a prompt shorter than one block).
- queue_depth: (max_q - q) / (max_q - min_q) over the candidates, q = max(waiting + running
  sequences reported minus this router's requests that ended since, this router's requests in
  flight there); 1 for everyone when all equal.
- kv_utilization: 1 - kv_blocks_used / kv_blocks_total (1 before the first load report).
- queued_prefill_tokens: (max_t - t) / (max_t - min_t) over the candidates, t = max(queued
  prompt tokens reported, prompt tokens of this router's prefills in flight); 1 when all equal.
"""

from services.router.placement.registry import register


def _lower_is_better(workers, values: list[float]) -> dict[str, float]:
    """values[i] belongs to workers[i]; the lowest scores 1, the highest 0, linear between.
    (Plain lists and one dict: scorers run over every candidate of a pool, per request.)"""
    lo, hi = min(values), max(values)
    if hi == lo:
        return dict.fromkeys([w.worker_id for w in workers], 1.0)
    span = hi - lo
    return {w.worker_id: (hi - v) / span for w, v in zip(workers, values)}


@register("scorer", "prefix_overlap")
class PrefixOverlapScorer:
    name = "prefix_overlap"
    uses_prefix_index = True

    def score(self, request, workers):
        blocks = len(request.block_hashes)
        per_block = 1.0 / blocks if blocks else 0.0
        return {w.worker_id: w.prefix_blocks * per_block for w in workers}


@register("scorer", "queue_depth")
class QueueDepthScorer:
    name = "queue_depth"

    def score(self, request, workers):
        return _lower_is_better(workers, [w.load.queue_depth for w in workers])


@register("scorer", "kv_utilization")
class KvUtilizationScorer:
    name = "kv_utilization"

    def score(self, request, workers):
        return {w.worker_id: (1.0 - load.kv_blocks_used / load.kv_blocks_total if load.kv_blocks_total else 1.0)
                for w in workers for load in (w.load,)}


@register("scorer", "queued_prefill_tokens")
class QueuedPrefillTokensScorer:
    name = "queued_prefill_tokens"

    def score(self, request, workers):
        return _lower_is_better(workers, [w.load.pending_prefill_tokens for w in workers])
