"""The OTLP/HTTP receiver and the span store, through a real uvicorn dashboard on loopback and a real SQLite file.

Spans are encoded with the official opentelemetry-proto classes (protobuf, and OTLP/JSON with hex ids, plain and
gzipped), as SDKs and the gateways' exporter send them. Covers: what a stored span looks like when looked up by
request ID and by trace ID; partial_success and counts for invalid spans; bad bodies; the bounds (count and age,
oldest traces first, drops counted by reason); a blocked writer that drops at its queue's bound while requests are
still answered at once; the recent-traces list and its filters; who may read; a store reopened from its file.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from dashboard.otlp import JSON, decode_export, export_response, span_rows
from dashboard.spans import DB_FILE, PRUNE_INTERVAL, SpanStore, TraceFilters
from tests.conftest import wait_for
from tests.dashboard.dashboards import Dashboard, running
from tests.dashboard.otlp_requests import (
    PROTOBUF,
    app_span,
    attr,
    export,
    hop_span,
    metric,
    new_span_id,
    new_trace_id,
    post,
)


@pytest.fixture
def span_store(tmp_path: Path) -> Iterator[SpanStore]:
    spans = SpanStore(str(tmp_path / "data" / DB_FILE))
    yield spans
    asyncio.run(spans.close())


@pytest.fixture
def dash(tmp_path: Path, span_store: SpanStore) -> Iterator[Dashboard]:
    with running(tmp_path / "data", spans=span_store) as dashboard:
        dashboard.seed()
        yield dashboard


@pytest.fixture
def viewer(dash: Dashboard) -> Iterator[httpx.Client]:
    with dash.client(dash.token("viewer", name="victor")) as client:
        yield client


def found(client: httpx.Client, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The lookup of `request_id`, once the writer has stored it (writes are off the request path)."""
    answer = wait_for(
        lambda: (reply := client.get("/api/v1/traces", params={"request_id": request_id})).status_code == 200 and reply,
        timeout,
        what=f"request {request_id} in the span store",
    )
    result: dict[str, Any] = answer.json()
    return result


def two_hops(request_id: str, caller_status: int = 200, owner_status: int = 200) -> tuple[str, str, str, Any, Any]:
    """A call from shop to catalog as the two gateways export it: (trace, caller span, owner span, requests)."""
    trace_id, caller_id, owner_id = new_trace_id(), new_span_id(), new_span_id()
    start = time.time()
    caller = hop_span(
        trace_id, caller_id, reporter="source", status=caller_status, request_id=request_id, start=start, duration_ms=5
    )
    owner = hop_span(
        trace_id, owner_id, caller_id, status=owner_status, request_id=request_id, start=start + 0.001, retries=1
    )
    shop = export(caller, service="meshgate-gateway-shop", group="shop")
    return trace_id, caller_id, owner_id, shop, export(owner)


def test_protobuf_spans_are_found_by_request_id_and_by_trace_id(dash: Dashboard, viewer: httpx.Client) -> None:
    trace_id, caller_id, owner_id, shop, catalog = two_hops("req-proto-1", 503, 503)
    with dash.client() as anonymous:  # an OTel collector endpoint: no token
        for request in (shop, catalog):
            answer = post(anonymous, request)
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == PROTOBUF
            reply = ExportTraceServiceResponse.FromString(answer.content)
            assert not reply.HasField("partial_success")
    result = found(viewer, "req-proto-1")
    assert (result["trace_id"], result["request_id"], result["trace_ids"]) == (trace_id, "req-proto-1", [trace_id])
    assert result["gateways_asked"] == [] and result["unreachable"] == []  # no gateway has heartbeated
    caller, owner = result["spans"]
    assert (caller["span_id"], caller["parent_span_id"], owner["span_id"], owner["parent_span_id"]) == (
        caller_id,
        "",
        owner_id,
        caller_id,
    )
    assert caller["service"] == "meshgate-gateway-shop" and caller["group"] == "shop"
    assert (caller["kind"], caller["reporter"], caller["caller"], caller["destination"]) == (
        "client",
        "source",
        "shop",
        "catalog",
    )
    assert (owner["kind"], owner["group"], owner["subset"], owner["route"], owner["endpoint"]) == (
        "server",
        "catalog",
        "v1",
        "default",
        "127.0.0.1:9101",
    )
    assert (owner["status"], owner["error"], owner["tries"], owner["method"], owner["path"]) == (
        503,
        "503",
        2,
        "GET",
        "/echo",
    )
    assert owner["duration_ms"] == pytest.approx(2.0) and owner["start"] > caller["start"]
    assert owner["source"] == "store" and owner["found_in"] == ["store"]
    assert owner["attributes"]["network.peer.address"] == "127.0.0.1"
    assert owner["attributes"]["resource.service.name"] == "meshgate-gateway-catalog"
    by_trace = viewer.get(f"/api/v1/traces/{trace_id}")
    assert by_trace.status_code == 200, by_trace.text
    assert by_trace.json()["spans"] == result["spans"] and by_trace.json()["request_id"] == "req-proto-1"
    assert viewer.get(f"/api/v1/traces/{trace_id.upper()}").json()["trace_id"] == trace_id


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_otlp_json_with_hex_ids_is_stored_under_those_ids(
    dash: Dashboard, viewer: httpx.Client, compress: bool
) -> None:
    trace_id, _, owner_id, shop, catalog = two_hops("req-json-1")
    catalog.resource_spans[0].scope_spans[0].spans.append(app_span(trace_id, new_span_id(), owner_id, after=0.01))
    with dash.client() as anonymous:
        for request in (shop, catalog):
            answer = post(anonymous, request, JSON, compress)
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == JSON
            reply = json_format.Parse(answer.text, ExportTraceServiceResponse())
            assert not reply.HasField("partial_success")
    result = found(viewer, "req-json-1")
    assert result["trace_id"] == trace_id  # the hex ids, not base64 read as bytes
    assert [span["span_id"] for span in result["spans"]][1] == owner_id
    application = result["spans"][2]  # the app's span carries no request ID, but its trace does
    assert (application["name"], application["service"], application["parent_span_id"]) == (
        "load cart",
        "meshgate-gateway-catalog",
        owner_id,
    )
    assert application["attributes"]["cart.items"] == 3 and application["request_id"] is None


def test_invalid_spans_are_rejected_in_partial_success_and_counted(dash: Dashboard, viewer: httpx.Client) -> None:
    trace_id = new_trace_id()
    good = hop_span(trace_id, new_span_id(), request_id="req-partial")
    zero_trace = hop_span("00" * 16, new_span_id(), request_id="req-partial")
    short_span = hop_span(trace_id, new_span_id())
    short_span.span_id = b"\x01\x02"
    with dash.client() as anonymous:
        answer = post(anonymous, export(good, zero_trace, short_span))
        reply = ExportTraceServiceResponse.FromString(answer.content)
        assert answer.status_code == 200
        assert reply.partial_success.rejected_spans == 2
        assert "invalid trace or span ids" in reply.partial_success.error_message
        as_json = post(anonymous, export(zero_trace), JSON)
        # Proto3's JSON mapping (which OTLP/JSON follows) writes int64 as a decimal string.
        rejected = {"rejectedSpans": "1", "errorMessage": "1 with invalid trace or span ids"}
        assert as_json.json() == {"partialSuccess": rejected}
        assert [span["span_id"] for span in found(viewer, "req-partial")["spans"]] == [good.span_id.hex()]
        assert metric(anonymous, "meshgate_dashboard_spans_received_total") == 4
        assert metric(anonymous, "meshgate_dashboard_spans_dropped_total", reason="invalid") == 3
        wait_for(lambda: metric(anonymous, "meshgate_dashboard_spans_stored") == 1, what="one span stored")


def test_bad_bodies_get_one_line_errors(dash: Dashboard) -> None:
    bomb = gzip.compress(bytes(40 << 20))  # 40 MiB of zeros in ~40 KB
    cases = [
        (b"\xff\xff\xff", {"content-type": PROTOBUF}, 400, "invalid OTLP protobuf body"),
        (b"{not json", {"content-type": JSON}, 400, "invalid OTLP/JSON body"),
        (b'{"resourceSpans": 7}', {"content-type": JSON}, 400, "invalid OTLP/JSON body"),
        (b"spans", {"content-type": "text/plain"}, 415, "content-type: expected application/x-protobuf"),
        (b"", {}, 415, "content-type"),
        (b"x", {"content-type": PROTOBUF, "content-encoding": "br"}, 415, "content-encoding"),
        (b"not gzip", {"content-type": PROTOBUF, "content-encoding": "gzip"}, 400, "invalid gzip body"),
        (bomb, {"content-type": PROTOBUF, "content-encoding": "gzip"}, 413, "inflates to more than"),
    ]
    with dash.client() as anonymous:
        for body, headers, status, fragment in cases:
            answer = anonymous.post("/v1/traces", content=body, headers=headers)
            assert answer.status_code == status, (fragment, answer.text)
            assert list(answer.json()) == ["error"] and fragment in answer.json()["error"], answer.text
        assert metric(anonymous, "meshgate_dashboard_spans_received_total") == 0


def test_the_store_keeps_the_newest_traces_within_max_spans(tmp_path: Path) -> None:
    spans = SpanStore(str(tmp_path / DB_FILE), max_spans=10)
    try:
        with running(tmp_path / "data", spans=spans) as dash, dash.client(dash.token("viewer")) as viewer:
            start = time.time()
            traces = []
            for n in range(6):  # six traces of three spans, one second apart: oldest first
                trace_id, first = new_trace_id(), new_span_id()
                request_id = f"req-bound-{n}"
                hops = [hop_span(trace_id, first, request_id=request_id, start=start - 60 + n)]
                hops += [hop_span(trace_id, new_span_id(), first, start=start - 60 + n + 0.01) for _ in range(2)]
                assert post(viewer, export(*hops)).status_code == 200
                traces.append(request_id)
            wait_for(
                lambda: metric(viewer, "meshgate_dashboard_spans_dropped_total", reason="count") == 9,
                what="three traces evicted",
            )
            assert metric(viewer, "meshgate_dashboard_spans_stored") == 9  # whole traces go: 3 of 3 spans each
            found_now = [viewer.get("/api/v1/traces", params={"request_id": request_id}) for request_id in traces]
            assert [answer.status_code for answer in found_now] == [404] * 3 + [200] * 3
            recent = viewer.get("/api/v1/traces").json()["traces"]
            assert [line["request_id"] for line in recent] == traces[:2:-1] and {line["spans"] for line in recent} == {
                3
            }
    finally:
        asyncio.run(spans.close())


def test_spans_older_than_max_age_are_dropped_on_arrival_and_evicted_later(tmp_path: Path) -> None:
    now = [time.time()]
    spans = SpanStore(str(tmp_path / DB_FILE), max_age=60, clock=lambda: now[0])
    try:
        with running(tmp_path / "data", spans=spans) as dash, dash.client(dash.token("viewer")) as viewer:
            old = hop_span(new_trace_id(), new_span_id(), request_id="req-old", start=now[0] - 61)
            fresh = hop_span(new_trace_id(), new_span_id(), request_id="req-fresh", start=now[0] - 1)
            assert post(viewer, export(old, fresh)).status_code == 200
            found(viewer, "req-fresh")
            assert viewer.get("/api/v1/traces?request_id=req-old").status_code == 404
            assert metric(viewer, "meshgate_dashboard_spans_dropped_total", reason="age") == 1
            now[0] += 120  # the fresh span is two minutes old now: the writer's next check evicts it
            wait_for(
                lambda: viewer.get("/api/v1/traces?request_id=req-fresh").status_code == 404,
                PRUNE_INTERVAL * 10,
                what="the aged span evicted",
            )
            assert metric(viewer, "meshgate_dashboard_spans_dropped_total", reason="age") == 2
            assert metric(viewer, "meshgate_dashboard_spans_stored") == 0
    finally:
        asyncio.run(spans.close())


def test_a_blocked_writer_drops_at_its_queue_bound_and_requests_are_answered_at_once(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    spans = SpanStore(str(path), max_queued=5)
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        with running(tmp_path / "data", spans=spans) as dash, dash.client(dash.token("viewer")) as viewer:
            lock.execute("BEGIN EXCLUSIVE")  # the writer now waits for this lock (its busy timeout is 10 s)
            trace_id = new_trace_id()
            first = [hop_span(trace_id, new_span_id(), request_id="req-queued") for _ in range(3)]
            second = [hop_span(trace_id, new_span_id(), request_id="req-queued") for _ in range(4)]
            started = time.monotonic()
            assert post(viewer, export(*first)).status_code == 200
            answer = post(viewer, export(*second))
            elapsed = time.monotonic() - started
            reply = ExportTraceServiceResponse.FromString(answer.content)
            assert reply.partial_success.rejected_spans == 2, reply
            assert "the span writer is behind" in reply.partial_success.error_message
            assert elapsed < 2.0, elapsed  # nothing waited for the disk
            assert viewer.get("/api/v1/traces?request_id=req-queued").status_code == 404  # not written yet
            lock.execute("ROLLBACK")
            assert len(found(viewer, "req-queued")["spans"]) == 5
            assert metric(viewer, "meshgate_dashboard_spans_dropped_total", reason="queue") == 2
    finally:
        lock.close()
        asyncio.run(spans.close())


def test_recent_traces_are_newest_first_and_filtered(dash: Dashboard, viewer: httpx.Client) -> None:
    start = time.time() - 10
    ok = hop_span(new_trace_id(), new_span_id(), request_id="r-ok", start=start, duration_ms=5)
    failed = hop_span(new_trace_id(), new_span_id(), request_id="r-5xx", start=start + 1, duration_ms=300, status=503)
    missing = hop_span(
        new_trace_id(),
        new_span_id(),
        request_id="r-404",
        start=start + 2,
        duration_ms=50,
        status=404,
        service="payments",
    )
    application = app_span(new_trace_id(), new_span_id(), "", name="nightly job")
    assert post(viewer, export(ok, failed, missing)).status_code == 200
    assert post(viewer, export(application, service="storefront", group=None)).status_code == 200

    def listed(**params: str) -> list[str | None]:
        answer = viewer.get("/api/v1/traces", params=params)
        assert answer.status_code == 200, answer.text
        return [line["request_id"] or line["name"] for line in answer.json()["traces"]]

    wait_for(lambda: len(listed()) == 4, what="four traces stored")
    assert listed() == ["nightly job", "r-404", "r-5xx", "r-ok"]
    assert listed(service="catalog") == ["r-5xx", "r-ok"]
    assert listed(service="meshgate-gateway-catalog") == ["r-404", "r-5xx", "r-ok"]
    assert listed(service="storefront") == ["nightly job"]
    assert listed(status="5xx") == ["r-5xx"] == listed(status="error")
    assert listed(status="4xx") == ["r-404"]
    assert listed(status="2xx") == ["r-ok"]
    assert listed(min_duration_ms="40") == ["r-404", "r-5xx"]
    assert listed(service="catalog", min_duration_ms="40", status="5xx") == ["r-5xx"]
    assert listed(limit="2") == ["nightly job", "r-404"]
    assert listed(service="", status="") == listed()  # empty form fields are absent
    line = viewer.get("/api/v1/traces", params={"status": "5xx"}).json()["traces"][0]
    assert line == {
        "trace_id": failed.trace_id.hex(),
        "request_id": "r-5xx",
        "name": "GET default",
        "service": "meshgate-gateway-catalog",
        "destination": "catalog",
        "start": pytest.approx(start + 1),
        "duration_ms": pytest.approx(300),
        "status": 503,
        "error": True,
        "spans": 1,
    }
    for params, fragment in [
        ({"status": "6xx"}, "status: expected one of"),
        ({"limit": "0"}, "limit: expected an integer from 1 to 500"),
        ({"min_duration_ms": "-1"}, "min_duration_ms"),
        ({"min_duration_ms": "nan"}, "min_duration_ms"),
        ({"request_id": "r-ok", "service": "catalog"}, "give it alone"),
        ({"request_id": "has space"}, "request_id: expected"),
    ]:
        answer = viewer.get("/api/v1/traces", params=params)
        assert answer.status_code == 400 and fragment in answer.json()["error"], (params, answer.text)
    assert viewer.get("/api/v1/traces/not-hex").status_code == 400


def test_reading_traces_needs_a_viewer_or_operator(dash: Dashboard) -> None:
    trace_id = new_trace_id()
    with dash.client() as anonymous:
        assert post(anonymous, export(hop_span(trace_id, new_span_id(), request_id="req-auth"))).status_code == 200
        assert anonymous.get("/api/v1/traces?request_id=req-auth").status_code == 401
        assert anonymous.get(f"/api/v1/traces/{trace_id}").status_code == 401
        assert anonymous.get("/api/v1/traces").status_code == 401
    with dash.client(dash.token("viewer")) as viewer:
        found(viewer, "req-auth")
    for role, group, status in [("viewer", None, 200), ("operator", None, 200), ("gateway", "shop", 403)]:
        with dash.client(dash.token(role, group)) as client:
            answer = client.get(f"/api/v1/traces/{trace_id}")
            assert answer.status_code == status, (role, answer.text)


def test_unknown_ids_get_a_404_that_says_what_was_asked(dash: Dashboard, viewer: httpx.Client) -> None:
    answer = viewer.get("/api/v1/traces", params={"request_id": "never-seen"})
    assert answer.status_code == 404
    assert answer.json() == {"error": "no spans or hop records for request ID never-seen: asked 0 gateways"}
    trace = new_trace_id()
    assert viewer.get(f"/api/v1/traces/{trace}").json() == {
        "error": f"no spans or hop records for trace {trace}: asked 0 gateways"
    }


def test_without_a_span_store_spans_are_refused_and_lookups_still_answer(tmp_path: Path) -> None:
    with running(tmp_path / "data") as dash, dash.client(dash.token("viewer")) as viewer:
        answer = post(viewer, export(hop_span(new_trace_id(), new_span_id())))
        assert answer.status_code == 404 and "keeps no spans" in answer.json()["error"]
        assert viewer.get("/api/v1/traces").json() == {"traces": []}
        assert viewer.get("/api/v1/traces?request_id=x").status_code == 404
        assert metric(viewer, "meshgate_dashboard_spans_received_total") is None


def test_a_reopened_store_has_its_spans_and_counts(tmp_path: Path) -> None:
    path = str(tmp_path / DB_FILE)
    trace_id = new_trace_id()
    rows, invalid = span_rows(export(*(hop_span(trace_id, new_span_id(), request_id="again") for _ in range(3))))

    async def write_then_read() -> tuple[int, int, list[dict[str, Any]]]:
        first = SpanStore(path)
        assert first.offer(rows, invalid) == 3 and first.wait_written(10)
        await first.close()
        second = SpanStore(path)
        try:
            spans = await second.by_request("again")
            return second.stored, len(spans), await second.recent(TraceFilters())
        finally:
            await second.close()

    stored, by_request, recent = asyncio.run(write_then_read())
    assert (stored, by_request) == (3, 3)
    assert [(line["trace_id"], line["spans"]) for line in recent] == [(trace_id, 3)]


# Decoding, on bytes


def test_decoding_keeps_values_json_can_carry_and_bounds_the_rest() -> None:
    span = hop_span(new_trace_id(), new_span_id())
    del span.attributes[:]
    span.attributes.extend(
        [
            attr("nan", float("nan")),
            attr("long", "x" * 10_000),
            KeyValue(key="bytes", value=AnyValue(bytes_value=b"\x00\xff")),
            KeyValue(
                key="http.request.header.x-request-id",
                value=AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="from-header")])),
            ),
            KeyValue(key="nested", value=AnyValue(kvlist_value=KeyValueList(values=[attr("a", 1), attr("b", True)]))),
            attr("http.status_code", 502),
        ]
    )
    span.attributes.extend(attr(f"extra.{n}", n) for n in range(200))
    message, media = decode_export(export(span).SerializeToString(), "application/x-protobuf; charset=binary")
    assert media == PROTOBUF
    (row,), invalid = span_rows(message)
    assert invalid == 0
    assert (row.request_id, row.http_status, row.error) == ("from-header", 502, 1)
    attributes = json.loads(row.attributes)
    assert attributes["nan"] == "nan" and len(attributes["long"]) == 4096 and attributes["bytes"] == "00ff"
    assert attributes["nested"] == {"a": 1, "b": True} and len(attributes) == 128


def test_json_ids_are_read_as_hex_only_when_they_are_hex_of_an_id_length() -> None:
    trace_id, span_id = new_trace_id(), new_span_id()
    body = (
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "%s", "spanId": "%s", "name": "a", "kind": 2,'
        b' "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": 1700000000001000000, "unknownField": 1}]}]}]}'
    ) % (trace_id.upper().encode(), span_id.encode())
    message, media = decode_export(body, "application/json")
    (row,), _ = span_rows(message)
    assert (row.trace_id, row.span_id, row.kind, row.end_ns - row.start_ns) == (trace_id, span_id, 2, 1_000_000)
    assert media == JSON


def test_the_protobuf_response_is_what_the_official_classes_read() -> None:
    reply = ExportTraceServiceResponse.FromString(export_response(PROTOBUF, 300, "writer behind"))
    assert (reply.partial_success.rejected_spans, reply.partial_success.error_message) == (300, "writer behind")
    assert export_response(PROTOBUF, 0, "") == b"" and export_response(JSON, 0, "") == b"{}"
