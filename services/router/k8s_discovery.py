"""Worker discovery through the Kubernetes API: the pools' EndpointSlices, listed then watched.

One thread per pool runs the `kubernetes` client's blocking list + watch loop (the client is
synchronous) and hands each pool's new member set to the event loop with call_soon_threadsafe:

    list (label selector)  -> all slices, resourceVersion R
    watch from R           -> ADDED / MODIFIED / DELETED slices, R advances with each event
    410 Gone (R too old)   -> list again
    stream ends (server timeout, network) -> watch again from the last R, after a short backoff

A worker is an endpoint whose `conditions.ready` is not false (the API says nil means ready), at
its first address and the slice's port named `port_name` (or the slice's only port). Terminating
pods turn not-ready first, so a draining worker leaves the set before its process exits.
"""

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable

from services.router.discovery import Discovery, Endpoint, join_host_port

log = logging.getLogger(__name__)


class KubernetesDiscovery(Discovery):
    def __init__(self, selectors: dict[str, str], namespace: str = "", port_name: str = "grpc",
                 api_client=None, watch_timeout_s: int = 300, max_backoff_s: float = 5.0):
        self._selectors = {role: s for role, s in selectors.items() if s}
        if not self._selectors.get("decode"):
            raise ValueError("kubernetes discovery needs a decode label selector "
                             "(--decode-selector kubernetes.io/service-name=pdmesh-decode-headless)")
        self._namespace = namespace or _own_namespace()
        self._port_name = port_name
        self._api = _discovery_api(api_client)
        self._watch_timeout_s = watch_timeout_s
        self._max_backoff_s = max_backoff_s

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        loop = asyncio.get_running_loop()
        api = self._api
        changes: asyncio.Queue[tuple[str, frozenset[Endpoint]]] = asyncio.Queue()
        stop = threading.Event()
        for role, selector in self._selectors.items():
            publish = lambda found, role=role: loop.call_soon_threadsafe(changes.put_nowait, (role, found))  # noqa: E731
            threading.Thread(target=self._follow_pool, args=(api, selector, publish, stop), daemon=True,
                             name=f"k8s-discovery-{role}").start()
        pools: dict[str, frozenset[Endpoint]] = {}
        last = None
        try:
            while True:
                role, found = await changes.get()
                pools[role] = frozenset(Endpoint(role, address) for address in found)
                current = frozenset().union(*pools.values())
                if current != last:
                    last = current
                    yield current
        finally:
            stop.set()  # the threads end at their next event or watch timeout

    def _follow_pool(self, api, selector: str, publish: Callable[[frozenset[str]], None],
                     stop: threading.Event) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        slices: dict[str, frozenset[str]] = {}
        version, backoff = None, 0.1
        while not stop.is_set():
            try:
                if version is None:
                    listed = api.list_namespaced_endpoint_slice(self._namespace, label_selector=selector)
                    slices = {s.metadata.name: self._ready_addresses(s) for s in listed.items}
                    version = listed.metadata.resource_version
                    publish(frozenset().union(*slices.values()))
                w = watch.Watch()
                for event in w.stream(api.list_namespaced_endpoint_slice, self._namespace, label_selector=selector,
                                      resource_version=version, timeout_seconds=self._watch_timeout_s,
                                      allow_watch_bookmarks=True):
                    if stop.is_set():
                        w.stop()
                        break
                    version = w.resource_version or version
                    if event["type"] == "BOOKMARK":
                        continue
                    name = event["object"].metadata.name
                    if event["type"] == "DELETED":
                        slices.pop(name, None)
                    else:
                        slices[name] = self._ready_addresses(event["object"])
                    publish(frozenset().union(*slices.values()))
                backoff = 0.1
                continue
            except ApiException as exc:
                if exc.status == 410:
                    log.info("EndpointSlice watch for %s expired (410 Gone); listing again", selector)
                    version = None
                    continue
                log.warning("EndpointSlice list/watch for %s failed: %s %s; retrying", selector, exc.status,
                            exc.reason)
            except Exception as exc:  # noqa: BLE001 (API server away, stream broken, bad JSON: keep the set, retry)
                log.warning("EndpointSlice list/watch for %s failed: %r; retrying", selector, exc)
            stop.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    def _ready_addresses(self, endpoint_slice) -> frozenset[str]:
        port = self._port(endpoint_slice)
        if port is None:
            return frozenset()
        return frozenset(join_host_port(e.addresses[0], port) for e in endpoint_slice.endpoints or []
                         if e.addresses and (e.conditions is None or e.conditions.ready is not False))

    def _port(self, endpoint_slice) -> int | None:
        ports = [p for p in endpoint_slice.ports or [] if p.port]
        named = [p.port for p in ports if p.name == self._port_name]
        if named:
            return named[0]
        if len(ports) == 1:
            return ports[0].port
        log.warning("EndpointSlice %s has no port named %r (ports: %s); skipping it", endpoint_slice.metadata.name,
                    self._port_name, [p.name for p in ports])
        return None


def _discovery_api(api_client):
    """In a pod: the ServiceAccount's in-cluster config; elsewhere: $KUBECONFIG or ~/.kube/config."""
    from kubernetes import client, config

    if api_client is None:
        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()
            else:
                config.load_kube_config()
        except config.ConfigException as exc:
            raise ValueError(f"kubernetes discovery found no cluster credentials ({exc}); run the router in a "
                             "pod with the pdmesh-router ServiceAccount, or set KUBECONFIG") from exc
        api_client = client.ApiClient()
    return client.DiscoveryV1Api(api_client)


def _own_namespace() -> str:
    """The pod's namespace (mounted with its ServiceAccount token), else 'default'."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"
