"""Unit tests of the OTLP span encoding and the exporter's bounded queue.

`SpanEncoder` output is decoded with the official `opentelemetry-proto` class, as a collector would decode it, and
- checked against the hop records it came from: ids, parent, kind, times, status and the attributes the issue
  names (OpenTelemetry HTTP semantic conventions, Envoy's `guid:x-request-id`, meshgate's own);
- required to be exactly the message the official classes build from the same hops (`otlp_reference.py`, the
  encoder it replaced), for hand-picked edge cases and for seeded random ones.
No network, except one connect to a loopback port with nothing listening, and an HTTP receiver on loopback that
takes batches only with the right credentials.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from gateway.control import JoinSettings, mesh_config
from gateway.exporter import MAX_QUEUED, Exporter, SpanEncoder
from gateway.telemetry import Metrics
from tests.gateway import otlp_reference
from tests.gateway.test_tracing import make_hop

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = "5fe865d0f3a3c1e2"
REQUEST_ID = "0b6f3c4e-9d2a-4c1b-8e7f-2a9c5d1e3f40"


def encode(hops: list[tuple[Any, ...]], group: str = "catalog") -> bytes:
    encoder = SpanEncoder(group)
    return encoder.request(encoder.spans(hops))


def decode(body: bytes) -> list[Span]:
    request = ExportTraceServiceRequest.FromString(body)
    return [span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]


def attributes(span: Span) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for kv in span.attributes:
        assert kv.key not in found, f"attribute {kv.key} set twice"
        kind = kv.value.WhichOneof("value")
        assert kind is not None, kv.key
        found[kv.key] = getattr(kv.value, kind)
    return found


def server_hop(**fields: Any) -> tuple[Any, ...]:
    values: dict[str, Any] = {
        "start": 1_700_000_000.125,
        "request_id": REQUEST_ID.encode(),
        "trace_id": TRACE.encode(),
        "span_id": SPAN.encode(),
        "parent_span_id": PARENT.encode(),
        "reporter": "destination",
        "source": "shop",
        "destination": "catalog",
        "subset": "v2",
        "route": "canary-header",
        "endpoint": "127.0.0.1:9103",
        "method": b"POST",
        "target": b"/items/42?full=1",
        "host": b"catalog",
        "status": 201,
        "duration": 0.0125,
        "upstream_duration": 0.01,
        "tries": 3,
        "bytes_in": 12,
        "bytes_out": 34,
        "peer": b"10.1.2.3",
    }
    values.update(fields)
    return make_hop(**values)


def test_encode_decodes_with_the_official_class() -> None:
    body = encode([server_hop()])
    request = ExportTraceServiceRequest.FromString(body)
    assert len(request.resource_spans) == 1
    resource_spans = request.resource_spans[0]
    assert {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}["service.name"] == (
        "meshgate-gateway-catalog"
    )
    assert len(resource_spans.scope_spans) == 1 and len(resource_spans.scope_spans[0].spans) == 1


def test_span_ids_parent_kind_and_times() -> None:
    (span,) = decode(encode([server_hop()]))
    assert span.trace_id == bytes.fromhex(TRACE) and len(span.trace_id) == 16
    assert span.span_id == bytes.fromhex(SPAN) and len(span.span_id) == 8
    assert span.parent_span_id == bytes.fromhex(PARENT)
    assert span.kind == Span.SPAN_KIND_SERVER  # the destination's hop serves the request
    assert abs(span.start_time_unix_nano - 1_700_000_000_125_000_000) < 1_000  # within a microsecond
    assert abs((span.end_time_unix_nano - span.start_time_unix_nano) - 12_500_000) < 1_000
    assert span.name.startswith("POST")
    assert span.status.code == Status.STATUS_CODE_UNSET


def test_a_root_span_has_no_parent() -> None:
    (span,) = decode(encode([server_hop(parent_span_id=b"")]))
    assert span.parent_span_id == b""


def test_source_hop_is_a_client_span() -> None:
    (span,) = decode(encode([server_hop(reporter="source")]))
    assert span.kind == Span.SPAN_KIND_CLIENT


def test_every_named_attribute() -> None:
    (span,) = decode(encode([server_hop()]))
    attrs = attributes(span)
    # OpenTelemetry HTTP semantic conventions
    assert attrs["http.request.method"] == "POST"
    assert attrs["url.path"] == "/items/42"  # the query is not part of the path
    assert attrs["http.response.status_code"] == 201
    assert attrs["server.address"] == "catalog"
    assert attrs["network.peer.address"] == "10.1.2.3"
    assert "error.type" not in attrs, "no error on a 201"
    # Envoy's tag, so Jaeger's tag search finds the request ID
    assert attrs["guid:x-request-id"] == REQUEST_ID
    # meshgate's own
    assert attrs["meshgate.service"] == "catalog"
    assert attrs["meshgate.subset"] == "v2"
    assert attrs["meshgate.endpoint"] == "127.0.0.1:9103"
    assert attrs["meshgate.retries"] == 2  # three tries
    assert attrs["meshgate.upstream_duration_ms"] == pytest.approx(10.0)


def test_server_address_has_no_port() -> None:
    """Semantic conventions: `server.address` is the host alone; a port goes to `server.port`."""
    (span,) = decode(encode([server_hop(host=b"catalog:8080")]))
    attrs = attributes(span)
    assert attrs["server.address"] == "catalog"
    assert attrs.get("server.port") in (None, 8080)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_upstream_5xx_is_an_error_span(status: int) -> None:
    (span,) = decode(encode([server_hop(status=status, tries=1)]))
    assert span.status.code == Status.STATUS_CODE_ERROR
    attrs = attributes(span)
    assert attrs["http.response.status_code"] == status
    assert attrs["error.type"] == str(status)  # semantic conventions: the status code when nothing better is known


def test_gateway_error_names_its_type() -> None:
    hop = server_hop(status=503, error="connect_failure", tries=3, upstream_duration=0.0)
    (span,) = decode(encode([hop]))
    assert span.status.code == Status.STATUS_CODE_ERROR
    attrs = attributes(span)
    assert attrs["error.type"] == "connect_failure"
    assert attrs["meshgate.retries"] == 2


def test_unrouted_request_has_no_endpoint() -> None:
    hop = server_hop(status=404, error="no_route", destination="unknown", subset="", route="", endpoint=None, tries=0)
    (span,) = decode(encode([hop]))
    attrs = attributes(span)
    assert "meshgate.endpoint" not in attrs
    assert attrs["meshgate.service"] == "unknown"
    assert attrs["meshgate.retries"] == 0  # no try at all is not minus one retry
    assert attrs["error.type"] == "no_route"


def test_a_batch_keeps_every_span_in_order() -> None:
    hops = [server_hop(span_id=b"%016x" % (n + 1), status=200 + n) for n in range(50)]
    spans = decode(encode(hops))
    assert [span.span_id for span in spans] == [bytes.fromhex("%016x" % (n + 1)) for n in range(50)]
    assert [attributes(span)["http.response.status_code"] for span in spans] == [200 + n for n in range(50)]


# --- the same message as the official classes build ----------------------------------------------------------


def assert_same_message(hops: list[tuple[Any, ...]], group: str = "catalog") -> None:
    decoded = ExportTraceServiceRequest.FromString(encode(hops, group))
    expected = otlp_reference.encode(hops, otlp_reference.resource(group))
    assert decoded == ExportTraceServiceRequest.FromString(expected)


EDGE_CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "no parent": {"parent_span_id": b""},
    "source reporter": {"reporter": "source"},
    "gateway error": {"status": 503, "error": "connect_failure", "tries": 3, "upstream_duration": 0.0},
    "upstream 500, not retried": {"status": 500, "tries": 1},
    "5xx retried": {"status": 502, "tries": 3},
    "client disconnect": {"status": 499, "error": "downstream_disconnect"},
    "unrouted": {"status": 404, "error": "no_route", "destination": "unknown", "subset": "", "route": "", "tries": 0},
    "no endpoint": {"endpoint": None, "status": 503, "error": "no_healthy_upstream", "tries": 0},
    "many retries": {"tries": 40},
    "status 100": {"status": 100},
    "status 999": {"status": 999},
    "unicode path": {"target": "/caf\u00e9/\u65e5\u672c?q=\u00fc".encode()},
    "latin-1 path": {"target": b"/\xff\xfe\x80?x"},
    "only a query": {"target": b"?a=1"},
    "empty target": {"target": b""},
    "long path": {"target": b"/" + b"p" * 200},
    "path near a varint boundary": {"target": b"/" + b"q" * 126},
    "very long path": {"target": b"/" + b"r" * 20_000 + b"?x=" + b"s" * 100},
    "long request id": {"request_id": b"r" * 128},
    "unicode request id": {"request_id": "id-\u00e9".encode("latin-1")},
    "zero times": {"start": 0.0, "duration": 0.0, "upstream_duration": 0.0},
    "huge times": {"start": 18_000_000_000.0, "duration": 86_400.0, "upstream_duration": 86_000.0},
    "tiny times": {"start": 1e-9, "duration": 1e-9, "upstream_duration": 1e-12},
    "host with port": {"host": b"catalog:8080"},
    "ipv6 host with port": {"host": b"[::1]:8080"},
    "ipv6 host": {"host": b"[fe80::1]"},
    "bare ipv6": {"host": b"fe80::1"},
    "host with a bad port": {"host": b"catalog:http"},
    "empty host": {"host": b""},
    "unicode host": {"host": "caf\u00e9.example".encode()},
    "ipv6 peer": {"peer": b"::ffff:10.0.0.1"},
    "unicode method": {"method": b"G\xc9T"},
    "extension method": {"method": b"PROPFIND"},
    "unicode labels": {"source": "\u00e9quipe", "route": "r\u00f6ute", "subset": "v\u00b2"},
}


@pytest.mark.parametrize("fields", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_same_message_as_the_official_classes(fields: dict[str, Any]) -> None:
    assert_same_message([server_hop(**fields)])


def random_hop(rng: random.Random) -> tuple[Any, ...]:
    def text(alphabet: str, longest: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(longest)))

    status = rng.choice([200, 201, 204, 301, 404, 429, 499, 500, 502, 503, 504])
    return server_hop(
        start=rng.choice([0.0, rng.uniform(0, 2e9), rng.uniform(1.7e9, 1.8e9)]),
        request_id=text("0123456789abcdef-", 129).encode() or b"x",
        trace_id=b"%032x" % rng.getrandbits(128),
        span_id=b"%016x" % rng.getrandbits(64),
        parent_span_id=rng.choice([b"", b"%016x" % rng.getrandbits(64)]),
        reporter=rng.choice(["source", "destination"]),
        source=rng.choice(["shop", "external", "unknown"]),
        destination=rng.choice(["catalog", "unknown", "payments"]),
        subset=rng.choice(["", "v1", "v2"]),
        route=rng.choice(["", "default", "canary-header"]),
        endpoint=rng.choice([None, "127.0.0.1:9101", "[::1]:9102"]),
        method=rng.choice([b"GET", b"POST", b"DELETE", b"OPTIONS"]),
        target=("/" + text("abc/?=&%\u00e9\u65e5 ", 300)).encode(),
        host=rng.choice([b"catalog", b"catalog:8080", b"[::1]:15001", b"10.0.0.7"]),
        status=status,
        duration=rng.choice([0.0, rng.uniform(0, 0.01), rng.uniform(0, 100)]),
        upstream_duration=rng.choice([0.0, rng.uniform(0, 0.01)]),
        tries=rng.randrange(0, 20),
        error=rng.choice(["", "", "", "reset", "per_try_timeout", "overflow"]),
        peer=rng.choice([b"127.0.0.1", b"10.1.2.3", b"::1"]),
    )


@pytest.mark.parametrize("seed", range(5))
def test_same_message_for_random_batches(seed: int) -> None:
    rng = random.Random(seed)
    assert_same_message([random_hop(rng) for _ in range(300)], group=rng.choice(["catalog", "shop", "\u00e9"]))


def test_caches_stay_bounded_under_a_flood_of_hosts_and_peers() -> None:
    encoder = SpanEncoder("catalog")
    hops = [server_hop(host=b"h%d" % n, peer=b"10.0.%d.%d" % (n // 256, n % 256)) for n in range(5000)]
    spans = decode(encoder.request(encoder.spans(hops)))
    assert [attributes(span)["server.address"] for span in spans] == [f"h{n}" for n in range(5000)]
    assert len(encoder.routes) <= 1024 and len(encoder.peers) <= 1024


def test_batches_larger_than_one_chunk_are_sent_whole() -> None:
    """`send()` encodes a batch in chunks between yields to the loop; the body still holds every span in order."""
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(200)

    metrics = Metrics()
    exporter = Exporter("http://collector/v1/traces", "catalog", metrics)
    hops = [server_hop(span_id=b"%016x" % (n + 1)) for n in range(1000)]

    async def send() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await exporter.send(client, hops)

    asyncio.run(send())
    (body,) = bodies
    assert [span.span_id for span in decode(body)] == [bytes.fromhex("%016x" % (n + 1)) for n in range(1000)]
    assert metrics.counters == {("meshgate_spans_exported_total", "catalog"): 1000}


# --- the exporter's bounded queue ---------------------------------------------------------------------------


def test_exporter_queue_is_bounded_and_counts_what_it_drops() -> None:
    metrics = Metrics()
    exporter = Exporter("http://127.0.0.1:9/v1/traces", "catalog", metrics)
    for _ in range(MAX_QUEUED + 7):
        exporter.add(server_hop())
    assert len(exporter.queue) == MAX_QUEUED
    assert metrics.counters[("meshgate_spans_dropped_total", "catalog")] == 7


def test_a_failed_send_counts_the_batch_as_dropped() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
    try:
        metrics = Metrics()
        exporter = Exporter(f"http://127.0.0.1:{sock.getsockname()[1]}/v1/traces", "catalog", metrics)

        async def send() -> None:
            async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
                await asyncio.wait_for(exporter.send(client, [server_hop(), server_hop()]), 10)

        asyncio.run(send())
    finally:
        sock.close()
    assert metrics.counters.get(("meshgate_spans_dropped_total", "catalog")) == 2
    assert ("meshgate_spans_exported_total", "catalog") not in metrics.counters


# --- credentials: a joined gateway's spans to its dashboard ------------------------------------------------


@pytest.mark.parametrize(
    ("control", "endpoint", "sends_token"),
    [
        ("https://10.0.0.5:9000", None, True),  # the default: the dashboard's own /v1/traces
        ("https://10.0.0.5:9000", "https://10.0.0.5:9000/v1/traces", True),  # named, as the demo does
        ("https://Dash.example", "https://dash.example:443/v1/traces", True),  # the same origin, spelt otherwise
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000/v1/traces", True),
        ("https://10.0.0.5:9000", "http://jaeger:4318/v1/traces", False),  # another collector never sees it
        ("https://10.0.0.5:9000", "https://10.0.0.5:4318/v1/traces", False),  # another port is another server
        ("https://10.0.0.5:9000", "http://10.0.0.5:9000/v1/traces", False),  # nor in plaintext
    ],
)
def test_a_joined_gateway_sends_its_join_token_with_spans_to_its_dashboard_only(
    control: str, endpoint: str | None, sends_token: bool
) -> None:
    gateway = {"telemetry": {"tracing": {"endpoint": endpoint}}} if endpoint else None
    settings = JoinSettings(url=control, group="shop", token="mgj_secret", data_dir="unused", gateway=gateway)
    config, peers = mesh_config(settings, {"version": 1, "services": {}, "remote": {}}, "meshgate.local")
    assert config.gateway.telemetry.tracing.endpoint == (endpoint or control + "/v1/traces")
    assert peers.export_headers == ({"authorization": "Bearer mgj_secret"} if sends_token else {})
    assert "mgj_secret" not in repr(peers)  # Peers are logged and sent to workers: the token stays out of text


class Receiver:
    """An OTLP/HTTP endpoint on 127.0.0.1 that takes batches only with `Authorization: Bearer good`, as the
    dashboard takes them from beyond loopback, and records the headers of each POST. A stand-in on purpose: these
    tests are about the Exporter (what it sends, how it logs a refusal), and the dashboard would take loopback
    spans without a token; tests/e2e/test_traces.py runs a real dashboard beyond loopback with a real gateway."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.headers.append({key.lower(): value for key, value in self.headers.items()})
                ok = self.headers.get("authorization") == "Bearer good"
                body = b"" if ok else b'{"error": "spans from 10.1.2.3 (beyond loopback) need a token"}\n'
                self.send_response(200 if ok else 401)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_the_exporter_sends_its_credentials_and_says_once_why_it_was_refused(caplog: pytest.LogCaptureFixture) -> None:
    receiver = Receiver()
    try:
        metrics = Metrics()
        good = Exporter(receiver.url, "catalog", metrics, headers={"authorization": "Bearer good"})
        bad = Exporter(receiver.url, "shop", metrics)

        async def send() -> None:
            async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
                for exporter in (good, bad, bad, bad):
                    await asyncio.wait_for(exporter.send(client, [server_hop()]), 10)

        with caplog.at_level(logging.WARNING, logger="meshgate.otlp"):
            asyncio.run(send())
    finally:
        receiver.stop()
    assert [headers.get("authorization") for headers in receiver.headers] == ["Bearer good", None, None, None]
    assert all(headers["content-type"] == "application/x-protobuf" for headers in receiver.headers)
    assert metrics.counters[("meshgate_spans_exported_total", "catalog")] == 1
    assert metrics.counters[("meshgate_spans_dropped_total", "catalog")] == 3
    assert [record.getMessage() for record in caplog.records] == [
        f"OTLP export to {receiver.url} refused, spans dropped: HTTP 401: "
        '{"error": "spans from 10.1.2.3 (beyond loopback) need a token"}'
    ]
