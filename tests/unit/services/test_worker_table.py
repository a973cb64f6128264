"""WorkerTable and Pool: the columns placement reads must say what the views say."""

import random

import numpy as np

from services.router.placement.base import LoadView, WorkerView
from services.router.placement.table import WorkerTable


def view(worker_id, role="decode", healthy=True, **load):
    return WorkerView(worker_id, f"addr-{worker_id}", role, healthy, LoadView(**load))


def random_view(rng, worker_id, role):
    return WorkerView(worker_id, "a", role, rng.random() < 0.8, LoadView(*(rng.randint(0, 50) for _ in LoadView._fields)))


def test_pool_columns_are_the_views_fields_and_derived_loads():
    rng = random.Random(3)
    views = [random_view(rng, f"w{i}", rng.choice(["decode", "prefill"])) for i in range(40)]
    table = WorkerTable.of(views)
    for role in ("decode", "prefill"):
        pool = table.pool(role)
        mine = [v for v in views if v.role == role]
        assert pool.ids == [v.worker_id for v in mine]
        for field in LoadView._fields:
            assert getattr(pool, field).tolist() == [getattr(v.load, field) for v in mine], field
        assert pool.healthy.tolist() == [v.healthy for v in mine]
        assert pool.queue_depth.tolist() == [v.load.queue_depth for v in mine]
        assert pool.pending_prefill_tokens.tolist() == [v.load.pending_prefill_tokens for v in mine]
        assert [pool.view(i) for i in range(len(pool))] == mine


def test_put_rewrites_a_row_in_place_and_remove_keeps_the_order():
    table = WorkerTable.of([view("a"), view("b", role="prefill"), view("c")])
    table.put(view("a", waiting=7))
    assert table.pool("decode").waiting.tolist() == [7, 0]
    table.remove("a")
    table.remove("zz")  # unknown: no-op
    table.put(view("d"))
    assert [v.worker_id for v in table.views()] == ["b", "c", "d"]
    assert table.pool("decode").ids == ["c", "d"] and table.pool("prefill").ids == ["b"]
    table.put(view("b", role="decode"))  # a worker may change role
    assert table.pool("decode").ids == ["b", "c", "d"] and len(table.pool("prefill")) == 0


def test_rename_keeps_the_row():
    table = WorkerTable.of([view("10.0.0.1:1"), view("10.0.0.2:1")])
    table.rename("10.0.0.1:1", view("decode-0", running=3))
    assert [v.worker_id for v in table.views()] == ["decode-0", "10.0.0.2:1"]
    assert "10.0.0.1:1" not in table and table.pool().running.tolist() == [3, 0]
    table.rename("10.0.0.2:1", view("decode-0"))  # that id moved address: one row for it, the later one
    assert [v.worker_id for v in table.views()] == ["decode-0"] and table.pool().running.tolist() == [0]


def test_grows_past_its_capacity():
    table = WorkerTable(capacity=2)
    for i in range(100):
        table.put(view(f"w{i}", waiting=i))
    assert table.pool().waiting.tolist() == list(range(100))


def test_a_pool_carries_the_request_prefix_without_touching_the_table():
    table = WorkerTable.of([view("a"), view("p", role="prefill"), view("b")])
    pool = table.pool("decode", prefix_blocks=np.array([4, 9, 2]))
    assert pool.prefix_blocks.tolist() == [4, 2]
    assert pool.view(0).prefix_blocks == 4 and table.views()[0].prefix_blocks == 0
    narrowed = pool.take(np.array([False, True]))
    assert narrowed.ids == ["b"] and narrowed.view(0).worker_id == "b" and narrowed.prefix_blocks.tolist() == [2]
