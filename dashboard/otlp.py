"""OTLP/HTTP trace export requests, read with the official opentelemetry-proto classes.

`decode_export(body, content_type, content_encoding)` reads an ExportTraceServiceRequest: protobuf, or OTLP/JSON
(whose ids are hex, not proto3 JSON's base64), optionally gzipped. `span_rows` flattens it into one `SpanRow` per
span: ids as hex, times in ns, attributes as JSON (strings and lists cut to bounded sizes), `guid:x-request-id`
pulled out as the request ID, the HTTP status, and whether the span failed. `export_response` is the answer, with
its partial_success when some spans were not taken.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from dashboard.errors import ApiError

MAX_INFLATED = 32 << 20  # bytes a gzip body may inflate to
MAX_TEXT = 4096  # characters kept of a string attribute, name or status message
MAX_ITEMS = 128  # attributes per span, values per array

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_PROTOBUF_TYPES = frozenset((PROTOBUF, "application/protobuf"))
_HEX = re.compile(r"[0-9a-fA-F]*")
_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")
_REQUEST_ID_KEYS = ("guid:x-request-id", "http.request.header.x-request-id")
_STATUS_KEYS = ("http.response.status_code", "http.status_code")
_STATUS_ERROR = 2  # Status.STATUS_CODE_ERROR


def decode_export(body: bytes, content_type: str | None, content_encoding: str | None = None) -> tuple[Any, str]:
    """The ExportTraceServiceRequest in `body`, and the media type to answer in. Raises ApiError (400, 415)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media not in _PROTOBUF_TYPES and media != JSON:
        raise ApiError(415, f"content-type: expected {PROTOBUF} or {JSON} (OTLP/HTTP), got {content_type!r}")
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "gzip":
        body = _gunzip(body)
    elif encoding != "identity":
        raise ApiError(415, f"content-encoding: expected gzip or none, got {content_encoding!r}")
    request = ExportTraceServiceRequest()
    if media == JSON:
        try:
            document = json.loads(body)
            json_format.ParseDict(_hex_ids_to_base64(document), request, ignore_unknown_fields=True)
        except (ValueError, RecursionError, json_format.ParseError) as err:  # ValueError: bad JSON or UTF-8
            raise ApiError(400, f"invalid OTLP/JSON body: {err}") from None
        return request, JSON
    try:
        request.ParseFromString(body)
    except DecodeError as err:
        raise ApiError(400, f"invalid OTLP protobuf body: {err}") from None
    return request, PROTOBUF


def _gunzip(body: bytes) -> bytes:
    inflater = zlib.decompressobj(wbits=31)  # gzip framing only
    try:
        inflated = inflater.decompress(body, MAX_INFLATED)
    except zlib.error as err:
        raise ApiError(400, f"invalid gzip body: {err}") from None
    if inflater.unconsumed_tail:
        raise ApiError(413, f"the gzip body inflates to more than {MAX_INFLATED} bytes")
    if not inflater.eof:
        raise ApiError(400, "invalid gzip body: truncated")
    return inflated


def _hex_ids_to_base64(document: object) -> object:
    """OTLP/JSON writes trace and span ids as hex; proto3 JSON (which json_format reads) as base64."""
    if not isinstance(document, dict):
        return document  # json_format reports what is wrong with it
    for resource_spans in _dicts(document.get("resourceSpans", document.get("resource_spans"))):
        for scope_spans in _dicts(resource_spans.get("scopeSpans", resource_spans.get("scope_spans"))):
            for span in _dicts(scope_spans.get("spans")):
                _convert_ids(span)
                for link in _dicts(span.get("links")):
                    _convert_ids(link)
    return document


def _dicts(value: object) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, dict))


def _convert_ids(message: dict[str, Any]) -> None:
    for key in _ID_FIELDS:
        value = message.get(key)
        if isinstance(value, str) and len(value) in (16, 32) and _HEX.fullmatch(value):
            message[key] = base64.b64encode(binascii.unhexlify(value)).decode()


def export_response(media: str, rejected: int, reason: str) -> bytes:
    """The ExportTraceServiceResponse body: empty when every span was taken, else its partial_success."""
    answer = ExportTraceServiceResponse()
    if rejected:
        answer.partial_success.rejected_spans = rejected
        answer.partial_success.error_message = reason
    if media == JSON:
        return json_format.MessageToJson(answer, indent=None).encode() if rejected else b"{}"
    return bytes(answer.SerializeToString())


class SpanRow(NamedTuple):
    """One span as stored (the `spans` table's columns, in order)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    service: str  # the resource's service.name
    start_ns: int
    end_ns: int
    status_code: int  # OTLP Status.code: 0 unset, 1 ok, 2 error
    status_message: str
    http_status: int | None
    mesh_service: str | None  # meshgate.service: the mesh service a gateway hop was for
    request_id: str | None
    error: int  # 1 when the span failed: status ERROR, error.type set or an HTTP 5xx
    attributes: str  # JSON object
    resource: str  # JSON object


def span_rows(request: Any) -> tuple[list[SpanRow], int]:
    """Every valid span in an ExportTraceServiceRequest as a row, and how many were invalid (bad or zero ids)."""
    rows: list[SpanRow] = []
    invalid = 0
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name") or "unknown_service")
        resource_json = _dumps(resource)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                row = _row(span, service, resource_json)
                if row is None:
                    invalid += 1
                else:
                    rows.append(row)
    return rows, invalid


def _row(span: Any, service: str, resource: str) -> SpanRow | None:
    trace_id, span_id, parent = bytes(span.trace_id), bytes(span.span_id), bytes(span.parent_span_id)
    if len(trace_id) != 16 or len(span_id) != 8 or len(parent) not in (0, 8):
        return None
    if not any(trace_id) or not any(span_id):
        return None
    attributes = _attributes(span.attributes)
    http_status = _http_status(attributes)
    request_id = next(filter(None, (_first_text(attributes.get(key)) for key in _REQUEST_ID_KEYS)), None)
    mesh_service = attributes.get("meshgate.service")
    status_code = int(span.status.code)
    failed = status_code == _STATUS_ERROR or "error.type" in attributes or (http_status or 0) >= 500
    start = int(span.start_time_unix_nano)
    return SpanRow(
        trace_id.hex(),
        span_id.hex(),
        parent.hex() if any(parent) else "",
        span.name[:MAX_TEXT],
        int(span.kind),
        service,
        start,
        max(start, int(span.end_time_unix_nano)),
        status_code,
        span.status.message[:MAX_TEXT],
        http_status,
        mesh_service if isinstance(mesh_service, str) else None,
        request_id,
        int(failed),
        _dumps(attributes),
        resource,
    )


def _http_status(attributes: Mapping[str, object]) -> int | None:
    for key in _STATUS_KEYS:
        value = attributes.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _first_text(value: object) -> str | None:
    """A string attribute, or the first string of an array (how OTel records captured headers)."""
    if isinstance(value, list) and value:
        value = value[0]
    return value[:128] if isinstance(value, str) and value else None


def _attributes(pairs: Sequence[KeyValue]) -> dict[str, object]:
    return {pair.key[:MAX_TEXT]: _value(pair.value) for pair in pairs[:MAX_ITEMS]}


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value[:MAX_TEXT]
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":  # JSON has no NaN or infinities
        number = value.double_value
        return number if math.isfinite(number) else str(number)
    if kind == "bytes_value":
        return bytes(value.bytes_value[:MAX_TEXT]).hex()
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values[:MAX_ITEMS]]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
