"""RouterConfig: frozen, validated; filled from flags/env only in main.py."""

from dataclasses import dataclass, field

from services.router.headroom import HeadroomRule
from services.router.tenants import TenantPolicy

DEFAULT_BATCH_DB = "~/.local/share/pdmesh/batch.sqlite3"


@dataclass(frozen=True)
class RouterConfig:
    prefill_addresses: tuple[str, ...]
    decode_addresses: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 50051
    profile: str = "prefix_aware"
    max_model_len: int = 4096
    max_tokens_cap: int = 4096
    vocab_size: int = 262_144
    max_inflight: int = 64
    max_queued: int = 256
    ready_file: str | None = None
    startup_timeout_s: float = 120.0
    drain_grace_s: float = 30.0
    metrics_port: int | None = None  # Prometheus /metrics; 0 = any free port, None = off
    # Priority classes, tenants and batch jobs (README: "Priority classes and batch jobs").
    batch_max_inflight: int | None = None  # None: max_inflight // 2
    batch_headroom: HeadroomRule = field(default_factory=HeadroomRule)
    tenants: TenantPolicy = field(default_factory=TenantPolicy)
    batch_db: str = DEFAULT_BATCH_DB  # SQLite file of the BatchService's jobs and results
    batch_job_concurrency: int = 8  # items of one job in flight at once
    batch_max_items: int = 50_000  # items per job

    def __post_init__(self) -> None:
        if not self.decode_addresses:
            raise ValueError("at least one decode worker address is required (--decode host:port)")
        if self.max_tokens_cap <= 0 or self.max_model_len <= 1:
            raise ValueError("max_tokens_cap must be positive and max_model_len above 1")
        if self.batch_job_concurrency <= 0 or self.batch_max_items <= 0 or not self.batch_db:
            raise ValueError("batch_job_concurrency and batch_max_items must be positive and batch_db a path")
