"""RouterConfig: frozen, validated; filled from flags/env only in main.py."""

from dataclasses import dataclass, field

from services.common.tls import TlsConfig
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
    # Where the workers are: "static" (the address lists above), "dns" (one headless Service
    # name:port per pool, re-resolved every dns_interval_s) or "kubernetes" (EndpointSlices matching a
    # label selector per pool in `namespace`, watched; the slice port named endpoint_port_name).
    discovery: str = "static"
    prefill_dns: str = ""
    decode_dns: str = ""
    dns_interval_s: float = 5.0
    prefill_selector: str = ""
    decode_selector: str = ""
    namespace: str = ""
    endpoint_port_name: str = "grpc"
    # OpenAI-compatible HTTP front (services/router/http_front.py); http_port None = off, 0 = any free port.
    http_host: str = "127.0.0.1"
    http_port: int | None = 8000
    api_keys: tuple[str, ...] = ()
    served_model_name: str = "gemma-3-270m"
    chat_template: str | None = None
    prompt_cache_tokens: int = 1 << 20  # the prefix token cache's size in token ids; 0 = off
    # YAML/JSON file mapping API key -> tenant (services/router/auth.py); keys guard gRPC and HTTP alike.
    api_keys_file: str | None = None
    tls: TlsConfig | None = None  # mutual TLS on the gRPC server and the worker channels; None = plaintext
    # Priority classes, tenants and batch jobs (README: "Priority classes and batch jobs").
    batch_max_inflight: int | None = None  # None: max_inflight // 2
    batch_headroom: HeadroomRule = field(default_factory=HeadroomRule)
    tenants: TenantPolicy = field(default_factory=TenantPolicy)
    batch_db: str = DEFAULT_BATCH_DB  # SQLite file of the BatchService's jobs and results
    batch_job_concurrency: int = 32  # items of one job in flight at once (running or queued)
    batch_max_items: int = 50_000  # items per job

    def __post_init__(self) -> None:
        need = {"static": ("decode_addresses", "--decode host:port"),
                "dns": ("decode_dns", "--decode-dns name:port"),
                "kubernetes": ("decode_selector", "--decode-selector kubernetes.io/service-name=NAME")}
        if self.discovery not in need:
            raise ValueError(f"unknown discovery {self.discovery!r}; known: {sorted(need)}")
        field_name, flag = need[self.discovery]
        if not getattr(self, field_name):
            raise ValueError(f"{self.discovery} discovery needs the decode pool: {flag}")
        if self.dns_interval_s <= 0:
            raise ValueError("dns_interval_s must be positive")
        if self.max_tokens_cap <= 0 or self.max_model_len <= 1:
            raise ValueError("max_tokens_cap must be positive and max_model_len above 1")
        if self.batch_job_concurrency <= 0 or self.batch_max_items <= 0 or not self.batch_db:
            raise ValueError("batch_job_concurrency and batch_max_items must be positive and batch_db a path")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in 0..65535 (0 = any free port) or None (off), got {self.http_port}")
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")

    @property
    def has_prefill_pool(self) -> bool:
        """Whether a prefill pool is configured at all (without one, decode workers prefill locally)."""
        return bool({"static": self.prefill_addresses, "dns": self.prefill_dns,
                     "kubernetes": self.prefill_selector}[self.discovery])
