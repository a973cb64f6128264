"""Flags and environment of priority classes, tenant limits and batch jobs (read only by the
router's entry point, like services/common/worker_config.py for the workers)."""

import argparse
import os

from services.router.config import DEFAULT_BATCH_DB
from services.router.headroom import HeadroomRule
from services.router.tenants import TenantLimit, TenantPolicy


def add_priority_flags(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    g = p.add_argument_group("priority classes, tenants and batch jobs")
    g.add_argument("--batch-db", default=env("PDMESH_BATCH_DB", DEFAULT_BATCH_DB),
                   help=f"SQLite file holding batch jobs and results (default {DEFAULT_BATCH_DB})")
    g.add_argument("--batch-max-inflight", type=int, default=int(env("PDMESH_BATCH_MAX_INFLIGHT", "0")) or None,
                   help="batch requests take a slot only while fewer requests than this run (default max-inflight/2)")
    g.add_argument("--batch-job-concurrency", type=int, default=int(env("PDMESH_BATCH_JOB_CONCURRENCY", "32")),
                   help="items of one batch job in flight at once (running or queued at admission, so a "
                        "freed slot is refilled at once)")
    g.add_argument("--batch-max-kv-utilization", type=float,
                   default=float(env("PDMESH_BATCH_MAX_KV_UTILIZATION", "0.8")),
                   help="headroom: a decode worker's KV blocks used/total must be below this")
    g.add_argument("--batch-max-running-per-worker", type=int,
                   default=int(env("PDMESH_BATCH_MAX_RUNNING_PER_WORKER", "0")),
                   help="headroom: a decode worker must run fewer sequences than this "
                        "(default 0: its own max-num-seqs, from its load reports)")
    g.add_argument("--batch-max-prefill-queue-tokens", type=int,
                   default=int(env("PDMESH_BATCH_MAX_PREFILL_QUEUE_TOKENS", "1024")),
                   help="headroom: some prefill worker must have at most this many prompt tokens queued")
    g.add_argument("--tenant-max-concurrent", type=int, default=int(env("PDMESH_TENANT_MAX_CONCURRENT", "0")),
                   help="requests queued or running per tenant (0 = unlimited)")
    g.add_argument("--tenant-tokens-per-s", type=float, default=float(env("PDMESH_TENANT_TOKENS_PER_S", "0")),
                   help="admitted tokens (prompt + max_tokens) per second per tenant (0 = unlimited)")
    g.add_argument("--tenant-burst-s", type=float, default=float(env("PDMESH_TENANT_BURST_S", "1")),
                   help="token bucket size, in seconds of --tenant-tokens-per-s")
    g.add_argument("--tenant-limits", default=env("PDMESH_TENANT_LIMITS", ""),
                   help="JSON/YAML file of per-tenant overrides and fair-share weights: "
                        "{tenants: {NAME: {max_concurrent, tokens_per_s, burst_s, weight}}}")


def priority_fields(a: argparse.Namespace) -> dict:
    """RouterConfig fields from the parsed flags."""
    default = TenantLimit(max_concurrent=a.tenant_max_concurrent, tokens_per_s=a.tenant_tokens_per_s,
                          burst_s=a.tenant_burst_s)
    tenants = TenantPolicy.load(a.tenant_limits, default) if a.tenant_limits else TenantPolicy(default)
    headroom = HeadroomRule(max_kv_utilization=a.batch_max_kv_utilization,
                            max_running_per_worker=a.batch_max_running_per_worker,
                            max_prefill_queue_tokens=a.batch_max_prefill_queue_tokens)
    return dict(batch_db=a.batch_db, batch_max_inflight=a.batch_max_inflight, batch_headroom=headroom,
                tenants=tenants, batch_job_concurrency=a.batch_job_concurrency)
