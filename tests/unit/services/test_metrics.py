"""Metric names agree between the services and the Grafana dashboard, and /metrics serves them."""

import json
import pathlib
import re
import urllib.request

from prometheus_client import CollectorRegistry, generate_latest

from services.common import metrics
from services.common.worker_state import WorkerSnapshot

DASHBOARD = pathlib.Path(__file__).parents[3] / "deploy" / "observability" / "grafana-dashboard.json"


class Hub:
    snapshot = WorkerSnapshot(waiting=3, running=2, kv_blocks_used=40, kv_blocks_total=100, queued_prefill_tokens=512,
                              prompt_tokens_computed=900, prompt_tokens_cached=100, generated_tokens=77, steps=50,
                              prompt_only_steps=4, step_cost=(0.003, 0.0011, 0.00001))


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    registry.register(metrics.WorkerCollector("decode", "decode-0", Hub()))
    text = generate_latest(registry).decode() + generate_latest().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("pdmesh_")} | {
        m.describe()[0].name + suffix for m in (metrics.TTFT, metrics.ITL, metrics.E2E, metrics.ROUTER_QUEUE, metrics.KV_SECONDS)
        for suffix in ("_bucket", "_count", "_sum")} | {
        m.describe()[0].name + "_total" for m in (metrics.REQUESTS, metrics.ROUTING, metrics.ROUTER_PROMPT_TOKENS, metrics.KV_BYTES,
                                    metrics.KV_FAILURES)}


def test_worker_collector_reads_the_snapshot():
    registry = CollectorRegistry()
    registry.register(metrics.WorkerCollector("decode", "decode-0", Hub()))
    text = generate_latest(registry).decode()
    assert 'pdmesh_queue_depth{service="decode",worker_id="decode-0"} 3.0' in text
    assert 'pdmesh_kv_blocks_used{service="decode",worker_id="decode-0"} 40.0' in text
    assert 'pdmesh_prompt_tokens_total{service="decode",worker_id="decode-0"} 1000.0' in text
    assert 'pdmesh_prompt_tokens_cached_total{service="decode",worker_id="decode-0"} 100.0' in text
    assert 'pdmesh_engine_prompt_only_steps_total{service="decode",worker_id="decode-0"} 4.0' in text
    assert 'pdmesh_engine_step_cost_seconds{service="decode",term="fixed",worker_id="decode-0"} 0.003' in text


def test_every_dashboard_query_uses_metrics_we_export():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bpdmesh_[a-z_]+", expr)}
    assert used, "the dashboard queries nothing"
    assert used <= exported_names(), f"dashboard uses unknown metrics: {sorted(used - exported_names())}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_metrics_server_serves_on_a_free_port():
    metrics.REQUESTS.labels("router", "Generate", "OK").inc()
    port = metrics.start_metrics_server(0, "127.0.0.1")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'pdmesh_requests_total{code="OK",method="Generate",service="router"}' in body
    assert "_created" not in body
    assert metrics.start_metrics_server(None) is None


def test_router_collector_reports_admission_and_batch_jobs(tmp_path):
    import asyncio

    from services.router.admission import Admission
    from services.router.batch.store import BatchStore

    store = BatchStore(str(tmp_path / "batch.sqlite3"))
    running_job = store.create_job("acme", [("a", b""), ("b", b"")], {}).job_id
    store.create_job("acme", [("c", b"")], {})
    store.mark_running(running_job)
    collector = metrics.RouterCollector()
    collector.attach_batch_store(store.job_counts)
    registry = CollectorRegistry()
    registry.register(collector)

    async def scenario():
        admission = Admission(max_inflight=1, max_queued=8)
        collector.attach_admission(admission)
        async with admission.admit("interactive"):
            waiting = asyncio.create_task(_admitted(admission, "batch"))
            await asyncio.sleep(0.01)
            text = generate_latest(registry).decode()
        await waiting
        return text

    text = asyncio.run(scenario())
    store.close()
    assert 'pdmesh_router_requests{priority="interactive",state="running"} 1.0' in text
    assert 'pdmesh_router_requests{priority="batch",state="queued"} 1.0' in text
    assert 'pdmesh_router_requests{priority="batch",state="running"} 0.0' in text
    assert 'pdmesh_batch_jobs{status="queued"} 1.0' in text and 'pdmesh_batch_jobs{status="running"} 1.0' in text


async def _admitted(admission, priority):
    async with admission.admit(priority):
        pass
