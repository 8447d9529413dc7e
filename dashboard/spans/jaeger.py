"""Jaeger's HTTP query API (`--jaeger URL`): where sampled traces are looked up when Jaeger keeps them.

This is the JSON API Jaeger's own UI uses (jaeger-query, port 16686): `GET /api/traces?service=&tags=&limit=
&minDuration=&start=&end=` searches (`service` is required; `tags` is a JSON object of exact tag values, which is
how `guid:x-request-id`, a key with a colon, must be given; `start`/`end` are Unix microseconds and default to the
last two days), and `GET /api/traces/{traceID}` reads one trace (404 when unknown). Answers are
`{"data": [trace...], "errors": [...]}` in Jaeger's JSON model: a trace is `{traceID, spans, processes}`, a span
`{traceID, spanID, operationName, references: [{refType, traceID, spanID}], startTime, duration (µs), tags:
[{key, type, value}], processID}`, a process `{serviceName, tags}`. Jaeger writes 64-bit trace IDs with 16 hex
digits; `spans_of` pads them back to 32 and turns every span into the dashboard's shape (`spans.span_dict`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx

from dashboard.errors import DashboardError
from dashboard.spans.store import integer, span_dict, text

JAEGER_QUERY_TIMEOUT = 5.0  # seconds for one request to Jaeger's query API
_HEX = re.compile(r"[0-9a-f]{1,32}")


class JaegerError(DashboardError):
    """Jaeger could not be asked, or did not answer as its API says; `str(err)` is one line."""

    status = 502


class JaegerQuery:
    """A client of one Jaeger query service.

    >>> jaeger = JaegerQuery("http://jaeger:16686")
    >>> traces = await jaeger.search("meshgate-gateway-shop", tags={"guid:x-request-id": request_id})
    >>> trace = await jaeger.trace("0af7651916cd43dd8448eb211c80319c")   # None when Jaeger has no such trace
    """

    def __init__(self, url: str, timeout: float = JAEGER_QUERY_TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--jaeger: expected an http:// or https:// URL, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout

    async def search(
        self,
        service: str,
        *,
        tags: Mapping[str, str] | None = None,
        limit: int = 20,
        min_duration_ms: float | None = None,
        lookback: float | None = None,
    ) -> list[dict[str, Any]]:
        """Traces with a span of `service` matching `tags`, at most `limit`; `lookback` seconds (Jaeger: 2 days)."""
        params = {"service": service, "limit": str(limit)}
        if tags:
            params["tags"] = json.dumps(dict(tags), separators=(",", ":"))
        if min_duration_ms:
            params["minDuration"] = f"{int(min_duration_ms * 1000)}us"
        if lookback is not None:
            now = time.time()
            params["start"], params["end"] = str(int((now - lookback) * 1e6)), str(int(now * 1e6))
        found = await self._get("/api/traces", params)
        return found or []

    async def trace(self, trace_id: str) -> dict[str, Any] | None:
        found = await self._get(f"/api/traces/{trace_id}", {})
        return found[0] if found else None

    async def _get(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]] | None:
        try:
            async with httpx.AsyncClient(timeout=self.timeout, trust_env=False) as client:
                response = await client.get(self.url + path, params=params)
        except httpx.HTTPError as err:
            raise JaegerError(f"Jaeger at {self.url}: {err or type(err).__name__}") from None
        if response.status_code == 404 and path != "/api/traces":
            return None  # no such trace
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            raise JaegerError(f"Jaeger at {self.url} answered {path} with {response.status_code}: {_reason(body)}")
        data = body.get("data")
        if not isinstance(data, list):
            raise JaegerError(f"Jaeger at {self.url} answered {path} without a data list")
        return [trace for trace in data if isinstance(trace, dict)]


def _reason(body: object) -> str:
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("msg", "?"))
    return "not a Jaeger API answer"


def spans_of(trace: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every well-formed span of a Jaeger trace, in the dashboard's span shape."""
    processes = trace.get("processes")
    processes = processes if isinstance(processes, dict) else {}
    found = []
    for span in trace.get("spans") or ():
        if isinstance(span, dict):
            process = span.get("process") or processes.get(span.get("processID")) or {}
            converted = _span(span, process if isinstance(process, dict) else {})
            if converted is not None:
                found.append(converted)
    return found


def _span(span: dict[str, Any], process: dict[str, Any]) -> dict[str, Any] | None:
    trace_id, span_id = _id(span.get("traceID"), 32), _id(span.get("spanID"), 16)
    start, duration = integer(span.get("startTime")), integer(span.get("duration"))
    if trace_id is None or span_id is None or start is None or duration is None:
        return None
    tags, resource = _tags(span.get("tags")), _tags(process.get("tags"))
    status = integer(tags.get("http.response.status_code")) or integer(tags.get("http.status_code"))
    failed = tags.get("error") is True or tags.get("otel.status_code") == "ERROR"
    error = text(tags.get("error.type")) or ((text(tags.get("otel.status_description")) or "error") if failed else None)
    retries = integer(tags.get("meshgate.retries"))
    return span_dict(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=_parent(span) or "",
        name=text(span.get("operationName")) or "",
        kind=text(tags.get("span.kind")) or "unspecified",
        service=text(process.get("serviceName")),
        group=text(resource.get("meshgate.group")),
        reporter=text(tags.get("meshgate.reporter")),
        caller=text(tags.get("meshgate.source")),
        destination=text(tags.get("meshgate.service")),
        subset=text(tags.get("meshgate.subset")),
        route=text(tags.get("meshgate.route")),
        endpoint=text(tags.get("meshgate.endpoint")),
        method=text(tags.get("http.request.method")) or text(tags.get("http.method")),
        path=text(tags.get("url.path")) or text(tags.get("http.target")),
        start=start / 1e6,
        duration_ms=duration / 1e3,
        status=status,
        error=error or (str(status) if (status or 0) >= 500 else None),
        tries=None if retries is None else retries + 1,
        request_id=text(tags.get("guid:x-request-id")),
        attributes={**tags, **{f"resource.{key}": value for key, value in resource.items()}},
        source="jaeger",
    )


def _id(value: object, digits: int) -> str | None:
    if not isinstance(value, str) or not _HEX.fullmatch(value.lower()) or len(value) > digits:
        return None
    return value.lower().rjust(digits, "0")


def _parent(span: Mapping[str, Any]) -> str | None:
    for reference in span.get("references") or ():
        if isinstance(reference, dict) and reference.get("refType") in ("CHILD_OF", "FOLLOWS_FROM"):
            return _id(reference.get("spanID"), 16)
    return _id(span.get("parentSpanID"), 16)  # older Jaeger versions


def _tags(tags: object) -> dict[str, Any]:
    if not isinstance(tags, list):
        return {}
    return {tag["key"]: tag.get("value") for tag in tags if isinstance(tag, dict) and isinstance(tag.get("key"), str)}


def summarise(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """A trace's line in the recent-traces list (the same keys as the span store's), from its spans."""
    root = min(spans, key=lambda span: (span["parent_span_id"] != "", span["start"]))
    start = min(span["start"] for span in spans)
    end = max(span["start"] + span["duration_ms"] / 1e3 for span in spans)
    return {
        "trace_id": root["trace_id"],
        "request_id": root["request_id"] or next((span["request_id"] for span in spans if span["request_id"]), None),
        "name": root["name"],
        "service": root["service"],
        "destination": root["destination"],
        "start": start,
        "duration_ms": (end - start) * 1e3,
        "status": root["status"],
        "error": any(span["error"] for span in spans),
        "spans": len(spans),
    }
