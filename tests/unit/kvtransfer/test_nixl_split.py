"""Descriptor splitting for NIXL's parallel copy threads."""

from kvtransfer.nixl_transport import SPLIT_MIN_DESCRIPTORS, coalesced_runs, split_runs


def test_split_runs_cuts_runs_into_pieces():
    assert split_runs([(0, 4, 5), (9, 1, 1)], 2) == [(0, 4, 2), (2, 6, 2), (4, 8, 1), (9, 1, 1)]


def test_a_contiguous_handoff_is_cut_into_enough_descriptors_for_nixl_to_split_it():
    src, dst = list(range(128)), list(range(4, 132))
    assert coalesced_runs(src, dst, for_copy_threads=False) == [(0, 4, 128)]
    runs = coalesced_runs(src, dst, for_copy_threads=True)
    assert len(runs) >= SPLIT_MIN_DESCRIPTORS
    assert [(s + i, d + i) for s, d, n in runs for i in range(n)] == list(zip(src, dst))
    assert len(coalesced_runs(src[:8], dst[:8], for_copy_threads=True)) == 1  # too small to split anyway
