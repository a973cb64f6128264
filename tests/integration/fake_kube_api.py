"""A stand-in Kubernetes API server for EndpointSlices only, on loopback port 0 (no cluster runs here).

It speaks the real wire format the `kubernetes` client expects: a list is a
`discovery.k8s.io/v1` EndpointSliceList with `metadata.resourceVersion`; `?watch=true` is a chunked
HTTP/1.1 response of newline-delimited `{"type": ..., "object": ...}` events that stays open until
`timeoutSeconds` or `close_watches()`. A watch from a resourceVersion older than `expire_before`
gets the API server's answer for that: an ERROR event carrying a 410 Gone Status.

Tests change state with put_slice / delete_slice (each bumps the resourceVersion and sends
ADDED / MODIFIED / DELETED to the open watches whose label selector matches).
"""

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"


def endpoint_slice(name: str, service: str, ips_ready: dict[str, bool], port: int, port_name: str = "grpc",
                   namespace: str = "pdmesh") -> dict:
    """An EndpointSlice as the EndpointSlice controller writes it for a headless Service."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "generateName": f"{service}-",
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": not ready},
                       "targetRef": {"kind": "Pod", "name": f"{service}-{ip.replace('.', '-')}",
                                     "namespace": namespace}}
                      for ip, ready in ips_ready.items()],
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


class FakeKubeApi:
    def __init__(self):
        self.version = 100
        self.expire_before = 0  # watches from an older resourceVersion get 410 Gone
        self.slices: dict[tuple[str, str], dict] = {}  # (namespace, name) -> slice
        self.requests: list[str] = []  # "list <selector>" / "watch <selector> from <rv>"
        self._watchers: list[tuple[str, str, queue.Queue]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path) -> str:
        """A kubeconfig file pointing at this server (what `load_kube_config` reads)."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "pdmesh"}}],
        }))
        return str(path)

    def put_slice(self, endpoint_slice: dict) -> None:
        meta = endpoint_slice["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            kind = "MODIFIED" if key in self.slices else "ADDED"
            self._store(key, endpoint_slice)
            self._notify(kind, self.slices[key])

    def delete_slice(self, namespace: str, name: str) -> None:
        with self._lock:
            gone = self.slices.pop((namespace, name))
            self.version += 1
            gone["metadata"]["resourceVersion"] = str(self.version)
            self._notify("DELETED", gone)

    def expire_history(self) -> None:
        """Compaction: every resourceVersion handed out so far is now too old to watch from."""
        with self._lock:
            self.version += 1
            self.expire_before = self.version

    def close_watches(self) -> None:
        with self._lock:
            for _, _, events in self._watchers:
                events.put(None)

    def stop(self) -> None:
        self.close_watches()
        self._server.shutdown()
        self._server.server_close()

    def wait_for_request(self, prefix: str, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(r.startswith(prefix) for r in self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} requests starting {prefix!r}; saw {self.requests}")
            time.sleep(0.02)

    def _store(self, key, endpoint_slice: dict) -> None:
        self.version += 1
        endpoint_slice = json.loads(json.dumps(endpoint_slice))
        endpoint_slice["metadata"]["resourceVersion"] = str(self.version)
        self.slices[key] = endpoint_slice

    def _notify(self, kind: str, endpoint_slice: dict) -> None:
        for namespace, selector, events in self._watchers:
            if _matches(endpoint_slice, namespace, selector):
                events.put({"type": kind, "object": endpoint_slice})

    def _list(self, namespace: str, selector: str) -> dict:
        with self._lock:
            items = [s for s in self.slices.values() if _matches(s, namespace, selector)]
            return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                    "metadata": {"resourceVersion": str(self.version)}, "items": items}

    def _open_watch(self, namespace: str, selector: str, since: int) -> queue.Queue:
        events: queue.Queue = queue.Queue()
        with self._lock:
            if since < self.expire_before:
                events.put({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
                    "message": f"too old resource version: {since} ({self.expire_before})"}})
                events.put(None)
            else:
                self._watchers.append((namespace, selector, events))
        return events

    def _close_watch(self, events: queue.Queue) -> None:
        with self._lock:
            self._watchers = [w for w in self._watchers if w[2] is not events]


def _matches(endpoint_slice: dict, namespace: str, selector: str) -> bool:
    """Equality-based label selectors (`a=b,c=d`), the kind discovery uses."""
    if endpoint_slice["metadata"]["namespace"] != namespace:
        return False
    labels = endpoint_slice["metadata"].get("labels", {})
    wanted = [term.split("=", 1) for term in selector.split(",") if term]
    return all(labels.get(k.strip()) == v.strip() for k, v in wanted)


def _handler(api: FakeKubeApi):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if not (url.path.startswith(PREFIX) and url.path.endswith("/endpointslices")):
                return self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": url.path})
            namespace = url.path[len(PREFIX):].split("/")[0]
            selector = query.get("labelSelector", "")
            if query.get("watch") in ("true", "1"):
                return self._watch(namespace, selector, query)
            api.requests.append(f"list {selector}")
            return self._json(200, api._list(namespace, selector))

        def _watch(self, namespace: str, selector: str, query: dict):
            since = int(query.get("resourceVersion") or 0)
            api.requests.append(f"watch {selector} from {since}")
            events = api._open_watch(namespace, selector, since)
            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 300)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while time.monotonic() < deadline:
                    try:
                        event = events.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    if event is None:
                        break
                    self._chunk(json.dumps(event).encode() + b"\n")
                self._chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                api._close_watch(events)
            self.close_connection = True

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _json(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
