import threading

from kvtransfer.leases import LeaseTable


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _table(ttl=10.0):
    freed = []
    clock = FakeClock()
    return LeaseTable(ttl, freed.append, clock=clock), freed, clock


def test_release_frees_once():
    table, freed, _ = _table()
    lease = table.grant("r1", [3, 4])
    assert table.get(lease.lease_id) == lease
    assert table.release(lease.lease_id) is True
    assert table.release(lease.lease_id) is False
    assert freed == [lease] and table.get(lease.lease_id) is None


def test_expiry_frees_once_and_release_after_expiry_is_false():
    table, freed, clock = _table(ttl=10.0)
    old = table.grant("r1", [1])
    clock.now += 5
    young = table.grant("r2", [2])
    clock.now += 6
    assert table.get(old.lease_id) is None  # past expiry, not swept yet
    assert table.expire() == [old]
    assert table.expire() == []
    assert table.release(old.lease_id) is False
    assert freed == [old] and table.get(young.lease_id) == young


def test_concurrent_release_and_expire_free_each_lease_exactly_once():
    table, freed, clock = _table(ttl=1.0)
    leases = [table.grant(f"r{i}", [i]) for i in range(2000)]
    clock.now += 2
    threads = [threading.Thread(target=lambda: [table.release(lease.lease_id) for lease in leases]),
               threading.Thread(target=table.expire)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(lease.lease_id for lease in freed) == sorted(lease.lease_id for lease in leases)
    assert len(table) == 0
