"""Worker discovery against real lookups: the `kubernetes` client listing and watching EndpointSlices
on a stand-in API server (real wire format, chunked watch stream, 410 Gone), and getaddrinfo resolving
a name to several addresses. The mesh tests at the end run the real router process on tiny workers."""

import asyncio
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from kubernetes import client

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.router.discovery import DnsDiscovery, Endpoint
from services.router.k8s_discovery import KubernetesDiscovery
from tests.integration.fake_kube_api import FakeKubeApi, endpoint_slice

PREFILL = "kubernetes.io/service-name=pdmesh-prefill-headless"
DECODE = "kubernetes.io/service-name=pdmesh-decode-headless"
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def kube_api():
    api = FakeKubeApi()
    yield api
    api.stop()


def api_client(api: FakeKubeApi) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = api.url
    return client.ApiClient(configuration)


async def next_set(sets, want: set[Endpoint], timeout: float = 10.0) -> frozenset[Endpoint]:
    """Reads sets from a discovery until one equals `want`."""
    async def read():
        seen = []
        async for found in sets:
            seen.append(found)
            if found == want:
                return found
        raise AssertionError(f"discovery ended; saw {seen}")
    return await asyncio.wait_for(read(), timeout)


def decode(*ips: str, port: int = 50062) -> set[Endpoint]:
    return {Endpoint("decode", f"{ip}:{port}") for ip in ips}


def prefill(*ips: str, port: int = 50061) -> set[Endpoint]:
    return {Endpoint("prefill", f"{ip}:{port}") for ip in ips}


def test_kubernetes_discovery_lists_watches_and_relists_after_410(kube_api):
    kube_api.put_slice(endpoint_slice("decode-a", "pdmesh-decode-headless", {"10.1.0.1": True}, 50062))
    kube_api.put_slice(endpoint_slice("prefill-a", "pdmesh-prefill-headless", {"10.2.0.1": True}, 50061))
    kube_api.put_slice(endpoint_slice("other", "some-other-service", {"10.9.9.9": True}, 50062))

    async def scenario():
        discovery = KubernetesDiscovery({"prefill": PREFILL, "decode": DECODE}, "pdmesh",
                                        api_client=api_client(kube_api), watch_timeout_s=30)
        sets = discovery.watch()
        await next_set(sets, decode("10.1.0.1") | prefill("10.2.0.1"))
        await asyncio.to_thread(kube_api.wait_for_request, f"watch {DECODE}")
        await asyncio.to_thread(kube_api.wait_for_request, f"watch {PREFILL}")
        # Scale up: a second slice (ADDED), then a pod in it turning ready (MODIFIED).
        kube_api.put_slice(endpoint_slice("decode-b", "pdmesh-decode-headless",
                                          {"10.1.0.2": True, "10.1.0.3": False}, 50062))
        await next_set(sets, decode("10.1.0.1", "10.1.0.2") | prefill("10.2.0.1"))
        kube_api.put_slice(endpoint_slice("decode-b", "pdmesh-decode-headless",
                                          {"10.1.0.2": True, "10.1.0.3": True}, 50062))
        await next_set(sets, decode("10.1.0.1", "10.1.0.2", "10.1.0.3") | prefill("10.2.0.1"))
        # Scale down: a terminating pod turns not-ready, a whole slice goes (DELETED).
        kube_api.put_slice(endpoint_slice("decode-b", "pdmesh-decode-headless",
                                          {"10.1.0.2": False, "10.1.0.3": True}, 50062))
        await next_set(sets, decode("10.1.0.1", "10.1.0.3") | prefill("10.2.0.1"))
        kube_api.delete_slice("pdmesh", "decode-a")
        await next_set(sets, decode("10.1.0.3") | prefill("10.2.0.1"))
        # The watch ends and its resourceVersion has been compacted away: 410 Gone, so list again,
        # which must also catch a change made while nobody was watching.
        kube_api.expire_history()
        kube_api.close_watches()
        kube_api.slices.pop(("pdmesh", "prefill-a"))
        kube_api.put_slice(endpoint_slice("prefill-b", "pdmesh-prefill-headless", {"10.2.0.7": True}, 50061))
        await next_set(sets, decode("10.1.0.3") | prefill("10.2.0.7"))
        await asyncio.to_thread(kube_api.wait_for_request, f"list {DECODE}", 2)  # the decode pool relisted too
        await sets.aclose()

    asyncio.run(scenario())
    assert sum(r == f"list {PREFILL}" for r in kube_api.requests) == 2, kube_api.requests
    # Every watch but the first resumed from the last resourceVersion seen, not from scratch.
    watches = [r for r in kube_api.requests if r.startswith(f"watch {DECODE}")]
    assert all(not r.endswith(" from 0") for r in watches), watches


def test_kubernetes_discovery_picks_the_named_port(kube_api):
    two_ports = endpoint_slice("decode-a", "pdmesh-decode-headless", {"10.1.0.1": True}, 50062)
    two_ports["ports"].append({"name": "metrics", "port": 9400, "protocol": "TCP"})
    kube_api.put_slice(two_ports)

    async def first_set():
        discovery = KubernetesDiscovery({"decode": DECODE}, "pdmesh", api_client=api_client(kube_api))
        sets = discovery.watch()
        found = await asyncio.wait_for(anext(sets), 10)
        await sets.aclose()
        return found

    assert asyncio.run(first_set()) == decode("10.1.0.1")


def test_kubernetes_discovery_survives_an_api_server_that_is_away():
    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # discard port: connection refused
    discovery = KubernetesDiscovery({"decode": DECODE}, "pdmesh", api_client=client.ApiClient(configuration),
                                    max_backoff_s=0.2)

    async def nothing_yet():
        sets = discovery.watch()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(sets), 1.0)

    asyncio.run(nothing_yet())


def test_dns_discovery_resolves_through_getaddrinfo():
    async def first_set():
        sets = DnsDiscovery({"decode": "localhost:50062", "prefill": "no-such-pool.invalid:50061"}, 0.1).watch()
        found = await asyncio.wait_for(anext(sets), 10)
        await sets.aclose()
        return found

    assert asyncio.run(first_set()) == decode("127.0.0.1")


# --- The real router process, real tiny workers on distinct loopback IPs sharing one port (as pods
# behind a headless Service share the container port), and pools that change while it runs.

def free_port(*hosts: str) -> int:
    """A port free on every host (Linux routes all of 127/8 to lo, so workers bind 127.0.0.2, .3, ...)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on all of " + ", ".join(hosts))


def spawn(name: str, args: list[str], run_dir: pathlib.Path, env: dict | None = None,
          prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen, dict]:
    ready, log = run_dir / f"{name}.ready.json", run_dir / f"{name}.log"
    with open(log, "w") as out:
        popen = subprocess.Popen([*prefix, sys.executable, *args, "--ready-file", str(ready)], cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if popen.poll() is not None or time.monotonic() > deadline:
            popen.kill()
            raise RuntimeError(f"{name} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return popen, json.loads(ready.read_text())


def start_decode(name: str, host: str, port: int, run_dir: pathlib.Path) -> subprocess.Popen:
    popen, _ = spawn(name, ["-m", "services.decode", "--worker-id", name, "--host", host, "--port", str(port),
                            "--advertise-host", host, "--model", "tiny", "--num-blocks", "64", "--kv-transports",
                            "grpc", "--torch-threads", "1", "--max-model-len", "256"], run_dir)
    return popen


def stop(*popens: subprocess.Popen) -> None:
    for p in popens:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in popens:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def served_by(stub, count: int) -> list[str]:
    """decode worker ids of `count` short requests, each of which must succeed."""
    ids = []
    for _ in range(count):
        request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[2, 651, 6037, 529]), max_tokens=2,
                                             ignore_eos=True)
        messages = list(stub.Generate(request, timeout=30))
        ids.append(messages[-1].placement.decode_worker_id)
    return ids


def wait_until_served_by(stub, wanted: set[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while set(seen := served_by(stub, 4)) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still served by {sorted(set(seen))}, want {sorted(wanted)}")
        time.sleep(0.2)


ROUTER_ARGS = ["-m", "services.router", "--host", "127.0.0.1", "--port", "0", "--profile", "round_robin",
               "--max-model-len", "256"]


def test_router_follows_endpointslices_as_the_decode_pool_scales(kube_api, tmp_path):
    port = free_port("127.0.0.2", "127.0.0.3")
    decode_0 = start_decode("decode-0", "127.0.0.2", port, tmp_path)
    decode_1 = start_decode("decode-1", "127.0.0.3", port, tmp_path)
    router = None
    try:
        kube_api.put_slice(endpoint_slice("decode-x", "pdmesh-decode-headless", {"127.0.0.2": True}, port))
        env = {"KUBECONFIG": kube_api.kubeconfig(tmp_path / "kubeconfig")}
        router, info = spawn("router", [*ROUTER_ARGS, "--discovery", "kubernetes", "--decode-selector", DECODE,
                                        "--namespace", "pdmesh"], tmp_path, env)
        with grpc.insecure_channel(info["address"]) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            assert set(served_by(stub, 3)) == {"decode-0"}
            # Scale up: the new pod's endpoint appears in the slice.
            kube_api.put_slice(endpoint_slice("decode-x", "pdmesh-decode-headless",
                                              {"127.0.0.2": True, "127.0.0.3": True}, port))
            wait_until_served_by(stub, {"decode-0", "decode-1"})
            # Scale down: decode-0 terminates (not ready first, then gone); no request may fail.
            kube_api.put_slice(endpoint_slice("decode-x", "pdmesh-decode-headless",
                                              {"127.0.0.2": False, "127.0.0.3": True}, port))
            wait_until_served_by(stub, {"decode-1"})
            stop(decode_0)
            assert set(served_by(stub, 4)) == {"decode-1"}
    finally:
        stop(*([router] if router else []), decode_0, decode_1)


def can_use_private_hosts_file() -> bool:
    """A private mount namespace lets one process see its own /etc/hosts (root, unshare allowed)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind /etc/hosts /etc/hosts"],
                           capture_output=True, timeout=10, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not can_use_private_hosts_file(), reason="needs `unshare -m` and bind mounts (root)")
def test_router_follows_a_headless_service_name_through_dns(tmp_path):
    port = free_port("127.0.0.2", "127.0.0.3")
    decode_0 = start_decode("decode-0", "127.0.0.2", port, tmp_path)
    decode_1 = start_decode("decode-1", "127.0.0.3", port, tmp_path)
    hosts = tmp_path / "hosts"
    name = "pdmesh-decode-headless.pdmesh.svc.cluster.local"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.2 {name}\n127.0.0.3 {name}\n")
    # The router resolves through the system resolver (getaddrinfo -> /etc/hosts), in its own mount
    # namespace where /etc/hosts is our file; the file is rewritten in place, as DNS records change.
    jail = ("unshare", "-m", "sh", "-c", f'mount --bind "{hosts}" /etc/hosts && exec "$@"', "router")
    router = None
    try:
        router, info = spawn("router", [*ROUTER_ARGS, "--discovery", "dns", "--decode-dns", f"{name}:{port}",
                                        "--dns-interval-s", "0.2"], tmp_path, prefix=jail)
        with grpc.insecure_channel(info["address"]) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            wait_until_served_by(stub, {"decode-0", "decode-1"})
            with open(hosts, "r+") as f:  # same inode: the bind mount sees the new records
                f.truncate(0)
                f.write(f"127.0.0.1 localhost\n127.0.0.3 {name}\n")
            wait_until_served_by(stub, {"decode-1"})
            stop(decode_0)
            assert set(served_by(stub, 4)) == {"decode-1"}
    finally:
        stop(*([router] if router else []), decode_0, decode_1)
