"""Discovery's pure parts: config checks, address parsing, and `follow` turning sets into add/remove on
the real WorkerRegistry (its channels are lazy, so nothing needs to listen)."""

import asyncio

import pytest

from pdmesh.v1 import worker_state_pb2
from services.router.config import RouterConfig
from services.router.discovery import (
    Discovery,
    Endpoint,
    StaticDiscovery,
    discovery_class,
    follow,
    join_host_port,
    make_discovery,
    split_host_port,
)
from services.router.main import parse_config
from services.router.workers import WorkerRegistry


class Scripted(Discovery):
    """Yields the given sets, then ends."""

    def __init__(self, *sets):
        self._sets = [frozenset(s) for s in sets]

    async def watch(self):
        for s in self._sets:
            yield s


def test_follow_adds_and_removes_on_the_real_registry():
    async def scenario():
        registry = WorkerRegistry([], [], remove_grace_s=0.1)
        registry.start()
        registry.index.stored("10.0.0.1:1", [11, 12])  # as if that worker (known by address) held blocks
        await follow(Scripted({Endpoint("decode", "10.0.0.1:1"), Endpoint("prefill", "10.0.0.2:1")},
                              {Endpoint("decode", "10.0.0.1:1"), Endpoint("decode", "10.0.0.3:1")}), registry)
        views = {(v.role, v.address) for v in registry.views()}
        index_after = registry.index.num_blocks("10.0.0.1:1")
        await registry.close()
        return views, index_after

    views, index_after = asyncio.run(scenario())
    assert views == {("decode", "10.0.0.1:1"), ("decode", "10.0.0.3:1")}
    assert index_after == 2  # the surviving worker keeps its prefix entries


def test_remove_drops_the_prefix_index_entries_and_keeps_the_stub_for_requests_in_flight():
    async def scenario():
        registry = WorkerRegistry([], [], remove_grace_s=0.2)
        registry.start()
        registry.add("decode", "10.0.0.1:1")
        registry.add("decode", "10.0.0.1:1")  # known: no second endpoint
        assert len(registry.views()) == 1
        endpoint = registry.endpoint("10.0.0.1:1")
        registry._apply(endpoint, worker_state_pb2.StreamStateResponse(  # what its state stream would say
            worker_id="decode-0", role=worker_state_pb2.WORKER_ROLE_DECODE,
            load_report=worker_state_pb2.LoadReport(kv_blocks_total=64)))
        registry.index.stored("decode-0", [7])
        assert registry.has_healthy("decode")
        registry.remove("10.0.0.1:1")
        registry.remove("10.0.0.9:1")  # unknown: no-op
        assert registry.views() == [] and not registry.has_healthy("decode")
        assert registry.index.num_blocks("decode-0") == 0
        assert registry.decode_session("decode-0") is endpoint.decode_session  # placed requests still find it
        await asyncio.sleep(0.5)  # channel closed after its grace: now it is forgotten
        with pytest.raises(KeyError):
            registry.decode_session("decode-0")
        await registry.close()

    asyncio.run(scenario())


def test_static_discovery_yields_its_lists_once():
    async def sets():
        return [s async for s in StaticDiscovery(("a:1",), ("b:2", "c:3")).watch()]

    assert asyncio.run(sets()) == [{Endpoint("prefill", "a:1"), Endpoint("decode", "b:2"), Endpoint("decode", "c:3")}]


@pytest.mark.parametrize("target, parsed", [("pool.ns.svc.cluster.local:50062", ("pool.ns.svc.cluster.local", 50062)),
                                            ("[fd00::1]:7", ("fd00::1", 7))])
def test_split_host_port(target, parsed):
    assert split_host_port(target) == parsed
    assert split_host_port(join_host_port(*parsed)) == parsed


@pytest.mark.parametrize("target", ["pool.ns.svc", "pool:", ":80", "pool:http", "pool:70000"])
def test_split_host_port_says_what_to_fix(target):
    with pytest.raises(ValueError, match="expected host:port"):
        split_host_port(target)


@pytest.mark.parametrize("kwargs, message", [
    ({"discovery": "static"}, "--decode host:port"),
    ({"discovery": "dns"}, "--decode-dns name:port"),
    ({"discovery": "kubernetes"}, "--decode-selector"),
    ({"discovery": "consul", "decode_addresses": ("a:1",)}, r"known: \['dns', 'kubernetes', 'static'\]"),
])
def test_router_config_names_the_missing_flag(kwargs, message):
    fields = {"prefill_addresses": (), "decode_addresses": (), **kwargs}
    with pytest.raises(ValueError, match=message):
        RouterConfig(**fields)


def test_has_prefill_pool_follows_the_discovery_source():
    assert not RouterConfig((), ("d:1",)).has_prefill_pool
    assert RouterConfig((), (), discovery="dns", decode_dns="d:1", prefill_dns="p:1").has_prefill_pool
    assert not RouterConfig((), (), discovery="kubernetes", decode_selector="a=b").has_prefill_pool


def test_flags_and_env_fill_the_discovery_fields(monkeypatch):
    monkeypatch.setenv("PDMESH_DISCOVERY", "dns")
    monkeypatch.setenv("PDMESH_DECODE_DNS", "pdmesh-decode-headless:50062")
    config = parse_config(["--prefill-dns", "pdmesh-prefill-headless:50061", "--dns-interval-s", "2"])
    assert (config.discovery, config.decode_dns, config.prefill_dns, config.dns_interval_s) == (
        "dns", "pdmesh-decode-headless:50062", "pdmesh-prefill-headless:50061", 2.0)
    assert type(make_discovery(config)).__name__ == "DnsDiscovery"


def test_unknown_discovery_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: "):
        discovery_class("zookeeper")


def test_a_slot_freed_since_the_last_load_report_counts_as_free_at_once():
    async def scenario():
        registry = WorkerRegistry([], ["10.0.0.1:1"])
        endpoint = registry.endpoint("10.0.0.1:1")
        report = lambda running: worker_state_pb2.StreamStateResponse(  # noqa: E731
            worker_id="decode-0", role=worker_state_pb2.WORKER_ROLE_DECODE, load_report=worker_state_pb2.LoadReport(
                running_sequences=running, kv_blocks_total=64, max_running_sequences=16))
        registry._apply(endpoint, report(running=14))  # the worker says its id
        with registry.track("decode-0", 0), registry.track("decode-0", 0):
            registry._apply(endpoint, report(running=16))  # ours and 14 from elsewhere
        load = registry.views()[0].load
        assert (load.max_running, load.router_finished, load.queue_depth) == (16, 2, 14)
        registry._apply(endpoint, report(running=14))  # the next report already counts them out
        assert registry.views()[0].load.queue_depth == 14
        await registry.close()

    asyncio.run(scenario())


def test_the_placement_table_follows_the_endpoints():
    async def scenario():
        registry = WorkerRegistry([], ["10.0.0.1:1", "10.0.0.2:1"], remove_grace_s=0.1)
        registry._apply(registry.endpoint("10.0.0.1:1"), worker_state_pb2.StreamStateResponse(
            worker_id="decode-0", role=worker_state_pb2.WORKER_ROLE_DECODE,
            load_report=worker_state_pb2.LoadReport(running_sequences=2, kv_blocks_total=64)))
        ids = [v.worker_id for v in registry.table.views()]  # the worker said its id: same row
        with registry.track("decode-0", 100):
            pool = registry.table.pool("decode")
            inflight = dict(zip(pool.ids, pool.router_inflight.tolist()))
            registry.remove("10.0.0.1:1")
        after = [v.worker_id for v in registry.table.views()]  # its request ended after: not back
        await registry.close()
        return ids, pool, inflight, after

    ids, pool, inflight, after = asyncio.run(scenario())
    assert ids == ["decode-0", "10.0.0.2:1"]
    assert inflight == {"decode-0": 1, "10.0.0.2:1": 0}
    assert pool.running.tolist() == [2, 0] and pool.healthy.tolist() == [True, False]
    assert after == ["10.0.0.2:1"]


def test_a_worker_id_that_moved_address_is_not_marked_down_by_its_old_endpoint():
    def state(**fields):
        return worker_state_pb2.StreamStateResponse(worker_id="decode-0", role=worker_state_pb2.WORKER_ROLE_DECODE,
                                                    **fields)

    async def scenario():
        registry = WorkerRegistry([], ["10.0.0.1:1", "10.0.0.2:1"], remove_grace_s=0.1)
        old, new = registry.endpoint("10.0.0.1:1"), registry.endpoint("10.0.0.2:1")
        registry._apply(old, state(load_report=worker_state_pb2.LoadReport(running_sequences=1)))
        registry._apply(new, state(load_report=worker_state_pb2.LoadReport(running_sequences=3)))
        registry._apply(new, state(kv_events=worker_state_pb2.KvEventBatch(events=[worker_state_pb2.KvEvent(
            stored=worker_state_pb2.BlocksStored(block_hashes=[11, 12], block_size=16))])))
        registry._mark_down(old)  # the old address is still followed, and fails
        views = [(v.worker_id, v.address, v.healthy, v.load.running) for v in registry.table.views()]
        matched = registry.index.matched_blocks([11, 12], ["decode-0"])
        await registry.close()
        return views, matched

    views, matched = asyncio.run(scenario())
    assert views == [("decode-0", "10.0.0.2:1", True, 3)]
    assert matched == {"decode-0": 2}
