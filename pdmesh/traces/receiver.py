"""A real OTLP/gRPC trace receiver (opentelemetry-proto's TraceService) that keeps spans as plain
dicts: for tests, benchmarks and `pdmesh traces collect`. Not a collector: no batching, retries
or forwarding; it stores what it is sent and can append it to a JSONL file.

Span dict: trace_id, span_id, parent_span_id (hex; '' for a root), name, service, kind,
start_ns, end_ns, attributes (dict), events ([{name, time_ns, attributes}]), status_code.
"""

import json
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

_KINDS = {v: k.removeprefix("SPAN_KIND_").lower() for k, v in trace_pb2.Span.SpanKind.items()}


def any_value(value):
    """An OTLP AnyValue as a Python value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind) if kind else None


def _attributes(key_values) -> dict:
    return {kv.key: any_value(kv.value) for kv in key_values}


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[dict]:
    spans = []
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append({
                    "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(), "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name, "service": service, "kind": _KINDS.get(s.kind, "unspecified"),
                    "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                    "attributes": _attributes(s.attributes),
                    "events": [{"name": e.name, "time_ns": e.time_unix_nano, "attributes": _attributes(e.attributes)}
                               for e in s.events],
                    "status_code": trace_pb2.Status.StatusCode.Name(s.status.code)})
    return spans


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: "OtlpReceiver"):
        self._receiver = receiver

    def Export(self, request, context):
        self._receiver.add(spans_of(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Listens on host:port (0 = any free port) until stop(); spans in `.spans`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, jsonl_path: str | None = None):
        self.spans: list[dict] = []
        self._lock = threading.Condition()
        self._jsonl = open(jsonl_path, "a") if jsonl_path else None
        self._server = grpc.server(futures.ThreadPoolExecutor(4), options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"could not bind {host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"
        self._server.start()

    def add(self, spans: list[dict]) -> None:
        with self._lock:
            self.spans.extend(spans)
            if self._jsonl:
                self._jsonl.writelines(json.dumps(s) + "\n" for s in spans)
                self._jsonl.flush()
            self._lock.notify_all()

    def wait_for(self, predicate, timeout_s: float = 10.0) -> list[dict]:
        """Block until predicate(spans) is true (spans arrive in batches); returns a copy of the spans."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"spans not as expected after {timeout_s}s ({len(self.spans)} received)")
                self._lock.wait(left)
            return list(self.spans)

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()

    def stop(self) -> None:
        self._server.stop(grace=1).wait()
        if self._jsonl:
            self._jsonl.close()


def load_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
