"""Unit tests of the admin handler's /metrics negotiation: Prometheus text unless the Accept header asks for
OpenMetrics, which then carries the latency buckets' exemplars. Handlers are called directly, with no sockets.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from gateway.admin import OPENMETRICS, PROMETHEUS, admin_handler, wants_openmetrics
from gateway.config import Config
from gateway.runtime import AdminState
from gateway.telemetry import merge

HELLO = ("destination", "unknown", "hello", "v1", "default")
TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"

# What Prometheus 2.42 (Debian's) sends when scraping, and variants of it.
PROMETHEUS_ACCEPT = (
    b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    b"text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("accept", "wanted"),
    [
        (PROMETHEUS_ACCEPT, True),
        (b"application/openmetrics-text", True),
        (b"text/plain;q=0.9, Application/OpenMetrics-Text; version=1.0.0; q=0.5", True),
        (b"application/openmetrics-text;q=0", False),
        (b"application/openmetrics-text; q=0.0, text/plain", False),
        (b"text/plain;version=0.0.4", False),
        (b"*/*", False),
        (b"", False),
        (b"application/json", False),
    ],
)
def test_wants_openmetrics(accept: bytes, wanted: bool) -> None:
    assert wants_openmetrics(accept) is wanted


def scrape(accept: bytes | None) -> tuple[str, str]:
    stats = merge([])
    stats["series"] = {HELLO: ({200: 2}, [0, 0, 0, 0, 0, 2] + [0] * 11, 0.007)}
    stats["exemplars"] = {HELLO: {5: (TRACE, b"req-1", 0.004, 1_700_000_000.5)}}
    state = AdminState(config=Config.parse({}), stats=lambda: stats, lookup=lambda request_id: [])
    headers = {} if accept is None else {b"accept": accept}
    answer: Any = admin_handler(state)(b"GET", b"/metrics", b"127.0.0.1", headers)
    status, content_type, body = answer
    assert status == 200
    return content_type, body.decode()


def test_metrics_is_prometheus_text_by_default() -> None:
    for accept in (None, b"text/plain;version=0.0.4", b"*/*"):
        content_type, text = scrape(accept)
        assert content_type == PROMETHEUS
        assert "# EOF" not in text and "trace_id" not in text
        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"meshgate_requests", "meshgate_request_duration_seconds", "meshgate_config_version"} <= names


def test_metrics_is_openmetrics_with_exemplars_when_prometheus_asks() -> None:
    content_type, text = scrape(PROMETHEUS_ACCEPT)
    assert content_type == OPENMETRICS
    families = {family.name: family for family in openmetrics_families(text)}  # type: ignore[no-untyped-call]
    (exemplar,) = [s.exemplar for s in families["meshgate_request_duration_seconds"].samples if s.exemplar]
    assert exemplar.labels == {"trace_id": TRACE.decode(), "request_id": "req-1"} and exemplar.value == 0.004
    assert families["meshgate_config_version"].type == "gauge"
    # The same series, counts and other families as the plain text: only the format and the exemplars differ.
    plain = {family.name: family for family in text_string_to_metric_families(scrape(None)[1])}
    assert set(plain) == set(families)
    for name, family in plain.items():
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        assert values == {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families[name].samples}, name


@pytest.mark.parametrize(("ready", "status"), [(False, 503), (True, 200)])
def test_metrics_listener_answers_ready_like_the_admin_listener(ready: bool, status: int) -> None:
    state = AdminState(config=Config.parse({}), stats=lambda: merge([]), lookup=lambda request_id: [], ready=ready)
    admin: Any = admin_handler(state)(b"GET", b"/ready", b"10.0.0.9", {})
    metrics: Any = admin_handler(state, metrics_only=True)(b"GET", b"/ready", b"10.0.0.9", {})
    assert metrics == admin and metrics[0] == status


def test_metrics_listener_refuses_the_other_admin_paths() -> None:
    state = AdminState(config=Config.parse({}), stats=lambda: merge([]), lookup=lambda request_id: [], ready=True)
    for path in (b"/healthz", b"/config", b"/requests/abc"):
        answer: Any = admin_handler(state, metrics_only=True)(b"GET", path, b"127.0.0.1", {})
        assert answer[0] == 404 and answer[2] == b"this listener serves /metrics and /ready only\n", path
