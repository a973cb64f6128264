"""The OTLP receiver's span conversion, the waterfall ordering, the per-phase report and the
`pdmesh traces` command on a real exported trace."""

import json

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from pdmesh.cli import main
from pdmesh.traces import waterfall
from pdmesh.traces.receiver import OtlpReceiver, spans_of

TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")


def span(name, span_id, parent, start_ms, end_ms, **attributes):
    kv = [common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(int_value=v) if isinstance(v, int)
                              else common_pb2.AnyValue(string_value=v)) for k, v in attributes.items()]
    return trace_pb2.Span(trace_id=TRACE, span_id=bytes([span_id] * 8), parent_span_id=bytes([parent] * 8) if parent else b"",
                          name=name, start_time_unix_nano=int(start_ms * 1e6), end_time_unix_nano=int(end_ms * 1e6),
                          attributes=kv, kind=trace_pb2.Span.SPAN_KIND_SERVER)


def export(service, *spans):
    resource = trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans(spans=list(spans))])
    resource.resource.attributes.append(common_pb2.KeyValue(key="service.name",
                                                            value=common_pb2.AnyValue(string_value=service)))
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[resource])


REQUEST = [export("pdmesh-router", span("router.generate", 1, 0, 0, 100), span("router.decode", 2, 1, 30, 100)),
           export("pdmesh-decode", span("decode", 3, 2, 31, 99), span("kv_transfer", 4, 3, 32, 40, **{"pdmesh.kv.bytes": 4096}),
                  span("decode.generate", 5, 3, 41, 99))]


def test_spans_of_keeps_ids_links_service_and_attributes():
    spans = spans_of(REQUEST[1])
    transfer = next(s for s in spans if s["name"] == "kv_transfer")
    assert transfer["trace_id"] == TRACE.hex() and transfer["parent_span_id"] == "03" * 8
    assert transfer["service"] == "pdmesh-decode" and transfer["kind"] == "server"
    assert transfer["attributes"] == {"pdmesh.kv.bytes": 4096}
    assert waterfall.duration_ms(transfer) == pytest.approx(8.0)


def test_waterfall_orders_depth_first_by_start():
    spans = [s for r in REQUEST for s in spans_of(r)]
    assert [(d, s["name"]) for d, s in waterfall.ordered(spans[::-1])] == [
        (0, "router.generate"), (1, "router.decode"), (2, "decode"), (3, "kv_transfer"), (3, "decode.generate")]


def test_phase_report_percentiles():
    spans = [{"name": "kv_transfer", "service": "pdmesh-decode", "start_ns": i, "end_ns": i + int(ms * 1e6)}
             for i, ms in enumerate([1.0, 2.0, 3.0, 4.0, 100.0])]
    (row,) = waterfall.phase_report(spans)
    assert row["count"] == 5 and row["p50_ms"] == pytest.approx(3.0) and row["service"] == "decode"
    assert row["p99_ms"] == pytest.approx(4.0 + 0.96 * 96.0)


def test_receiver_collects_over_real_otlp_and_the_cli_draws_it(tmp_path, capsys):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: F401 (installed)
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    path = tmp_path / "spans.jsonl"
    receiver = OtlpReceiver(jsonl_path=str(path))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{receiver.port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            for request in REQUEST:
                stub.Export(request, timeout=10)
        assert len(receiver.wait_for(lambda s: len(s) == 5)) == 5
    finally:
        receiver.stop()
    assert len([json.loads(line) for line in path.read_text().splitlines()]) == 5
    png = tmp_path / "w.png"
    assert main(["traces", "show", str(path), "--png", str(png)]) == 0
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["traces", "report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kv_transfer" in out and "per-phase latency over 1 traces" in out
    assert main(["traces", "show", str(path), "--trace-id", "00" * 16]) == 1
