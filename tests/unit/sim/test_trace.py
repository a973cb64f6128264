"""The trace reader, synthetic generators and scaling."""

import pytest

from sim.trace import (
    MOONCAKE_TRACE,
    no_reuse,
    read_mooncake,
    reuse_unbounded,
    scale_time,
    shared_prefix,
)


@pytest.mark.skipif(not MOONCAKE_TRACE.exists(), reason="shared/data trace not present")
def test_mooncake_conversation_trace_unbounded_reuse_is_the_published_36_6_percent():
    requests = read_mooncake()
    assert len(requests) == 12_031
    assert reuse_unbounded(requests) == pytest.approx(0.366, abs=0.005)
    assert requests[-1].arrival_s == pytest.approx(3537.0, abs=1.0)  # about 59 minutes
    first = requests[0]
    assert first.block_size == 512 and len(first.block_hashes) == first.prompt_tokens // 512


def test_reuse_counts_ids_seen_in_earlier_requests():
    reqs = shared_prefix(groups=2, per_group=3, shared_tokens=1024, unique_tokens=512, output_tokens=4,
                         rate_per_s=1.0)
    # 6 prompts of 3 blocks; each group's later 2 prompts reuse 2 shared blocks: 8 of 18.
    assert reuse_unbounded(reqs) == pytest.approx(8 / 18)
    assert reuse_unbounded(no_reuse(20, 1.0, 2048, 4)) == 0.0


def test_rate_and_time_scaling():
    reqs = no_reuse(50, 2.0, 1024, 4, seed=3)
    faster = scale_time(reqs, rate_scale=4.0)
    assert faster[-1].arrival_s == pytest.approx(reqs[-1].arrival_s / 4)
    assert scale_time(reqs, time_scale=2.0)[10].arrival_s == pytest.approx(2 * reqs[10].arrival_s)
    with pytest.raises(ValueError):
        scale_time(reqs, rate_scale=0)


def test_generators_are_seeded():
    a = shared_prefix(3, 4, 1024, 512, 8, 5.0, seed=7)
    assert a == shared_prefix(3, 4, 1024, 512, 8, 5.0, seed=7)
    assert a != shared_prefix(3, 4, 1024, 512, 8, 5.0, seed=8)
