"""Host KV pools: huge-page advice must not change what the pool is (shape, dtype, zeros, contiguity)."""

import sys

import pytest
import torch

from engine.kv_pool import advise_huge_pages, allocate_host_pool


def test_host_pool_is_contiguous_float32_zeros():
    pool = allocate_host_pool((9, 18, 2, 16, 1, 256))
    assert pool.shape == (9, 18, 2, 16, 1, 256) and pool.dtype == torch.float32
    assert pool.is_contiguous() and pool.device.type == "cpu"
    assert not pool.any()


def test_huge_page_advice_needs_a_2mib_aligned_interior():
    assert not advise_huge_pages(torch.zeros(1024))  # 4 KiB: no whole huge page inside


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux")
def test_huge_page_advice_is_accepted_on_a_large_pool():
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages here")
    if "[never]" in mode:
        pytest.skip("transparent huge pages disabled")
    assert advise_huge_pages(torch.empty(8 << 20))  # 32 MiB

