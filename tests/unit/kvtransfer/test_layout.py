import dataclasses

import pytest
import torch

from kvtransfer import layout as layout_module
from kvtransfer.layout import KvLayout

REAL = KvLayout("gemma-3-270m@abc", "float32", 16, 18, 1, 256)


def test_real_model_block_bytes():
    assert REAL.bytes_per_token == 36_864
    assert REAL.block_bytes == 589_824


@pytest.mark.parametrize("field, value", [("model_id", "other"), ("dtype", "float16"), ("block_size", 32),
                                          ("num_layers", 17), ("num_kv_heads", 2), ("head_dim", 128)])
def test_compat_hash_changes_with_every_field(field, value):
    assert dataclasses.replace(REAL, **{field: value}).compat_hash != REAL.compat_hash


def test_compat_hash_changes_with_wire_version(monkeypatch):
    before = REAL.compat_hash
    monkeypatch.setattr(layout_module, "WIRE_VERSION", layout_module.WIRE_VERSION + 1)
    assert REAL.compat_hash != before


def test_compat_hash_is_stable_for_equal_layouts():
    assert KvLayout(*dataclasses.astuple(REAL)).compat_hash == REAL.compat_hash


def test_proto_round_trip_carries_hash_and_version():
    msg = REAL.to_proto()
    assert (msg.compat_hash, msg.wire_version, msg.block_bytes) == (REAL.compat_hash, layout_module.WIRE_VERSION, 589_824)
    assert KvLayout.from_proto(msg) == REAL


def test_from_pool_reads_shape_and_dtype():
    pool = torch.zeros(3, 18, 2, 16, 1, 256)
    assert KvLayout.from_pool(pool, REAL.model_id) == REAL
    REAL.check_pool(pool)
    with pytest.raises(ValueError):
        REAL.check_pool(torch.zeros(3, 17, 2, 16, 1, 256))


@pytest.mark.parametrize("kwargs", [{"dtype": "float64"}, {"block_size": 0}, {"model_id": ""}])
def test_invalid_layouts_are_refused(kwargs):
    with pytest.raises(ValueError):
        dataclasses.replace(REAL, **kwargs)
