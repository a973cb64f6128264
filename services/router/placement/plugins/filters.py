"""Filters (each returns a keep-mask over the pool).

- healthy: keep workers whose state stream is up.
- has_capacity: keep workers with KV room and a short queue:
  kv_blocks_used / kv_blocks_total < max_kv_utilization and waiting <= max_waiting.
  A worker that has not reported its load yet (total 0) passes.
"""


from services.router.placement.registry import register


@register("filter", "healthy")
class HealthyFilter:
    name = "healthy"

    def filter(self, request, pool):
        return pool.healthy


@register("filter", "has_capacity")
class HasCapacityFilter:
    name = "has_capacity"

    def __init__(self, max_kv_utilization: float = 0.95, max_waiting: int = 64):
        if not 0 < max_kv_utilization <= 1 or max_waiting < 0:
            raise ValueError("has_capacity: max_kv_utilization must be in (0, 1] and max_waiting >= 0")
        self.max_kv_utilization, self.max_waiting = max_kv_utilization, max_waiting

    def filter(self, request, pool):
        return (pool.waiting <= self.max_waiting) & (pool.kv_utilization < self.max_kv_utilization)
