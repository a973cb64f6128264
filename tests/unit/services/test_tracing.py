"""Tracing off by default: no endpoint, no SDK, nothing recorded or sent (in a fresh process,
since a tracer provider can be installed only once per process)."""

import subprocess
import sys

PROBE = """
import os
from services.common import tracing
assert tracing.init_tracing("router") is False
with tracing.server_span("x", {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}) as span:
    assert not span.is_recording()
    assert tracing.outgoing_metadata() == ()
    assert tracing.trace_id_of(span) == "4bf92f3577b34da6a3ce929d0e0e4736"  # the caller's trace carries through
    tracing.record_span("y", 0.0, 1.0)
    with tracing.client_span("z", {"a": 1}) as child:  # off: no span of its own, nothing to propagate
        assert not child.get_span_context().is_valid and tracing.outgoing_metadata() == ()
with tracing.server_span("x", {"user-agent": "grpc"}) as untraced:  # no caller's context: the invalid span
    assert not untraced.get_span_context().is_valid and tracing.trace_id_of(untraced) == ""
print("ok", type(span).__name__)
"""


def run_probe(env_extra: dict) -> str:
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_no_endpoint_means_no_sdk_and_no_metadata():
    assert run_probe({}).startswith("ok NonRecordingSpan")


def test_sdk_disabled_wins_over_an_endpoint():
    assert run_probe({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}).startswith(
        "ok NonRecordingSpan")


def test_context_from_metadata_reads_w3c_traceparent():
    from opentelemetry import trace

    from services.common import tracing
    ctx = tracing.context_from((("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                                ("other", b"binary values are ignored")))
    parent = trace.get_current_span(ctx).get_span_context()
    assert format(parent.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert format(parent.span_id, "016x") == "00f067aa0ba902b7"
    assert not trace.get_current_span(tracing.context_from(())).get_span_context().is_valid
