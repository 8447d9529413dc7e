"""The OTLP/HTTP receiver and the span store, through a real uvicorn dashboard on loopback and a real SQLite file.

Spans are encoded with the official opentelemetry-proto classes (protobuf, and OTLP/JSON with hex ids, plain and
gzipped), as SDKs and the gateways' exporter send them. Covers: what a stored span looks like when looked up by
request ID and by trace ID; partial_success and counts for invalid spans; bad bodies; the bounds (count, bytes on
disk and age, oldest traces first, drops counted by reason; bytes per span and per request; a small gzip body that
once stored hundreds of megabytes); a blocked writer that drops at its queue's bounds while requests are still
answered at once; who may send spans (a token beyond loopback, tested from this host's own non-loopback address)
and which of them are gateway hops (only those sent with that group's join token: the others are marked
unverified, in the API and on the page, and never replace a gateway's own span); the recent-traces list and its
filters; who may read; a store reopened from its file, and one from before upgraded.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
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

from dashboard.settings import MAX_SPAN_BATCH
from dashboard.spans.receiver import (
    DROPPED,
    JSON,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_SPANS,
    MAX_RESOURCE_BYTES,
    MAX_SPAN_BYTES,
    decode_export,
    export_response,
    span_rows,
)
from dashboard.spans.store import DB_FILE, PRUNE_INTERVAL, SpanStore, TraceFilters, from_stored, row_size
from dashboard.ui.pagedata import hop_edge
from tests.conftest import wait_for
from tests.dashboard.dashboards import Dashboard, routed_ipv4, running
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
from tests.dashboard.test_sessions import login


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


def found(client: httpx.Client, request_id: str, timeout: float = 10.0, spans: int = 1) -> dict[str, Any]:
    """The lookup of `request_id`, once the writer has stored `spans` of it (writes are off the request path, and
    the spans of separate requests are written separately)."""

    def stored() -> httpx.Response | None:
        reply = client.get("/api/v1/traces", params={"request_id": request_id})
        return reply if reply.status_code == 200 and len(reply.json()["spans"]) >= spans else None

    answer = wait_for(stored, timeout, what=f"{spans} spans of request {request_id} in the span store")
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
    for group, request in (("shop", shop), ("catalog", catalog)):  # each gateway with its join token
        with dash.client(dash.token("gateway", group)) as gateway:
            answer = post(gateway, request)
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == PROTOBUF
            reply = ExportTraceServiceResponse.FromString(answer.content)
            assert not reply.HasField("partial_success")
    result = found(viewer, "req-proto-1", spans=2)
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
    assert caller["unverified"] is None and owner["unverified"] is None  # each sent by its own group's gateway
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
    result = found(viewer, "req-json-1", spans=3)
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
    inflates_past_plain_limit = gzip.compress(bytes(MAX_SPAN_BATCH + 1))  # no more than a plain body may hold
    gzip_headers = {"content-type": PROTOBUF, "content-encoding": "gzip"}
    cases = [
        (b"\xff\xff\xff", {"content-type": PROTOBUF}, 400, "invalid OTLP protobuf body"),
        (b"{not json", {"content-type": JSON}, 400, "invalid OTLP/JSON body"),
        (b'{"resourceSpans": 7}', {"content-type": JSON}, 400, "invalid OTLP/JSON body"),
        (b"spans", {"content-type": "text/plain"}, 415, "content-type: expected application/x-protobuf"),
        (b"", {}, 415, "content-type"),
        (b"x", {"content-type": PROTOBUF, "content-encoding": "br"}, 415, "content-encoding"),
        (b"not gzip", {"content-type": PROTOBUF, "content-encoding": "gzip"}, 400, "invalid gzip body"),
        (bomb, {"content-type": PROTOBUF, "content-encoding": "gzip"}, 413, "inflates to more than"),
        (inflates_past_plain_limit, gzip_headers, 413, "the gzip body inflates to more than 16777216 bytes"),
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
    rows, invalid, _ = span_rows(export(*(hop_span(trace_id, new_span_id(), request_id="again") for _ in range(3))))

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


# Who may send spans, and which of them are gateway hops


def test_spans_from_beyond_loopback_need_a_token(tmp_path: Path) -> None:
    """The dashboard listens on this host's own non-loopback address, so the test's requests come from beyond
    loopback as a gateway's on another host would (tests/e2e/test_traces.py does it with a real gateway)."""
    address = routed_ipv4()
    spans = SpanStore(str(tmp_path / DB_FILE))
    try:
        with running(tmp_path / "data", spans=spans, host=address) as dash:
            assert dash.url.startswith(f"http://{address}:")
            span = hop_span(new_trace_id(), new_span_id(), request_id="req-remote")
            with dash.client() as anonymous:
                answer = post(anonymous, export(span))
                assert answer.status_code == 401 and answer.headers["www-authenticate"] == 'Bearer realm="meshgate"'
                assert answer.json() == {
                    "error": f"spans from {address} (beyond loopback) need Authorization: Bearer with a gateway's "
                    "join token, or a viewer or operator token"
                }
            with dash.client("mgj_" + "x" * 43) as forged:
                assert post(forged, export(span)).json() == {"error": "unknown token"}
            with dash.client(dash.token("viewer", name="victor")) as viewer:
                assert metric(viewer, "meshgate_dashboard_spans_received_total") == 0  # refused before decoding
                with dash.client(dash.token("gateway", "catalog")) as catalog_gateway:
                    assert post(catalog_gateway, export(span)).status_code == 200
                (hop,) = found(viewer, "req-remote")["spans"]
                assert (hop["group"], hop["reporter"], hop["unverified"]) == ("catalog", "destination", None)
                other = hop_span(new_trace_id(), new_span_id(), request_id="req-remote-viewer")
                assert post(viewer, export(other)).status_code == 200  # any token may send; only a join token proves
                (claimed,) = found(viewer, "req-remote-viewer")["spans"]
                assert claimed["unverified"] == "claims gateway group catalog but was sent by the viewer token victor"
    finally:
        asyncio.run(spans.close())


def test_a_span_claiming_a_gateway_its_sender_did_not_prove_is_shown_unverified_never_as_a_hop(
    dash: Dashboard, viewer: httpx.Client
) -> None:
    trace_id, caller_id, owner_id, shop, catalog = two_hops("req-claims")
    with dash.client(dash.token("gateway", "catalog", name="catalog-1")) as catalog_gateway:
        assert post(catalog_gateway, catalog).status_code == 200  # proven: catalog's own hop
        assert post(catalog_gateway, shop).status_code == 200  # shop's hop, sent with catalog's token
    stray = hop_span(trace_id, new_span_id(), owner_id, request_id="req-claims", start=time.time() + 0.01)
    with dash.client() as anonymous:  # loopback, no credentials: taken, as a local collector's spans are
        assert post(anonymous, export(stray, service="storefront", group=None)).status_code == 200
        wait_for(lambda: metric(anonymous, "meshgate_dashboard_spans_unverified_total") == 2, what="two counted")

    def all_three() -> list[dict[str, Any]] | None:
        spans: list[dict[str, Any]] = found(viewer, "req-claims")["spans"]
        return spans if len(spans) == 3 else None

    caller, owner, third = wait_for(all_three, what="three spans")
    assert (owner["span_id"], owner["group"], owner["reporter"], owner["unverified"]) == (
        owner_id,
        "catalog",
        "destination",
        None,
    )
    assert caller["span_id"] == caller_id and caller["unverified"] == (
        "claims gateway group shop but was sent by the join token catalog-1 of group catalog"
    )
    assert third["unverified"] == "claims a gateway hop but was sent by a loopback client without credentials"
    for unproven in (caller, third):  # shown with what they say, but not as any gateway's hop
        assert unproven["group"] is None and unproven["reporter"] is None
        assert unproven["attributes"]["meshgate.reporter"] in ("source", "destination")
    assert caller["attributes"]["resource.meshgate.group"] == "shop"
    assert hop_edge(owner) == "group:shop>service:catalog"  # a proven hop draws its edge on the trace's path
    assert hop_edge({**owner, "unverified": "claims ..."}) == ""  # an unproven one never does, whatever it says
    with dash.client() as browser:
        login(browser, dash.token("viewer"))
        page = browser.get("/traces", params={"q": "req-claims"}).text
    rows = re.findall(r'<tr class="hop[^"]*" data-span="([0-9a-f]+)">(.*?)</tr>', page, re.S)
    marked = {span_id: 'class="badge warn unverified"' in row for span_id, row in rows}
    assert marked == {caller_id: True, owner_id: False, third["span_id"]: True}
    assert "claims gateway group shop but was sent by the join token catalog-1 of group catalog" in page


def test_a_gateways_span_replaces_an_unproven_one_posted_first_under_its_ids(
    dash: Dashboard, viewer: httpx.Client
) -> None:
    """Whoever sees a hop's traceparent (the upstream application does) knows its span ID and may post a span under
    it before the gateway's batch arrives: the gateway's own still wins."""
    trace_id, _, owner_id, _, catalog = two_hops("req-first")
    forged = hop_span(trace_id, owner_id, status=500, request_id="req-first", error="forged")
    with dash.client() as anonymous:
        assert post(anonymous, export(forged)).status_code == 200
        assert found(viewer, "req-first")["spans"][0]["status"] == 500
        with dash.client(dash.token("gateway", "catalog")) as catalog_gateway:
            assert post(catalog_gateway, catalog).status_code == 200

        def proven() -> list[dict[str, Any]] | None:
            spans: list[dict[str, Any]] = found(viewer, "req-first")["spans"]
            return spans if spans[0]["unverified"] is None else None

        (owner,) = wait_for(proven, what="the gateway's span in place of the forged one")
        assert (owner["status"], owner["error"], owner["group"]) == (200, None, "catalog")
        assert post(anonymous, export(forged)).status_code == 200  # and a forged one after it changes nothing
        wait_for(lambda: metric(anonymous, "meshgate_dashboard_spans_dropped_total", reason="duplicate") == 1)
        assert found(viewer, "req-first")["spans"] == [owner]


# Bounds on what requests store


def test_a_small_gzip_body_stores_no_more_than_its_spans_bounded_size(dash: Dashboard, viewer: httpx.Client) -> None:
    """The issue's case: a ~70 KB gzip body whose resource (stored with every span) carries 126 attributes of 4 KiB
    stored half a megabyte per span, hundreds of megabytes in all; each stored span is now at most MAX_SPAN_BYTES,
    its resource at most MAX_RESOURCE_BYTES of that, and what did not fit is counted."""
    request = export(*(hop_span(new_trace_id(), new_span_id(), request_id=f"req-gz-{n}") for n in range(1500)))
    request.resource_spans[0].resource.attributes.extend(attr(f"r{n}", "y" * 4096) for n in range(126))
    body = gzip.compress(request.SerializeToString())
    assert 50_000 < len(body) < 90_000, len(body)
    before = metric(viewer, "meshgate_dashboard_spans_store_bytes")
    assert before is not None
    with dash.client() as anonymous:
        headers = {"content-type": PROTOBUF, "content-encoding": "gzip"}
        assert anonymous.post("/v1/traces", content=body, headers=headers).status_code == 200
    wait_for(lambda: metric(viewer, "meshgate_dashboard_spans_stored") == 1500, what="1500 spans stored")
    grown = (metric(viewer, "meshgate_dashboard_spans_store_bytes") or 0) - before
    assert grown < 1500 * 2048, grown  # about a kilobyte a span, as a gateway's; it was 1500 x 0.5 MB
    (span,) = found(viewer, "req-gz-7")["spans"]
    assert span["attributes"]["resource.otel.dropped_attributes_count"] == 126
    assert span["attributes"]["resource.service.name"] == "meshgate-gateway-catalog"


def test_a_request_is_bounded_in_spans_and_in_what_it_stores(dash: Dashboard, viewer: httpx.Client) -> None:
    with dash.client() as anonymous:
        many = export(*(app_span(new_trace_id(), new_span_id(), "") for _ in range(MAX_REQUEST_SPANS + 1)))
        answer = post(anonymous, many)
        assert answer.status_code == 413
        assert answer.json() == {"error": "8193 spans in one request; at most 8192: send smaller batches"}
        assert metric(anonymous, "meshgate_dashboard_spans_received_total") == 0
        # A 3 KB resource is stored with each of 8192 small spans: 25 MB, past the MAX_REQUEST_BYTES a request may
        # store, from a body of under 1 MB.
        spans = (app_span(new_trace_id(), new_span_id(), "") for _ in range(MAX_REQUEST_SPANS))
        small = export(*spans, service="bulk", group=None)
        small.resource_spans[0].resource.attributes.extend(attr(f"r{n}", "y" * 1000) for n in range(3))
        answer = post(anonymous, small)
        reply = ExportTraceServiceResponse.FromString(answer.content)
        assert answer.status_code == 200
        stored = MAX_REQUEST_SPANS - reply.partial_success.rejected_spans
        assert MAX_REQUEST_BYTES // 4096 < stored < MAX_REQUEST_BYTES // 3000  # the first 16 MiB, about 3 KB each
        assert (
            reply.partial_success.error_message == f"{MAX_REQUEST_SPANS - stored} past the 16 MiB one request may store"
        )
        assert (
            metric(anonymous, "meshgate_dashboard_spans_dropped_total", reason="oversize") == MAX_REQUEST_SPANS - stored
        )
        wait_for(lambda: metric(anonymous, "meshgate_dashboard_spans_stored") == stored, what="the rest stored")


def test_the_store_stays_within_max_bytes_and_gives_freed_space_back(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    now = [time.time()]
    spans = SpanStore(str(path), max_bytes=2 << 20, max_age=3600, clock=lambda: now[0])
    try:
        for batch in range(8):  # 8 x 100 spans of ~12 KB, a trace each: ~10 MB through a 2 MiB store
            large = [hop_span(new_trace_id(), new_span_id(), request_id=f"req-{batch}-{n}") for n in range(100)]
            for span in large:
                span.attributes.extend(attr(f"a{n}", os.urandom(1500).hex()) for n in range(4))
            rows = span_rows(export(*large)).rows
            assert spans.offer(rows) == 100 and spans.wait_written(30)
            assert spans.used_bytes <= 2 << 20
            assert path.stat().st_size <= (2 << 20) + (2 << 20) // 8  # plus the slack of freed pages it keeps
        assert spans.dropped["size"] == 800 - spans.stored and 100 < spans.stored < 200
        newest = asyncio.run(spans.by_request("req-7-99"))
        assert [span.row.request_id for span in newest] == ["req-7-99"]  # the oldest went, the newest stayed
        now[0] += 7200  # everything ages out: the file gives its pages back
        wait_for(lambda: spans.stored == 0, PRUNE_INTERVAL * 10, what="every span aged out")
        wait_for(lambda: path.stat().st_size < 200_000, 10, what="the file shrunk")
    finally:
        asyncio.run(spans.close())


def test_the_writers_queue_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    spans = SpanStore(str(path), max_queued_bytes=100_000)
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # the writer waits: offers only queue
        large = [hop_span(new_trace_id(), new_span_id()) for _ in range(20)]
        for span in large:
            span.attributes.extend(attr(f"payload{n}", "x" * 4000) for n in range(2))
        rows = span_rows(export(*large)).rows
        sizes = [row_size(row) for row in rows]
        taken = spans.offer(rows)
        assert sum(sizes[:taken]) <= 100_000 < sum(sizes[: taken + 1])
        assert spans.dropped["queue"] == 20 - taken
        assert spans.offer(rows[taken:]) == 0  # still full: nothing was written
        lock.execute("ROLLBACK")
        assert spans.wait_written(10) and spans.stored == taken
    finally:
        lock.close()
        asyncio.run(spans.close())


# The schema of the span store before spans were checked: no `unverified` column, no incremental vacuum.
OLD_SCHEMA = """
CREATE TABLE spans (
    trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_span_id TEXT NOT NULL, name TEXT NOT NULL,
    kind INTEGER NOT NULL, service TEXT NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
    status_code INTEGER NOT NULL, status_message TEXT NOT NULL, http_status INTEGER, mesh_service TEXT,
    request_id TEXT, error INTEGER NOT NULL, attributes TEXT NOT NULL, resource TEXT NOT NULL
);
CREATE UNIQUE INDEX spans_trace ON spans (trace_id, span_id);
CREATE TABLE traces (
    trace_id TEXT PRIMARY KEY, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, spans INTEGER NOT NULL,
    errors INTEGER NOT NULL, root_key INTEGER NOT NULL, name TEXT NOT NULL, service TEXT NOT NULL,
    mesh_service TEXT, http_status INTEGER, request_id TEXT, services TEXT NOT NULL
);
"""


def test_a_store_file_from_before_is_upgraded_and_its_gateway_spans_marked_unproven(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    trace_id = new_trace_id()
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(OLD_SCHEMA)
    gateway, application = span_rows(
        export(hop_span(trace_id, new_span_id(), request_id="old"), app_span(trace_id, new_span_id(), ""))
    ).rows
    for row in (gateway, application._replace(service="shop-app", resource='{"service.name":"shop-app"}')):
        old.execute(f"INSERT INTO spans VALUES ({', '.join('?' * 16)})", row[:16])
    old.close()

    async def reopen() -> list[dict[str, Any]]:
        spans = SpanStore(str(path))
        try:
            return [from_stored(span) for span in await spans.by_traces([trace_id])]
        finally:
            await spans.close()

    hop, app = sorted(asyncio.run(reopen()), key=lambda span: span["service"])
    assert hop["unverified"] == "stored before the dashboard checked who sends gateway spans"
    assert hop["group"] is None and app["unverified"] is None and app["service"] == "shop-app"
    assert sqlite3.connect(path).execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental: it can shrink


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
    (row,), invalid, oversize = span_rows(message)
    assert (invalid, oversize) == (0, 0)
    assert (row.request_id, row.http_status, row.error) == ("from-header", 502, 1)
    attributes = json.loads(row.attributes)
    assert attributes["nan"] == "nan" and len(attributes["long"]) == 4096 and attributes["bytes"] == "00ff"
    assert attributes["nested"] == {"a": 1, "b": True}
    assert len(attributes) == 128 + 1 and attributes[DROPPED] == 206 - 128  # the first 128, and how many were not


def test_json_ids_are_read_as_hex_only_when_they_are_hex_of_an_id_length() -> None:
    trace_id, span_id = new_trace_id(), new_span_id()
    body = (
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "%s", "spanId": "%s", "name": "a", "kind": 2,'
        b' "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": 1700000000001000000, "unknownField": 1}]}]}]}'
    ) % (trace_id.upper().encode(), span_id.encode())
    message, media = decode_export(body, "application/json")
    (row,), _, _ = span_rows(message)
    assert (row.trace_id, row.span_id, row.kind, row.end_ns - row.start_ns) == (trace_id, span_id, 2, 1_000_000)
    assert media == JSON


def test_the_protobuf_response_is_what_the_official_classes_read() -> None:
    reply = ExportTraceServiceResponse.FromString(export_response(PROTOBUF, 300, "writer behind"))
    assert (reply.partial_success.rejected_spans, reply.partial_success.error_message) == (300, "writer behind")
    assert export_response(PROTOBUF, 0, "") == b"" and export_response(JSON, 0, "") == b"{}"


def test_one_span_takes_at_most_max_span_bytes_whatever_it_carries() -> None:
    """Wide (128 attributes of 4096 characters), deep (arrays of key-value lists), escaped (control characters
    take six bytes in JSON), multi-byte names and messages, and a resource that alone would fill it: each stored
    span stays within MAX_SPAN_BYTES and says how many attributes it lost."""
    trace_id = new_trace_id()
    wide = hop_span(trace_id, new_span_id(), request_id="req-wide")
    wide.attributes.extend(attr(f"wide.{n}", "x" * 4096) for n in range(120))
    deep = hop_span(trace_id, new_span_id(), request_id="req-deep")
    level = AnyValue(kvlist_value=KeyValueList(values=[attr(f"k{n}", "z" * 1024) for n in range(16)]))
    deep.attributes.append(KeyValue(key="deep", value=AnyValue(array_value=ArrayValue(values=[level] * 64))))
    escaped = hop_span(trace_id, new_span_id(), request_id="req-escaped")
    escaped.attributes.extend(attr(f"ctl.{n}", "\x01" * 4096) for n in range(8))
    named = hop_span(trace_id, new_span_id(), request_id="req-named", error="boom")
    named.name = "\u20ac" * 4096  # 12 KiB of UTF-8
    named.status.message = "\U0001f600" * 4096  # 16 KiB
    named.dropped_attributes_count = 5  # what the sender had dropped already
    request = export(wide, deep, escaped, named)
    request.resource_spans[0].resource.attributes.extend(attr(f"r{n}", "y" * 2000) for n in range(8))
    rows = span_rows(decode_export(request.SerializeToString(), PROTOBUF)[0]).rows
    by_request = {row.request_id: row for row in rows}
    assert set(by_request) == {"req-wide", "req-deep", "req-escaped", "req-named"}
    for row in rows:
        size = sum(len(text.encode()) for text in (row.name, row.status_message, row.attributes, row.resource))
        assert size <= MAX_SPAN_BYTES, (row.request_id, size)
        resource = json.loads(row.resource)
        assert len(row.resource.encode()) <= MAX_RESOURCE_BYTES and resource[DROPPED] == 7  # one of 2000 fits
        assert resource["service.name"] == "meshgate-gateway-catalog" and resource["meshgate.group"] == "catalog"
    wide_attributes = json.loads(by_request["req-wide"].attributes)
    assert wide_attributes["guid:x-request-id"] == "req-wide" and wide_attributes["http.response.status_code"] == 200
    assert 0 < wide_attributes[DROPPED] < 120 and len(wide_attributes["wide.0"]) == 4096
    assert "deep" not in json.loads(by_request["req-deep"].attributes)  # too big whole: left out, not cut anyhow
    assert json.loads(by_request["req-deep"].attributes)[DROPPED] == 1
    assert json.loads(by_request["req-escaped"].attributes)[DROPPED] > 0
    named_row = by_request["req-named"]
    assert named_row.name == "\u20ac" * (4096 // 3) and len(named_row.status_message.encode()) == 4096
    assert json.loads(named_row.attributes)[DROPPED] == 5 and named_row.error == 1
