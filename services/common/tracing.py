"""OpenTelemetry for every pdmesh service, configured the standard way.

`init_tracing(service)` is called once at each entry point. It installs an SDK tracer provider
exporting OTLP/gRPC only when an endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `OTEL_SDK_DISABLED` is not true; otherwise the API's
no-op tracer stays in place, so tracing disabled costs a few no-op calls and nothing else. The
sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`), `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` are read by the SDK itself.

W3C trace context crosses every gRPC hop in metadata: clients add `outgoing_metadata()` to a
call, servers open their span with `server_span(name, metadata)`. Attribute names follow the
GenAI semantic conventions (`gen_ai.*`) where one exists and live under `pdmesh.*` otherwise.

Phases that run on the engine thread (queue wait, compute) are recorded after the fact as
spans with explicit start and end times (`record_span`), never one span per token.
"""

import contextlib
import logging
import os
import time

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger(__name__)

TRACER_NAME = "pdmesh"
TRACE_ID_HEADER = "x-pdmesh-trace-id"
_enabled = False
_tracer: trace.Tracer | None = None
# What a span is when tracing is off and no caller's context came in: the no-op tracer would build
# one like it per call (with a context attach and detach), 10 us of the router's time per request.
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


def init_tracing(service: str) -> bool:
    """Install the exporting provider if an OTLP endpoint is configured. True if tracing is on."""
    global _enabled
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if not endpoint or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME over our default name.
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or f"pdmesh-{service}"})
    provider = TracerProvider(resource=resource)
    insecure = not endpoint.startswith("https://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(insecure=insecure)))
    trace.set_tracer_provider(provider)
    _enabled = True
    log.info("tracing to %s as %s", endpoint, resource.attributes.get(SERVICE_NAME))
    return True


def shutdown_tracing() -> None:
    """Flush spans still buffered (called on drain)."""
    provider = trace.get_tracer_provider()
    if _enabled and hasattr(provider, "shutdown"):
        provider.shutdown()


def tracer() -> trace.Tracer:
    """The pdmesh tracer, looked up once: before init_tracing it is the API's proxy, which hands
    on to the SDK provider once one is installed (each lookup reads the environment)."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(TRACER_NAME)
    return _tracer


def enabled() -> bool:
    return _enabled


def context_from(metadata) -> otel_context.Context:
    """The caller's trace context from gRPC invocation metadata (or any key/value pairs)."""
    carrier = dict(metadata or ())
    return propagate.extract({k.lower(): v for k, v in carrier.items() if isinstance(v, str)})


def server_span(name: str, metadata, attributes: dict | None = None):
    """A SERVER span continuing the caller's trace; the span is current inside the block.
    Exceptions are recorded on the span and re-raised. Tracing off, a caller's W3C context still
    carries through (its trace id is the span's); with none, the span is trace.INVALID_SPAN."""
    if not _enabled and not _has_traceparent(metadata):
        return _NO_SPAN
    return tracer().start_as_current_span(name, context=context_from(metadata), kind=trace.SpanKind.SERVER,
                                          attributes=attributes)


def client_span(name: str, attributes: dict | None = None):
    """A CLIENT span for an outgoing call, current inside the block (trace.INVALID_SPAN, at no
    cost, when tracing is off: nothing would be recorded or propagated)."""
    if not _enabled:
        return _NO_SPAN
    return tracer().start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes)


def _has_traceparent(metadata) -> bool:
    if not metadata:
        return False
    keys = metadata.keys() if isinstance(metadata, dict) else (k for k, _ in metadata)
    return any(k.lower() == "traceparent" for k in keys)


def outgoing_metadata(extra: tuple = ()) -> tuple:
    """gRPC call metadata carrying the current trace context (empty when nothing is traced)."""
    if not _enabled:
        return tuple(extra)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*extra, *carrier.items())


def trace_id_of(span) -> str:
    """Hex trace id of a recording span, '' when not traced."""
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def record_span(name: str, start_s: float, end_s: float, attributes: dict | None = None) -> None:
    """A finished child span of the current span from perf_counter() timestamps measured elsewhere
    (e.g. queue wait on the engine thread)."""
    if not _enabled:
        return
    offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)
    span = tracer().start_span(name, start_time=offset_ns + int(start_s * 1e9), attributes=attributes)
    span.end(end_time=offset_ns + int(end_s * 1e9))


def add_event(name: str, attributes: dict | None = None) -> None:
    """An event on the current span (no-op when nothing is traced)."""
    trace.get_current_span().add_event(name, attributes or {})


def set_attributes(span, attributes: dict) -> None:
    """Set attributes, skipping None values (the SDK warns on them)."""
    if span.is_recording():
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
