"""Per-tenant limits: concurrent requests and admitted tokens per second, checked on arrival.

Definitions (what a client is charged for):
- concurrent requests: the tenant's requests queued or running in this router, all classes;
- tokens per second: *admitted tokens* = prompt tokens + max_tokens of each request accepted,
  charged when it is accepted (as OpenAI counts max_tokens against its token limits), from a
  token bucket refilled at `tokens_per_s` up to `tokens_per_s * burst_s`. A request is accepted
  while the bucket is not in debt and then charged in full, so a request larger than the bucket
  still runs once, and the tenant waits out the debt afterwards.
Over a limit: ResourceExhausted naming the limit, with `retry_after_s` (the time until the bucket
is out of debt, or a short hint for concurrency). A limit of 0 means unlimited.
The same policy gives each tenant its fair-share weight (services/router/fair_queue.py).
"""

import functools
import pathlib
import time
from dataclasses import dataclass, field

import yaml

from services.common.errors import ResourceExhausted

CONCURRENCY_RETRY_S = 0.5


@dataclass(frozen=True)
class TenantLimit:
    max_concurrent: int = 0  # 0 = unlimited
    tokens_per_s: float = 0.0  # 0 = unlimited
    burst_s: float = 1.0  # bucket size in seconds of tokens_per_s
    weight: float = 1.0  # fair-share weight of the tenant's work

    def __post_init__(self) -> None:
        if self.max_concurrent < 0 or self.tokens_per_s < 0 or self.burst_s <= 0 or self.weight <= 0:
            raise ValueError("tenant limit: max_concurrent and tokens_per_s must be >= 0 (0 = unlimited), "
                             "burst_s and weight > 0")


@dataclass(frozen=True)
class TenantPolicy:
    default: TenantLimit = field(default_factory=TenantLimit)
    overrides: tuple[tuple[str, TenantLimit], ...] = ()

    @functools.cached_property
    def _by_tenant(self) -> dict[str, TenantLimit]:
        return dict(self.overrides)

    def limit_for(self, tenant: str) -> TenantLimit:
        return self._by_tenant.get(tenant, self.default)

    @staticmethod
    def load(path: str, default: TenantLimit) -> "TenantPolicy":
        """Reads per-tenant overrides from a JSON or YAML file:
        `{"tenants": {"acme": {"max_concurrent": 8, "tokens_per_s": 2000, "weight": 2}}}`;
        fields a tenant leaves out take the default's value."""
        data = yaml.safe_load(pathlib.Path(path).read_text()) or {}  # YAML is a superset of JSON, as in auth.py
        tenants = data.get("tenants", {}) if isinstance(data, dict) else None
        if not isinstance(tenants, dict):
            raise ValueError(f"{path}: expected {{\"tenants\": {{NAME: {{max_concurrent, tokens_per_s, burst_s, weight}}}}}}")
        known = set(TenantLimit.__dataclass_fields__)
        overrides = []
        for name, values in tenants.items():
            unknown = set(values or {}) - known
            if unknown:
                raise ValueError(f"{path}: tenant {name!r}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
            overrides.append((str(name), TenantLimit(**{**default.__dict__, **(values or {})})))
        return TenantPolicy(default, tuple(overrides))


class _Bucket:
    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity, self.level, self.at = rate, capacity, capacity, now

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        return self.level


class TenantLimiter:
    def __init__(self, policy: TenantPolicy, clock=time.monotonic):
        self.policy, self._clock = policy, clock
        self._active: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    def weight(self, tenant: str) -> float:
        return self.policy.limit_for(tenant).weight

    def active(self, tenant: str) -> int:
        return self._active.get(tenant, 0)

    def acquire(self, tenant: str, tokens: int) -> None:
        """Accepts one request of `tokens` admitted tokens or raises ResourceExhausted; pair with release()."""
        limit, who = self.policy.limit_for(tenant), tenant or "(default)"
        if limit.max_concurrent and self.active(tenant) >= limit.max_concurrent:
            raise ResourceExhausted(f"tenant {who} is at its limit of {limit.max_concurrent} concurrent requests; "
                                    f"retry after {CONCURRENCY_RETRY_S:.1f} s or when one of them finishes",
                                    retry_after_s=CONCURRENCY_RETRY_S)
        if limit.tokens_per_s:
            now = self._clock()
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = _Bucket(limit.tokens_per_s, limit.tokens_per_s * limit.burst_s, now)
            if bucket.refill(now) <= 0:
                wait = -bucket.level / bucket.rate + 0.01
                raise ResourceExhausted(f"tenant {who} is over its limit of {limit.tokens_per_s:g} tokens/s "
                                        f"(prompt + max_tokens); retry after {wait:.2f} s", retry_after_s=wait)
            bucket.level -= tokens
        self._active[tenant] = self.active(tenant) + 1

    def release(self, tenant: str) -> None:
        left = self._active.get(tenant, 0) - 1
        if left > 0:
            self._active[tenant] = left
        else:
            self._active.pop(tenant, None)
