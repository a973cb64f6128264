"""The parts of the vLLM backend that need no vLLM: the prefix-cache estimate behind a vLLM
worker's KV events, the options' validation (and how a worker's flags size its KV cache), and the handle a vLLM prefill worker lends."""

import argparse
from unittest import mock

import pytest

from engine.hashing import block_hashes
from engine.vllm_backend import PrefixEstimate, VllmOptions, kv_cache_bytes
from services.common.worker_config import add_worker_flags, worker_config_from_args


def test_served_prompt_publishes_our_hashes_once():
    estimate = PrefixEstimate(block_size=4, capacity_blocks=10)
    prompt = list(range(10))  # two full blocks and a partial one
    estimate.served(prompt)
    estimate.served(prompt)
    assert estimate.drain() == [("stored", tuple(block_hashes(prompt, 4)))]
    assert estimate.hashes() == block_hashes(prompt, 4)
    assert estimate.drain() == []


def test_oldest_blocks_are_removed_past_capacity():
    estimate = PrefixEstimate(block_size=4, capacity_blocks=3)
    first, second = list(range(8)), list(range(100, 108))
    estimate.served(first)
    estimate.served(first[:4])  # touches the first block: the second is now the oldest
    estimate.served(second)
    events = estimate.drain()
    assert events[-1] == ("removed", (block_hashes(first, 4)[1],))
    assert len(estimate.hashes()) == 3 and block_hashes(first, 4)[0] in estimate.hashes()


def test_options_reject_a_bad_memory_share():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VllmOptions(gpu_memory_utilization=0.0)


@pytest.mark.parametrize("fields", [dict(kv_connector="lmcache"), dict(side_channel_port=70000),
                                    dict(kv_lease_s=0), dict(kv_cache_bytes=-1)])
def test_options_reject_a_bad_connector_setting(fields):
    with pytest.raises(ValueError):
        VllmOptions(**fields)


def test_vllm_lender_carries_vllms_parameters_unread():
    import json
    import time

    from kvtransfer.handle import KvHandle
    from kvtransfer.layout import KvLayout
    from services.prefill.vllm_lender import VllmLender
    params = {"do_remote_prefill": True, "remote_block_ids": [[7, 8, 9]], "remote_host": "10.0.0.5",
              "remote_port": 5601, "remote_engine_id": "e1", "remote_request_id": "r1"}
    layout = KvLayout("gemma", "float32", 128, 18, 1, 256)
    handle = VllmLender("prefill-0", layout, lease_s=30).lend("r1", params, num_tokens=300)
    assert handle.transports == ("vllm-nixl",) and handle.block_ids == () and handle.num_tokens == 300
    assert json.loads(handle.engine_kv_params) == params
    assert handle.transfer_address == "10.0.0.5:5601"
    assert 0 < handle.lease_expires_unix_ms / 1000 - time.time() <= 30
    assert KvHandle.from_proto(handle.to_proto()) == handle


@pytest.mark.parametrize("flags, env, expected", [
    # the default: the builtin engine's KV size, --num-blocks x --block-size tokens of Gemma-3-270M
    (["--num-blocks", "256", "--block-size", "16"], {}, 256 * 16 * 18 * 2 * 256 * 4),
    (["--vllm-kv-cache-bytes", "0"], {}, 0),  # 0: vLLM sizes it by --vllm-gpu-memory-utilization
    ([], {"PDMESH_VLLM_KV_CACHE_BYTES": "1000000"}, 1_000_000),
])
def test_a_vllm_workers_kv_cache_is_sized_in_bytes_not_by_the_memory_free_at_start(flags, env, expected):
    with mock.patch.dict("os.environ", env):
        parser = argparse.ArgumentParser()
        add_worker_flags(parser)
        config = worker_config_from_args("decode", parser.parse_args(["--engine", "vllm", *flags]))
    assert kv_cache_bytes(config.engine, config.vllm) == expected
