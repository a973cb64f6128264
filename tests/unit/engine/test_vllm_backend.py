"""The parts of engine.vllm_backend that need no vLLM: the prefix-cache estimate behind a vLLM
worker's KV events, and the options' validation."""

import pytest

from engine.hashing import block_hashes
from engine.vllm_backend import PrefixEstimate, VllmOptions


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
