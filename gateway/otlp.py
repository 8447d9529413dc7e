"""Export sampled hop records as OTLP/HTTP protobuf spans, off the hot path, with bounded queues.

The hot path only appends a hop record to `Exporter.queue`. `run()` sends batches with httpx, one request at a
time; while the collector is slow or down the queue fills and further spans are dropped and counted
(`meshgate_spans_dropped_total`), so requests are never delayed by tracing. Encoding uses the official
`opentelemetry-proto` classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from gateway.tracing import HOP

if TYPE_CHECKING:
    from gateway.telemetry import Metrics

log = logging.getLogger("meshgate.otlp")

MAX_QUEUED = 8192
BATCH = 512
INTERVAL = 1.0
TIMEOUT = 5.0
SLOW = 1.0  # seconds: slower hops are exported whatever the sampling decision


class Exporter:
    """>>> exporter = Exporter("http://127.0.0.1:4318/v1/traces", "catalog", metrics); exporter.add(hop)"""

    def __init__(self, endpoint: str, group: str, metrics: Metrics) -> None:
        self.endpoint = endpoint
        self.resource = Resource(
            attributes=[_attr("service.name", f"meshgate-gateway-{group}"), _attr("meshgate.group", group)]
        )
        self.metrics = metrics
        self.queue: list[tuple[Any, ...]] = []
        self.wakeup = asyncio.Event()

    def add(self, hop: tuple[Any, ...]) -> None:
        if len(self.queue) >= MAX_QUEUED:
            self.metrics.count("meshgate_spans_dropped_total", hop[HOP["destination"]])
            return
        self.queue.append(hop)
        if len(self.queue) == BATCH:
            self.wakeup.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            while True:
                with contextlib.suppress(TimeoutError):  # the interval passed: send what there is
                    await asyncio.wait_for(self.wakeup.wait(), INTERVAL)
                self.wakeup.clear()
                while self.queue:
                    batch, self.queue = self.queue[:BATCH], self.queue[BATCH:]
                    await self.send(client, batch)

    async def flush(self) -> None:
        """Send what is queued (on shutdown), each batch within the export timeout."""
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            while self.queue:
                batch, self.queue = self.queue[:BATCH], self.queue[BATCH:]
                await self.send(client, batch)

    def drop_queued(self) -> None:
        for hop in self.queue:
            self.metrics.count("meshgate_spans_dropped_total", hop[HOP["destination"]])
        self.queue = []

    async def send(self, client: httpx.AsyncClient, batch: list[tuple[Any, ...]]) -> None:
        body = encode(batch, self.resource)
        try:
            response = await client.post(
                self.endpoint, content=body, headers={"content-type": "application/x-protobuf"}
            )
            ok = response.status_code < 300
        except httpx.HTTPError as exc:
            ok = False
            log.debug("OTLP export to %s failed: %s", self.endpoint, exc)
        name = "meshgate_spans_exported_total" if ok else "meshgate_spans_dropped_total"
        for hop in batch:
            self.metrics.count(name, hop[HOP["destination"]])


def encode(hops: list[tuple[Any, ...]], resource: Resource) -> bytes:
    spans = [span_of(hop) for hop in hops]
    scope = ScopeSpans(scope=InstrumentationScope(name="meshgate"), spans=spans)
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(resource=resource, scope_spans=[scope])])
    body: bytes = request.SerializeToString()
    return body


def span_of(hop: tuple[Any, ...]) -> Span:
    start = int(hop[HOP["start"]] * 1e9)
    status, error = hop[HOP["status"]], hop[HOP["error"]]
    destination, route = hop[HOP["destination"]], hop[HOP["route"]]
    target: bytes = hop[HOP["target"]]
    attributes = [
        _attr("http.request.method", hop[HOP["method"]].decode("latin-1")),
        _attr("url.path", target.split(b"?", 1)[0].decode("latin-1")),
        _attr("http.response.status_code", status),
        *_server(hop[HOP["host"]].decode("latin-1")),
        _attr("network.peer.address", hop[HOP["peer"]].decode("latin-1")),
        _attr("guid:x-request-id", hop[HOP["request_id"]].decode("latin-1")),
        _attr("meshgate.reporter", hop[HOP["reporter"]]),
        _attr("meshgate.source", hop[HOP["source"]]),
        _attr("meshgate.service", destination),
        _attr("meshgate.subset", hop[HOP["subset"]]),
        _attr("meshgate.route", route),
        _attr("meshgate.retries", max(0, hop[HOP["tries"]] - 1)),
        _attr("meshgate.upstream_duration_ms", hop[HOP["upstream_duration"]] * 1000),
    ]
    if hop[HOP["endpoint"]] is not None:
        attributes.append(_attr("meshgate.endpoint", str(hop[HOP["endpoint"]])))
    if error:
        attributes.append(_attr("error.type", error))
    elif status >= 500:
        attributes.append(_attr("error.type", str(status)))
    parent = hop[HOP["parent_span_id"]]
    return Span(
        trace_id=bytes.fromhex(hop[HOP["trace_id"]].decode()),
        span_id=bytes.fromhex(hop[HOP["span_id"]].decode()),
        parent_span_id=bytes.fromhex(parent.decode()) if parent else b"",
        name=f"{hop[HOP['method']].decode('latin-1')} {route or destination}",
        kind=Span.SPAN_KIND_SERVER if hop[HOP["reporter"]] == "destination" else Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=start,
        end_time_unix_nano=start + int(hop[HOP["duration"]] * 1e9),
        attributes=attributes,
        status=Status(code=Status.STATUS_CODE_ERROR if status >= 500 or error else Status.STATUS_CODE_UNSET),
    )


def _attr(key: str, value: str | int | float) -> KeyValue:
    if isinstance(value, (bool, str)):
        return KeyValue(key=key, value=AnyValue(string_value=str(value)))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(double_value=value))


def _server(authority: str) -> list[KeyValue]:
    """`server.address` is the host alone; the port, when the authority has one, is `server.port`."""
    if authority.startswith("["):  # [IPv6]:port
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, _, port = authority.partition(":")
    else:
        host, port = authority, ""
    address = [_attr("server.address", host)]
    return [*address, _attr("server.port", int(port))] if port.isdigit() else address
