"""The KV really crosses from the vLLM prefill worker to the vLLM decode worker through the router:
the decode worker's own vLLM counters (prompt tokens by source, NIXL bytes read; from its /metrics)
say every prompt token came from the KV transfer and none was computed there; ours agree. A repeated
prompt is then served from the prefill worker's vLLM prefix cache. Marked `vllm` (one mesh per
session, tests/e2e/conftest.py: vllm_mesh).
"""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from pdmesh.v1 import common_pb2
from tests.e2e.test_mesh import _load_report, generate
from tests.e2e.vllm_env import VLLM_MARKS

pytestmark = VLLM_MARKS

# ~330 tokens: two full vLLM blocks (128 tokens on this build) and a partial one.
LONG_PROMPT = "Paged attention stores the KV cache in fixed-size blocks. " * 25 + "The capital of France is"


def _vllm_counters(process) -> dict[str, float]:
    """vLLM's own counters as the worker's /metrics serves them: prompt tokens by source (keyed
    by source) and the NIXL bytes this worker read (key "nixl_bytes")."""
    body = urllib.request.urlopen(f"http://{process.info['metrics_address']}/metrics", timeout=10).read().decode()
    counters = {"nixl_bytes": 0.0}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "vllm:prompt_tokens_by_source_total":
                counters[sample.labels["source"]] = sample.value
            elif sample.name == "vllm:nixl_bytes_transferred_sum":
                counters["nixl_bytes"] += sample.value
    return counters


def _delta(after: dict, before: dict) -> dict:
    return {key: after[key] - before.get(key, 0.0) for key in after}


def test_decode_worker_takes_the_whole_prompt_from_the_transfer(vllm_mesh, vllm_router):
    decode, prefill = vllm_mesh.workers("decode")[0], vllm_mesh.workers("prefill")[0]
    vllm_before, ours_before = _vllm_counters(decode), _load_report(decode.info["address"])
    prefill_before = _load_report(prefill.info["address"])
    messages = generate(vllm_router, text="A different preamble so nothing is cached. " + LONG_PROMPT, max_tokens=8)
    num_prompt = messages[-1].usage.prompt_tokens
    counted = _delta(_vllm_counters(decode), vllm_before)
    print("decode worker, vLLM counters moved by", counted, "for", messages[-1].usage.prompt_tokens, "prompt tokens")
    ours = _load_report(decode.info["address"])
    prefill_after = _load_report(prefill.info["address"])
    assert num_prompt > 256
    assert messages[-1].placement.kv_transport == "vllm-nixl"
    assert counted["external_kv_transfer"] == num_prompt, counted
    assert counted["local_compute"] == 0, f"the decode worker recomputed the prompt: {counted}"
    # fp32 KV of 18 layers x (K, V) x 1 head x 256 dims per token, read in whole 128-token blocks
    assert counted["nixl_bytes"] >= num_prompt * 18 * 2 * 256 * 4, counted
    assert ours.prompt_tokens_computed_total == ours_before.prompt_tokens_computed_total
    assert prefill_after.prompt_tokens_computed_total - prefill_before.prompt_tokens_computed_total == num_prompt
    assert [t for m in messages for t in m.token_ids], "no tokens streamed"


def test_repeated_prompt_is_served_from_the_prefill_workers_vllm_cache(vllm_mesh, vllm_router):
    prefill = vllm_mesh.workers("prefill")[0]
    first = generate(vllm_router, text=LONG_PROMPT, max_tokens=4)
    before = _load_report(prefill.info["address"])
    again = generate(vllm_router, text=LONG_PROMPT, max_tokens=4)
    after = _load_report(prefill.info["address"])
    num_prompt = again[-1].usage.prompt_tokens
    cached = after.prompt_tokens_cached_total - before.prompt_tokens_cached_total
    assert cached + after.prompt_tokens_computed_total - before.prompt_tokens_computed_total == num_prompt
    assert again[-1].usage.cached_prompt_tokens == cached >= num_prompt - 128
    assert [t for m in again for t in m.token_ids] == [t for m in first for t in m.token_ids]
    assert again[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
