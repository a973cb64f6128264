"""Descriptor splitting for NIXL's parallel copy threads."""

from kvtransfer.nixl_transport import split_runs


def test_split_runs_cuts_runs_into_pieces():
    assert split_runs([(0, 4, 5), (9, 1, 1)], 2) == [(0, 4, 2), (2, 6, 2), (4, 8, 1), (9, 1, 1)]
