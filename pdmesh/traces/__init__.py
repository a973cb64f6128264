"""Seeing traces locally: an OTLP/gRPC receiver (`receiver`), and one request's waterfall plus a
per-phase latency report over many (`waterfall`)."""
