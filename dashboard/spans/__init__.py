"""Traces: receiving spans, keeping them, and finding a request's or a trace's spans.

- `receiver`: the OTLP/HTTP span receiver (decoding, bounds, who may send).
- `store`: the bounded SQLite span store the receiver feeds.
- `jaeger`: Jaeger's query API, read instead of the store when `--jaeger` is set.

Their HTTP API (lookup by request or trace ID, the OTLP intake) is `dashboard.api.traces`.
"""
