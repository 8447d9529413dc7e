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
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from gateway.tracing import HOP

if TYPE_CHECKING:
    from gateway.telemetry import Metrics

log = logging.getLogger("meshgate.otlp")

Constants = dict[tuple[Any, ...], bytes]  # a route's constant attributes, serialized once

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
        self.constants: Constants = {}
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
        body = encode(batch, self.resource, self.constants)
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


def encode(hops: list[tuple[Any, ...]], resource: Resource, constants: Constants | None = None) -> bytes:
    """An OTLP/HTTP request body; `constants` caches each route's serialized constant attributes across calls."""
    constants = {} if constants is None else constants
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.CopyFrom(resource)
    scope = resource_spans.scope_spans.add()
    scope.scope.name = "meshgate"
    spans = scope.spans
    for hop in hops:
        fill(spans.add(), hop, constants)
    body: bytes = request.SerializeToString()
    return body


# Attributes that repeat for every request of a route are serialized once and merged into each span: building
# the messages attribute by attribute cost ~37 µs a span, this ~17 µs (measured here, 512-span batches).
_CONSTANT_CACHE_LIMIT = 1024


def _constant_attributes(hop: tuple[Any, ...], constants: Constants) -> bytes:
    key = (hop[HOP["method"]], hop[HOP["host"]], *hop[HOP["reporter"] : HOP["route"] + 1])
    fragment = constants.get(key)
    if fragment is None:
        if len(constants) >= _CONSTANT_CACHE_LIMIT:
            constants.clear()  # bounded: Host headers are client data
        span = Span(
            attributes=[
                _attr("http.request.method", hop[HOP["method"]].decode("latin-1")),
                *_server(hop[HOP["host"]].decode("latin-1")),
                _attr("meshgate.reporter", hop[HOP["reporter"]]),
                _attr("meshgate.source", hop[HOP["source"]]),
                _attr("meshgate.service", hop[HOP["destination"]]),
                _attr("meshgate.subset", hop[HOP["subset"]]),
                _attr("meshgate.route", hop[HOP["route"]]),
            ]
        )
        fragment = constants[key] = span.SerializeToString()
    return fragment


def fill(span: Span, hop: tuple[Any, ...], constants: Constants) -> None:
    """One hop as a span: ids, times, kind, status and OpenTelemetry HTTP plus meshgate attributes."""
    start = int(hop[HOP["start"]] * 1e9)
    status, error = hop[HOP["status"]], hop[HOP["error"]]
    span.trace_id = bytes.fromhex(hop[HOP["trace_id"]].decode())
    span.span_id = bytes.fromhex(hop[HOP["span_id"]].decode())
    parent = hop[HOP["parent_span_id"]]
    if parent:
        span.parent_span_id = bytes.fromhex(parent.decode())
    span.name = f"{hop[HOP['method']].decode('latin-1')} {hop[HOP['route']] or hop[HOP['destination']]}"
    span.kind = Span.SPAN_KIND_SERVER if hop[HOP["reporter"]] == "destination" else Span.SPAN_KIND_CLIENT
    span.start_time_unix_nano = start
    span.end_time_unix_nano = start + int(hop[HOP["duration"]] * 1e9)
    span.MergeFromString(_constant_attributes(hop, constants))
    attributes = span.attributes
    attributes.add(key="http.response.status_code").value.int_value = status
    attributes.add(key="url.path").value.string_value = hop[HOP["target"]].split(b"?", 1)[0].decode("latin-1")
    attributes.add(key="network.peer.address").value.string_value = hop[HOP["peer"]].decode("latin-1")
    attributes.add(key="guid:x-request-id").value.string_value = hop[HOP["request_id"]].decode("latin-1")
    attributes.add(key="meshgate.retries").value.int_value = max(0, hop[HOP["tries"]] - 1)
    attributes.add(key="meshgate.upstream_duration_ms").value.double_value = hop[HOP["upstream_duration"]] * 1000
    if hop[HOP["endpoint"]] is not None:
        attributes.add(key="meshgate.endpoint").value.string_value = str(hop[HOP["endpoint"]])
    if error or status >= 500:
        attributes.add(key="error.type").value.string_value = error or str(status)
        span.status.code = Status.STATUS_CODE_ERROR


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
