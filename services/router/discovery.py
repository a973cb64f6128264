"""Worker discovery: where the prefill and decode pools are, kept current while the router runs.

Three sources, picked by name (`--discovery`): `static` (the `--prefill/--decode` lists of a local
run), `dns` (the A/AAAA records of a headless Service per pool, re-resolved every few seconds) and
`kubernetes` (the pools' EndpointSlices, listed then watched through the API server; in
`k8s_discovery.py`). `follow(discovery, registry)` turns what a source reports into
`WorkerRegistry.add/remove` calls, so pools that scale up or down are picked up without a restart.
"""

import abc
import asyncio
import importlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import NamedTuple, Protocol

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")


class Endpoint(NamedTuple):
    role: str  # "prefill" or "decode"
    address: str  # "host:port", IPv6 hosts in brackets


class Discovery(abc.ABC):
    """A source of the pools' current members.

    `watch()` is an async iterator of the *complete* current set of endpoints (both pools): the first
    set as soon as it is known (it may be empty), then a new set after every change, never the same
    set twice in a row. It runs until the consumer stops iterating or cancels it; it never raises for
    a lookup that fails at run time (DNS timeout, API server away) — it logs, keeps the last known set
    and retries. Misconfiguration is a ValueError from the constructor, before anything runs.
    """

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[frozenset[Endpoint]]: ...


class Registry(Protocol):
    """What `follow` needs of services.router.workers.WorkerRegistry."""

    def addresses(self) -> set[str]: ...
    def add(self, role: str, address: str) -> None: ...
    def remove(self, address: str) -> None: ...


class StaticDiscovery(Discovery):
    """A fixed list (a local run, or addresses someone else keeps stable)."""

    def __init__(self, prefill: tuple[str, ...], decode: tuple[str, ...]):
        self._endpoints = frozenset([Endpoint("prefill", a) for a in prefill] + [Endpoint("decode", a) for a in decode])

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        yield self._endpoints


class DnsDiscovery(Discovery):
    """Resolves one `name:port` per pool every `interval_s` seconds; every address is a worker.

    A headless Service's name resolves to the IPs of its *ready* pods, so scaling and readiness show
    up here within the DNS TTL plus one interval. A name that does not exist (a pool with no ready
    pod answers NXDOMAIN) means an empty pool; any other failure keeps the pool's last known members.
    """

    def __init__(self, targets: dict[str, str], interval_s: float = 5.0):
        if interval_s <= 0:
            raise ValueError(f"DNS re-resolve interval must be positive, got {interval_s}")
        self._targets = {role: split_host_port(target) for role, target in targets.items() if target}
        self._interval_s = interval_s

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        known: dict[str, frozenset[Endpoint]] = {role: frozenset() for role in self._targets}
        last = None
        while True:
            for role, (host, port) in self._targets.items():
                found = await self._resolve(role, host, port)
                if found is not None:
                    known[role] = found
            current = frozenset().union(*known.values())
            if current != last:
                last = current
                yield current
            await asyncio.sleep(self._interval_s)

    async def _resolve(self, role: str, host: str, port: int) -> frozenset[Endpoint] | None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                return frozenset()
            log.warning("could not resolve %s pool %s: %s; keeping its last known workers", role, host, exc)
            return None
        return frozenset(Endpoint(role, join_host_port(info[4][0], port)) for info in infos)


def split_host_port(target: str) -> tuple[str, int]:
    """'name:port' or '[v6]:port' -> (host, port), with a message saying what to fix."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port (e.g. pdmesh-decode-headless.pdmesh.svc.cluster.local:50062), "
                         f"got {target!r}")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def follow(discovery: Discovery, registry: Registry) -> None:
    """Applies every set `discovery` reports to `registry` (adds first, then removes). Runs until
    cancelled; an endpoint that moves from one pool to the other is removed and added again."""
    async for endpoints in discovery.watch():
        current = {(e.role, e.address) for e in endpoints}
        known = registry.addresses()
        for role, address in sorted(current):
            if address not in known:
                registry.add(role, address)
        wanted = {address for _, address in current}
        for address in sorted(known - wanted):
            registry.remove(address)
        log.info("discovery: %d prefill, %d decode workers", sum(r == "prefill" for r, _ in current),
                 sum(r == "decode" for r, _ in current))


_DISCOVERIES = {
    "static": "services.router.discovery:StaticDiscovery",
    "dns": "services.router.discovery:DnsDiscovery",
    "kubernetes": "services.router.k8s_discovery:KubernetesDiscovery",
}


def known_discoveries() -> list[str]:
    return sorted(_DISCOVERIES)


def discovery_class(name: str) -> type[Discovery]:
    if name not in _DISCOVERIES:
        raise ValueError(f"unknown discovery {name!r}; known: {known_discoveries()}")
    module, _, attr = _DISCOVERIES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def make_discovery(config) -> Discovery:
    """The discovery a RouterConfig asks for (RouterConfig has already checked the per-source fields)."""
    cls = discovery_class(config.discovery)
    if config.discovery == "static":
        return cls(config.prefill_addresses, config.decode_addresses)
    if config.discovery == "dns":
        return cls({"prefill": config.prefill_dns, "decode": config.decode_dns}, config.dns_interval_s)
    return cls({"prefill": config.prefill_selector, "decode": config.decode_selector}, config.namespace,
               port_name=config.endpoint_port_name)
