import numpy as np
import pytest
import torch
import xxhash

from kvtransfer.checksum import block_checksums, mismatched_positions


def _pool(num_blocks=8, seed=0):
    return torch.rand((num_blocks, 2, 2, 4, 1, 8), generator=torch.Generator().manual_seed(seed))


def test_matches_xxh3_of_a_copy_of_each_block():
    pool = _pool()
    expected = [xxhash.xxh3_64_intdigest(pool[b].numpy().tobytes()) for b in (5, 0, 3)]
    assert block_checksums(pool, [5, 0, 3]) == expected


@pytest.mark.parametrize("byte_index", [0, 17, 255])
def test_single_flipped_byte_is_detected_in_its_block_only(byte_index):
    pool = _pool()
    before = block_checksums(pool, list(range(8)))
    raw = pool.view(-1).view(torch.uint8)
    block_bytes = raw.numel() // 8
    raw[4 * block_bytes + byte_index] ^= 0x01
    assert mismatched_positions(block_checksums(pool, list(range(8))), before) == [4]


def test_parallel_path_equals_serial_path():
    pool = torch.rand((40, 18, 2, 16, 1, 64))  # 40 x 147 KiB > parallel threshold
    ids = list(range(39, -1, -1))
    serial = [xxhash.xxh3_64_intdigest(np.ascontiguousarray(pool[b].numpy())) for b in ids]
    assert block_checksums(pool, ids) == serial


def test_out_of_range_block_is_refused():
    with pytest.raises(IndexError):
        block_checksums(_pool(), [8])


def test_length_mismatch_marks_tail():
    assert mismatched_positions([1, 2], [1, 2, 3]) == [2]
