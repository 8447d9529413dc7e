"""Export sampled hop records as OTLP/HTTP protobuf spans, off the hot path, with bounded queues.

The hot path only appends a hop record to `Exporter.queue`. `run()` sends batches through one httpx client, one
request at a time; while the collector is slow or down the queue fills and further spans are dropped and counted
(`meshgate_spans_dropped_total`), so requests are never delayed by tracing. A joined gateway exporting to its
dashboard sends its join token with each batch (`headers`), so the dashboard takes its spans as its group's hops.

`SpanEncoder` writes the protobuf wire format itself. What repeats for every request of a route (span name and
kind, method, server address, reporter, source, service, subset, route) is encoded once and reused; per span only
the ids, times, status, path, peer, request ID, retries, upstream time, endpoint and error are framed, and no
Python object is made per span but its bytes. Measured here (`bench/otlp.py`): ~2.4 µs and ~26,000 instructions a
span, against ~10 µs and ~80,000 filling the official `opentelemetry-proto` classes; the whole export path
(batching, encoding, one POST of 2,048 spans through a reused httpx client) ~4 µs a span. The tests decode its
output with the official classes and require the message they build from the same hop records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from binascii import unhexlify
from collections import Counter
from collections.abc import Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import httpx

from gateway.hops import HOP

if TYPE_CHECKING:
    from gateway.telemetry import Metrics

log = logging.getLogger("meshgate.otlp")

MAX_QUEUED = 8192
BATCH = 2048
INTERVAL = 1.0
EXPORT_TIMEOUT = 5.0  # seconds for one OTLP export request
SLOW = 1.0  # seconds: slower hops are exported whatever the sampling decision
CHUNK = 128  # spans encoded between two yields to the event loop (~0.5 ms)
HEADERS = {"content-type": "application/x-protobuf"}

_destination = itemgetter(HOP["destination"])


class Exporter:
    """>>> exporter = Exporter("http://127.0.0.1:4318/v1/traces", "catalog", metrics); exporter.add(hop)"""

    def __init__(
        self,
        endpoint: str,
        group: str,
        metrics: Metrics,
        verify: ssl.SSLContext | bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.verify = verify  # an https collector's certificate is checked against this
        self.headers = {**HEADERS, **(headers or {})}  # credentials, for the dashboard only (`Peers.export_headers`)
        self.encoder = SpanEncoder(group)
        self.metrics = metrics
        self.queue: list[tuple[Any, ...]] = []
        self.wakeup = asyncio.Event()
        self.refused = ""  # why the collector last refused a batch: logged once, not for every batch

    def add(self, hop: tuple[Any, ...]) -> None:
        if len(self.queue) >= MAX_QUEUED:
            self.metrics.count("meshgate_spans_dropped_total", hop[HOP["destination"]])
            return
        self.queue.append(hop)
        if len(self.queue) == BATCH:
            self.wakeup.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=EXPORT_TIMEOUT, verify=self.verify) as client:
            while True:
                with contextlib.suppress(TimeoutError):  # the interval passed: send what there is
                    await asyncio.wait_for(self.wakeup.wait(), INTERVAL)
                self.wakeup.clear()
                await self.send_queued(client)

    async def flush(self) -> None:
        """Send what is queued (on shutdown), each batch within the export timeout."""
        async with httpx.AsyncClient(trust_env=False, timeout=EXPORT_TIMEOUT, verify=self.verify) as client:
            await self.send_queued(client)

    async def send_queued(self, client: httpx.AsyncClient) -> None:
        while self.queue:
            batch, self.queue = self.queue[:BATCH], self.queue[BATCH:]
            await self.send(client, batch)

    def drop_queued(self) -> None:
        self.count("meshgate_spans_dropped_total", self.queue)
        self.queue = []

    async def send(self, client: httpx.AsyncClient, batch: list[tuple[Any, ...]]) -> None:
        spans: list[bytes] = []
        for first in range(0, len(batch), CHUNK):  # a batch takes milliseconds: let requests in between
            if first:
                await asyncio.sleep(0)
            spans += self.encoder.spans(batch[first : first + CHUNK])
        try:
            response = await client.post(self.endpoint, content=self.encoder.request(spans), headers=self.headers)
            ok = response.status_code < 300
        except httpx.HTTPError as exc:
            ok = False
            log.debug("OTLP export to %s failed: %s", self.endpoint, exc)
        else:
            self._said(response)
        self.count("meshgate_spans_exported_total" if ok else "meshgate_spans_dropped_total", batch)

    def _said(self, response: httpx.Response) -> None:
        """Log a refusal (a 4xx: it will not change by itself) once, and again only when its reason changes."""
        refused = (
            f"HTTP {response.status_code}: {' '.join(response.text[:200].split())}"
            if 400 <= response.status_code < 500
            else ""
        )
        if refused and refused != self.refused:
            log.warning("OTLP export to %s refused, spans dropped: %s", self.endpoint, refused)
        self.refused = refused

    def count(self, name: str, hops: list[tuple[Any, ...]]) -> None:
        for destination, spans in Counter(map(_destination, hops)).items():
            self.metrics.count(name, destination, spans)


# --- the protobuf wire format ----------------------------------------------------------------------------------
# Field tags (field number << 3 | wire type) of the OTLP messages written here, from opentelemetry/proto/*.proto:
# ExportTraceServiceRequest.resource_spans 1; ResourceSpans.resource 1, .scope_spans 2; ScopeSpans.scope 1, .spans 2;
# Resource.attributes 1; InstrumentationScope.name 1; Span.trace_id 1, .span_id 2, .parent_span_id 4, .name 5,
# .kind 6, .start_time_unix_nano 7 (fixed64), .end_time_unix_nano 8 (fixed64), .attributes 9, .status 15;
# Status.code 3; KeyValue.key 1, .value 2; AnyValue.string_value 1, .int_value 3, .double_value 4.


def _varint(value: int) -> bytes:
    value &= 0xFFFF_FFFF_FFFF_FFFF  # int64: a negative number is its two's complement, ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_LENGTHS = tuple(_varint(n) for n in range(4096))  # lengths up to a long span's, looked up (~200 KB)


def _length(n: int) -> bytes:
    return _LENGTHS[n] if n < 4096 else _varint(n)


def _delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _length(len(payload)) + payload


def _text(value: bytes) -> bytes:
    """Client bytes as the UTF-8 of their latin-1 reading: how the access log and /requests/{id} show them too."""
    return value if value.isascii() else value.decode("latin-1").encode()


def _key(key: str) -> bytes:
    return _delimited(b"\n", key.encode())


def _string_attribute(key: bytes, value: bytes, tag: bytes = b"J") -> bytes:
    """A KeyValue with a string value, as a Span attribute (tag J, field 9) or a Resource attribute (tag \\n)."""
    n = len(value)
    if n < 96 and len(key) < 28:  # every length is one byte: one format instead of three frames
        return b"%b%c%b\x12%c\n%c%b" % (tag, len(key) + n + 4, key, n + 2, n, value)
    any_value = b"\n" + _length(len(value)) + value
    key_value = key + b"\x12" + _length(len(any_value)) + any_value
    return tag + _length(len(key_value)) + key_value


def _int_attribute(key: bytes, value: int) -> bytes:
    return _delimited(b"J", key + _delimited(b"\x12", b"\x18" + _varint(value)))


def _server(authority: str) -> bytes:
    """`server.address` is the host alone; the port, when the authority has one, is `server.port`."""
    if authority.startswith("["):  # [IPv6]:port
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, _, port = authority.partition(":")
    else:
        host, port = authority, ""
    address = _string_attribute(_key("server.address"), host.encode())
    return address + _int_attribute(_key("server.port"), int(port)) if port.isdigit() else address


_STATUS_CODE = _key("http.response.status_code")
_URL_PATH = _key("url.path")
_PEER = _key("network.peer.address")
_REQUEST_ID = _key("guid:x-request-id")
_RETRIES = _key("meshgate.retries")
_ENDPOINT = _key("meshgate.endpoint")
_ERROR_TYPE = _key("error.type")
# meshgate.upstream_duration_ms: a KeyValue of fixed size, so everything but the double's 8 bytes is constant.
_UPSTREAM_MS = _delimited(b"J", _key("meshgate.upstream_duration_ms") + b"\x12\x09\x21" + bytes(8))[:-8]
# A span: ids, [parent,] times, the route's constant part, then the attributes in a fixed order.
_SPAN = b"\n\x10%b\x12\x08%b%b%b%b%b%b%b%b%b" + _UPSTREAM_MS.replace(b"%", b"%%") + b"%b%b%b"
_TIMES = struct.Struct("<BQBQ")  # start and end as two fixed64 fields
_DOUBLE = struct.Struct("<d")
_STATUS_ERROR = b"\x7a\x02\x18\x02"  # Span.status = Status(code=STATUS_CODE_ERROR)
_CACHE_LIMIT = 1024  # per cache: hosts, peers and ports come from clients, so every cache is bounded


class SpanEncoder:
    """OTLP/HTTP protobuf bodies for hop records, reusing each route's encoded constant part.

    >>> encoder = SpanEncoder("catalog"); body = encoder.request(encoder.spans(hops))
    """

    def __init__(self, group: str) -> None:
        resource = _string_attribute(_key("service.name"), f"meshgate-gateway-{group}".encode(), b"\n")
        resource += _string_attribute(_key("meshgate.group"), group.encode(), b"\n")
        self.resource = _delimited(b"\n", resource)  # ResourceSpans.resource
        self.scope = _delimited(b"\n", _delimited(b"\n", b"meshgate"))  # ScopeSpans.scope, named "meshgate"
        self.routes: dict[tuple[Any, ...], bytes] = {}
        self.peers: dict[bytes, bytes] = {}
        self.endpoints: dict[str | None, bytes] = {None: b""}
        self.statuses: dict[int, bytes] = {}
        self.retries = [_int_attribute(_RETRIES, n) for n in range(16)]

    def request(self, spans: list[bytes]) -> bytes:
        """The ExportTraceServiceRequest around encoded spans (`span()` outputs), built with one copy."""
        scope_spans = len(self.scope) + sum(map(len, spans))
        framed_scope = b"\x12" + _length(scope_spans)
        resource_spans = len(self.resource) + len(framed_scope) + scope_spans
        return b"".join((b"\n", _length(resource_spans), self.resource, framed_scope, self.scope, *spans))

    def spans(self, hops: list[tuple[Any, ...]]) -> list[bytes]:
        """Each hop as a Span, framed as a ScopeSpans.spans entry."""
        return [self.span(hop) for hop in hops]

    def span(self, hop: tuple[Any, ...]) -> bytes:
        (
            start, request_id, trace_id, span_id, parent, _, reporter, source, destination, subset, route, endpoint,
            method, target, host, status, duration, upstream, tries, _, _, error, peer, grpc_status,
        ) = hop  # fmt: skip
        constant = self.routes.get((method, host, reporter, source, destination, subset, route))
        if constant is None:
            constant = self._route(method, host, reporter, source, destination, subset, route)
        status_code = self.statuses.get(status)
        if status_code is None:
            status_code = self.statuses[status] = _int_attribute(_STATUS_CODE, status)  # at most 900: 100-999
        peer_address = self.peers.get(peer)
        if peer_address is None:
            if len(self.peers) >= _CACHE_LIMIT:
                self.peers.clear()
            peer_address = self.peers[peer] = _string_attribute(_PEER, _text(peer))
        endpoint_name = self.endpoints.get(endpoint)
        if endpoint_name is None:
            if len(self.endpoints) >= _CACHE_LIMIT:
                self.endpoints = {None: b""}
            endpoint_name = self.endpoints[endpoint] = _string_attribute(_ENDPOINT, str(endpoint).encode())
        path = target.partition(b"?")[0]
        if not path.isascii():
            path = path.decode("latin-1").encode()
        if not request_id.isascii():
            request_id = request_id.decode("latin-1").encode()
        start_ns = int(start * 1e9)
        body = _SPAN % (
            unhexlify(trace_id),
            unhexlify(span_id),
            b'"\x08' + unhexlify(parent) if parent else b"",
            _TIMES.pack(0x39, start_ns, 0x41, start_ns + int(duration * 1e9)),
            constant,
            status_code,
            _string_attribute(_URL_PATH, path),
            peer_address,
            _string_attribute(_REQUEST_ID, request_id),
            self.retries[tries - 1] if 0 < tries <= 16 else _int_attribute(_RETRIES, max(0, tries - 1)),
            _DOUBLE.pack(upstream * 1000),
            endpoint_name,
            _error(error, status) if error or status >= 500 else b"",
        )
        if grpc_status >= 0:
            body += self.rpc(path, grpc_status)
        return b"\x12" + _length(len(body)) + body

    @staticmethod
    def rpc(path: bytes, code: int) -> bytes:
        """OpenTelemetry's RPC attributes of a gRPC call (`/package.Service/Method`). A code the service counts as
        a failure is already the hop's `error` (h2server.py), and so the span's error.type and status."""
        service, _, method = path.lstrip(b"/").partition(b"/")
        attributes = _string_attribute(_key("rpc.system"), b"grpc")
        attributes += _string_attribute(_key("rpc.service"), service) + _string_attribute(_key("rpc.method"), method)
        return attributes + _int_attribute(_key("rpc.grpc.status_code"), code)

    def _route(self, method: bytes, host: bytes, *labels: str) -> bytes:
        """Name, kind and the attributes every request of this route shares, encoded once."""
        if len(self.routes) >= _CACHE_LIMIT:
            self.routes.clear()  # bounded: Host headers are client data
        reporter, source, destination, subset, route = labels
        verb = method.decode("latin-1")
        encoded = b"".join(
            (
                _delimited(b"*", f"{verb} {route or destination}".encode()),
                b"0\x02" if reporter == "destination" else b"0\x03",  # SPAN_KIND_SERVER / SPAN_KIND_CLIENT
                _string_attribute(_key("http.request.method"), verb.encode()),
                _server(host.decode("latin-1")),
                *(_string_attribute(_key(key), value.encode()) for key, value in zip(_LABEL_KEYS, labels, strict=True)),
            )
        )
        self.routes[(method, host, *labels)] = encoded
        return encoded


_LABEL_KEYS = ("meshgate.reporter", "meshgate.source", "meshgate.service", "meshgate.subset", "meshgate.route")


def _error(error: str, status: int) -> bytes:
    return _string_attribute(_ERROR_TYPE, (error or str(status)).encode()) + _STATUS_ERROR
