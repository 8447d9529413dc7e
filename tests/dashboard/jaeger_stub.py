"""A stub of Jaeger's HTTP query API, because Jaeger itself cannot be installed on this machine.

It is a real HTTP server (`http.server` in a thread, on a loopback port) serving the two endpoints the dashboard
reads, as Jaeger's query service documents and implements them (cmd/query/app/http_handler.go, query_parser.go):

- `GET /api/traces?service=S[&tags={json}][&limit=N][&minDuration=D][&start=µs][&end=µs]`: the traces with a span
  of service S (the process's serviceName) whose tags hold every pair in `tags` (values compared as strings) and
  that lasts at least `minDuration` (a Go duration such as `250ms` or `1500us`); `service` is required (400, as
  Jaeger answers). Newest first, at most `limit` (default 100).
- `GET /api/traces/{traceID}`: one trace, the ID read as a number (so `00..0abc` and `abc` are one trace), or 404.

Answers use Jaeger's envelope `{"data", "total", "limit", "offset", "errors"}` and its JSON model for traces, which
tests build with `jaeger_span` and `jaeger_trace`. Every query is recorded in `queries` for tests to inspect.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_DURATION = re.compile(r"([0-9.]+)(ns|us|µs|ms|s|m|h)")
_UNITS_US = {"ns": 1e-3, "us": 1.0, "µs": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def jaeger_tag(key: str, value: Any) -> dict[str, Any]:
    kind = (
        "bool"
        if isinstance(value, bool)
        else "int64"
        if isinstance(value, int)
        else "float64"
        if isinstance(value, float)
        else "string"
    )
    return {"key": key, "type": kind, "value": value}


def jaeger_span(
    trace_id: str,
    span_id: str,
    parent: str | None,
    operation: str,
    start: float,
    duration_ms: float,
    process: str = "p1",
    **tags: Any,
) -> dict[str, Any]:
    """A span in Jaeger's JSON model; `tags` keys use "__" for "." (`http__response__status_code=200`)."""
    references = [{"refType": "CHILD_OF", "traceID": trace_id, "spanID": parent}] if parent else []
    return {
        "traceID": trace_id,
        "spanID": span_id,
        "flags": 1,
        "operationName": operation,
        "references": references,
        "startTime": int(start * 1e6),
        "duration": int(duration_ms * 1e3),
        "tags": [jaeger_tag(key.replace("__", "."), value) for key, value in tags.items()],
        "logs": [],
        "processID": process,
        "warnings": None,
    }


def jaeger_trace(spans: list[dict[str, Any]], processes: dict[str, str]) -> dict[str, Any]:
    """A trace: `processes` maps process IDs to service names (a gateway's gets its meshgate.group tag)."""
    return {
        "traceID": spans[0]["traceID"],
        "spans": spans,
        "processes": {
            key: {
                "serviceName": service,
                "tags": [jaeger_tag("meshgate.group", service.removeprefix("meshgate-gateway-"))]
                if service.startswith("meshgate-gateway-")
                else [],
            }
            for key, service in processes.items()
        },
        "warnings": None,
    }


class JaegerStub:
    """`url` is the query service's base URL (what `--jaeger` takes); `traces` is what it holds."""

    def __init__(self) -> None:
        self.traces: list[dict[str, Any]] = []
        self.queries: list[tuple[str, dict[str, str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                params = {key: values[0] for key, values in parse_qs(parts.query).items()}
                stub.queries.append((parts.path, params))
                status, body = stub.answer(parts.path, params)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if path.startswith("/api/traces/"):
            wanted = int(path.rsplit("/", 1)[1], 16)
            for trace in self.traces:
                if int(trace["traceID"], 16) == wanted:
                    return 200, _envelope([trace])
            return 404, _envelope(None, [{"code": 404, "msg": "trace not found"}])
        if path != "/api/traces":
            return 404, _envelope(None, [{"code": 404, "msg": "404 page not found"}])
        service = params.get("service")
        if not service:
            return 400, _envelope(None, [{"code": 400, "msg": "parameter 'service' is required"}])
        tags = json.loads(params.get("tags", "{}"))
        minimum = _microseconds(params.get("minDuration", "0us"))
        matching = [trace for trace in self.traces if _matches(trace, service, tags, minimum)]
        matching.sort(key=lambda trace: min(span["startTime"] for span in trace["spans"]), reverse=True)
        return 200, _envelope(matching[: int(params.get("limit", "100"))])


def _matches(trace: dict[str, Any], service: str, tags: dict[str, str], minimum: float) -> bool:
    for span in trace["spans"]:
        process = trace["processes"][span["processID"]]
        values = {tag["key"]: tag["value"] for tag in span["tags"]}
        if process["serviceName"] != service or span["duration"] < minimum:
            continue
        if all(key in values and _text(values[key]) == wanted for key, wanted in tags.items()):
            return True
    return False


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _microseconds(text: str) -> float:
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"unable to parse param 'minDuration': {text}")
    return float(match[1]) * _UNITS_US[match[2]]


def _envelope(data: list[dict[str, Any]] | None, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"data": data, "total": len(data or []), "limit": 0, "offset": 0, "errors": errors}
