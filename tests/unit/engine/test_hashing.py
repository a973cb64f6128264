import struct
import subprocess
import sys

import pytest
import xxhash

from engine.hashing import block_hashes, hash_block


def test_hash_is_64_bit_unsigned_and_deterministic():
    h = hash_block(None, [1, 2, 3])
    assert 0 <= h < 2**64
    assert h == hash_block(None, [1, 2, 3])


def test_known_value_pins_the_encoding():
    # The router and every worker must agree forever: changing the encoding breaks prefix routing.
    assert hash_block(None, [1, 2, 3]) == 2269029543879048369


def test_chained_block_follows_the_documented_encoding():
    # xxh3_64(b"\x01" + parent as uint64 LE + each token as int64 LE), written out independently of
    # the implementation (which packs the header and slices one packed prompt).
    parent = (1 << 64) - 5
    expected = xxhash.xxh3_64_intdigest(struct.pack("<BQ", 1, parent) + struct.pack("<3q", 5, -6, 70_000))
    assert hash_block(parent, [5, -6, 70_000]) == expected
    assert block_hashes([9] * 16 + [5, -6, 70_000] * 6, 16, parent_hash=parent)[0] == hash_block(parent, [9] * 16)


def test_same_in_another_process():
    code = "from engine.hashing import hash_block; print(hash_block(7, [5, 6]))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == hash_block(7, [5, 6])


def test_parent_and_tokens_both_matter():
    assert hash_block(None, [1, 2]) != hash_block(None, [2, 1])
    assert hash_block(None, [1, 2]) != hash_block(0, [1, 2])
    assert hash_block(1, [1, 2]) != hash_block(2, [1, 2])
    assert hash_block(None, [1, 2]) != hash_block(None, [1, 2, 0])


def test_block_hashes_chain_over_full_blocks_only():
    tokens = list(range(40))
    hashes = block_hashes(tokens, 16)
    assert len(hashes) == 2
    assert hashes[0] == hash_block(None, tokens[:16])
    assert hashes[1] == hash_block(hashes[0], tokens[16:32])
    assert block_hashes(tokens[:15], 16) == []


def test_equal_prefixes_share_leading_hashes():
    a = block_hashes(list(range(48)), 16)
    b = block_hashes(list(range(32)) + [99] * 16, 16)
    assert a[:2] == b[:2] and a[2] != b[2]


def test_bad_block_size():
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0)
