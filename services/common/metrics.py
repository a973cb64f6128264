"""Prometheus metrics of every pdmesh service, served on `/metrics` (`--metrics-port`).

One module defines every metric so names, labels and buckets agree across services and with
the Grafana dashboard (deploy/observability/grafana-dashboard.json). Each process serves only
the ones it touches; the `service` label says which role reported a series. Worker gauges
(queue depth, KV blocks, token counters) are read from the worker's published snapshot at
scrape time, so the engine thread does no extra work for them.

Prefix hit rate = rate(pdmesh_prompt_tokens_cached_total) / rate(pdmesh_prompt_tokens_total).
"""

import logging

from prometheus_client import Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, REGISTRY

log = logging.getLogger(__name__)
disable_created_metrics()  # `_created` series double the output and no dashboard reads them

# Latency buckets from 5 ms to 60 s: TTFT on a CPU model spans milliseconds to seconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter("pdmesh_requests", "Finished RPCs by outcome (gRPC status code name)", ["service", "method", "code"])
TTFT = Histogram("pdmesh_ttft_seconds", "Time to first token seen by the router", ["priority"],
                 buckets=_LATENCY_BUCKETS)
ITL = Histogram("pdmesh_itl_seconds", "Inter-token latency seen by the router", ["priority"], buckets=_ITL_BUCKETS)
E2E = Histogram("pdmesh_request_seconds", "Whole-request latency seen by the router", ["priority"],
                buckets=_LATENCY_BUCKETS)
ROUTER_QUEUE = Histogram("pdmesh_router_queue_seconds", "Admission queue wait in the router", ["priority"],
                         buckets=_LATENCY_BUCKETS)
ROUTING = Counter("pdmesh_routing_decisions", "Placement outcomes (remote_prefill, local_prefill, rejected)",
                  ["decision"])
FAILOVERS = Counter("pdmesh_failovers", "Requests moved off a worker that went away, by phase", ["phase"])
ROUTER_PROMPT_TOKENS = Counter("pdmesh_router_prompt_tokens", "Prompt tokens of finished requests", ["cached"])
PROMPT_TEXT_CHARS = Counter("pdmesh_router_prompt_text_chars", "Characters of long text prompts, by where their "
                            "token ids came from (cache: the prefix token cache; tokenized)", ["source"])
KV_BYTES = Counter("pdmesh_kv_transfer_bytes", "KV bytes pulled into this decode worker", ["transport"])
KV_SECONDS = Histogram("pdmesh_kv_transfer_seconds", "KV pull duration (handshake, bytes, verify)", ["transport"],
                       buckets=_LATENCY_BUCKETS)
KV_FAILURES = Counter("pdmesh_kv_transfer_failures", "KV pulls that failed, by transport and reason",
                      ["transport", "reason"])
BATCH_ITEMS = Counter("pdmesh_batch_items", "Batch job items with a stored result, by outcome (ok, failed)",
                      ["outcome"])
BATCH_TOKENS = Counter("pdmesh_batch_tokens", "Tokens of stored batch results (prompt, completion)", ["kind"])


def start_metrics_server(port: int | None, host: str = "0.0.0.0") -> int | None:
    """Serve /metrics on port (0 = any free port). None disables. Returns the bound port."""
    if port is None or port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_port
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


class WorkerCollector:
    """Worker gauges and counters from the hub's latest snapshot, read at scrape time."""

    def __init__(self, role: str, worker_id: str, hub):
        self._labels, self._hub = [role, worker_id], hub

    def collect(self):
        s = self._hub.snapshot
        names = ["service", "worker_id"]
        for name, help_text, value in (
                ("pdmesh_queue_depth", "Sequences waiting for a batch slot", s.waiting),
                ("pdmesh_running_sequences", "Sequences in the running batch", s.running),
                ("pdmesh_kv_blocks_used", "KV blocks referenced by requests (cached, reusable blocks count as free)", s.kv_blocks_used),
                ("pdmesh_kv_blocks_total", "KV blocks in the pool", s.kv_blocks_total),
                ("pdmesh_queued_prefill_tokens", "Prompt tokens waiting to be computed", s.queued_prefill_tokens)):
            gauge = GaugeMetricFamily(name, help_text, labels=names)
            gauge.add_metric(self._labels, value)
            yield gauge
        for name, help_text, value in (
                ("pdmesh_prompt_tokens", "Prompt tokens admitted (computed + cached)",
                 s.prompt_tokens_computed + s.prompt_tokens_cached),
                ("pdmesh_prompt_tokens_cached", "Prompt tokens served from the prefix cache", s.prompt_tokens_cached),
                ("pdmesh_generated_tokens", "Tokens generated", s.generated_tokens),
                ("pdmesh_engine_steps", "Engine steps run", s.steps),
                ("pdmesh_engine_prompt_only_steps", "Steps that computed prompts while running sequences waited "
                 "to decode (prompts first)", s.prompt_only_steps)):
            counter = CounterMetricFamily(name, help_text, labels=names)
            counter.add_metric(self._labels, value)
            yield counter
        if s.step_cost is not None:
            gauge = GaugeMetricFamily("pdmesh_engine_step_cost_seconds", "The engine's fit of a step's wall time: "
                                      "fixed + per_sequence x sequences + per_token x tokens", labels=[*names, "term"])
            for term, value in zip(("fixed", "per_sequence", "per_token"), s.step_cost):
                gauge.add_metric([*self._labels, term], value)
            yield gauge


def register_worker(role: str, worker_id: str, hub) -> None:
    REGISTRY.register(WorkerCollector(role, worker_id, hub))


class LeaseCollector:
    """pdmesh_kv_leases: KV leases a prefill worker holds for decode workers (0 when idle)."""

    def __init__(self, worker_id: str, leases):
        self._labels, self._leases = ["prefill", worker_id], leases

    def collect(self):
        gauge = GaugeMetricFamily("pdmesh_kv_leases", "KV leases held for pullers (released or expired: gone)",
                                  labels=["service", "worker_id"])
        gauge.add_metric(self._labels, len(self._leases))
        yield gauge


class RouterCollector:
    """pdmesh_router_requests (admission: requests queued / running, by priority) and
    pdmesh_batch_jobs (batch jobs by status, from the store), read at scrape time from the
    router attached last (one router per process; nothing before one is attached)."""

    def __init__(self):
        self._admission, self._job_counts = None, None

    def attach_admission(self, admission) -> None:
        """services.router.admission.Admission: queued_by_class(priority), inflight_by_class."""
        self._admission = admission

    def attach_batch_store(self, job_counts) -> None:
        """`job_counts()`: batch job status -> number of jobs (any thread)."""
        self._job_counts = job_counts

    def collect(self):
        if self._admission is not None:
            gauge = GaugeMetricFamily("pdmesh_router_requests", "Requests in the router's admission, by priority "
                                      "class and state (queued, running)", labels=["priority", "state"])
            for priority, running in self._admission.inflight_by_class.items():
                gauge.add_metric([priority, "queued"], self._admission.queued_by_class(priority))
                gauge.add_metric([priority, "running"], running)
            yield gauge
        if self._job_counts is not None:
            gauge = GaugeMetricFamily("pdmesh_batch_jobs", "Batch jobs in the store, by status", labels=["status"])
            for status, count in sorted(self._job_counts().items()):
                gauge.add_metric([status], count)
            yield gauge


ROUTER = RouterCollector()
REGISTRY.register(ROUTER)


def register_leases(worker_id: str, leases) -> None:
    """Serve the size of a kvtransfer LeaseTable as pdmesh_kv_leases."""
    REGISTRY.register(LeaseCollector(worker_id, leases))
