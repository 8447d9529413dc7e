"""OTLP/HTTP export requests for the span store's tests, built with the official opentelemetry-proto classes, as an
OpenTelemetry SDK or a gateway's exporter sends them; and a reader of the dashboard's /metrics samples."""

from __future__ import annotations

import base64
import gzip
import json
import os
import time
from typing import Any

import httpx
from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

PROTOBUF = "application/x-protobuf"


def new_trace_id() -> str:
    return os.urandom(16).hex()


def new_span_id() -> str:
    return os.urandom(8).hex()


def attr(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def hop_span(
    trace_id: str,
    span_id: str,
    parent: str = "",
    *,
    reporter: str = "destination",
    caller: str = "shop",
    service: str = "catalog",
    subset: str = "v1",
    status: int = 200,
    request_id: str | None = None,
    start: float | None = None,
    duration_ms: float = 2.0,
    retries: int = 0,
    error: str | None = None,
) -> Span:
    """A span as a gateway exports a hop (gateway/exporter.py: the same names and attributes)."""
    start_ns = int((time.time() if start is None else start) * 1e9)
    attributes = [
        attr("http.request.method", "GET"),
        attr("server.address", service),
        attr("meshgate.reporter", reporter),
        attr("meshgate.source", caller),
        attr("meshgate.service", service),
        attr("meshgate.subset", subset if reporter == "destination" else service),
        attr("meshgate.route", "default"),
        attr("http.response.status_code", status),
        attr("url.path", "/echo"),
        attr("network.peer.address", "127.0.0.1"),
        attr("meshgate.retries", retries),
        attr("meshgate.upstream_duration_ms", duration_ms / 2),
        attr("meshgate.endpoint", "127.0.0.1:9101"),
    ]
    if request_id is not None:
        attributes.append(attr("guid:x-request-id", request_id))
    span = Span(
        trace_id=bytes.fromhex(trace_id),
        span_id=bytes.fromhex(span_id),
        parent_span_id=bytes.fromhex(parent),
        name="GET default",
        kind=Span.SPAN_KIND_SERVER if reporter == "destination" else Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=start_ns,
        end_time_unix_nano=start_ns + int(duration_ms * 1e6),
        attributes=attributes,
    )
    if error is not None or status >= 500:
        span.attributes.append(attr("error.type", error or str(status)))
        span.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR))
    return span


def app_span(
    trace_id: str, span_id: str, parent: str, name: str = "load cart", duration_ms: float = 1.0, after: float = 0.0
) -> Span:
    """A span an application made with an OpenTelemetry SDK, starting `after` seconds from now: no request ID, no
    meshgate attributes."""
    start_ns = int((time.time() + after) * 1e9)
    return Span(
        trace_id=bytes.fromhex(trace_id),
        span_id=bytes.fromhex(span_id),
        parent_span_id=bytes.fromhex(parent) if parent else b"",
        name=name,
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=start_ns,
        end_time_unix_nano=start_ns + int(duration_ms * 1e6),
        attributes=[attr("db.system", "sqlite"), attr("cart.items", 3)],
    )


def export(*spans: Span, service: str = "meshgate-gateway-catalog", group: str | None = "catalog") -> Any:
    """One ExportTraceServiceRequest with `spans` under one resource."""
    resource = [attr("service.name", service)] + ([attr("meshgate.group", group)] if group else [])
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.CopyFrom(Resource(attributes=resource))
    scope = resource_spans.scope_spans.add()
    scope.scope.name = "meshgate"
    scope.spans.extend(spans)
    return request


def otlp_json(request: Any) -> bytes:
    """OTLP/JSON as the specification writes it: proto3 JSON, except that trace and span ids are hex."""
    document = json_format.MessageToDict(request)
    for resource_spans in document.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(document).encode()


def post(client: httpx.Client, request: Any, media: str = PROTOBUF, compress: bool = False) -> httpx.Response:
    body = request.SerializeToString() if media == PROTOBUF else otlp_json(request)
    headers = {"content-type": media}
    if compress:
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    return client.post("/v1/traces", content=body, headers=headers)


def metric(client: httpx.Client, name: str, **labels: str) -> float | None:
    """The value of the first /metrics sample of `name` whose labels include `labels`, or None."""
    for line in client.get("/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.partition("{")[0] == name and all(f'{key}="{wanted}"' in head for key, wanted in labels.items()):
            return float(value)
    return None
