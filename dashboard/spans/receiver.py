"""OTLP/HTTP trace export requests, read with the official opentelemetry-proto classes.

`decode_export(body, content_type, content_encoding)` reads an ExportTraceServiceRequest: protobuf, or OTLP/JSON
(whose ids are hex, not proto3 JSON's base64), optionally gzipped. `span_rows` flattens it into one `SpanRow` per
span: ids as hex, times in ns, attributes as JSON, `guid:x-request-id` pulled out as the request ID, the HTTP
status, whether the span failed, and whether its sender proved the gateway group the span claims (`Sender`).
`export_response` is the answer, with its partial_success when some spans were not taken.

Bounds, so that what a request stores is bounded by more than its compressed size: strings and lists are cut to
`MAX_TEXT` and `MAX_ITEMS`; one span (name, status message, attributes and resource as stored) takes at most
`MAX_SPAN_BYTES`, its resource at most `MAX_RESOURCE_BYTES` of that (it is stored with every span), and attributes
that do not fit are left out and counted in `otel.dropped_attributes_count` (the OpenTelemetry name for that count
in formats other than OTLP); a request holds at most `MAX_REQUEST_SPANS` spans (413) and stores at most
`MAX_REQUEST_BYTES` (the spans past it are rejected in partial_success).
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

MAX_INFLATED = 16 << 20  # bytes a gzip body may inflate to: as much as a plain one (settings.MAX_SPAN_BATCH)
MAX_TEXT = 4096  # characters kept of a string attribute; UTF-8 bytes kept of a span's name and status message
MAX_ITEMS = 128  # attributes per span, values per array
MAX_SPAN_BYTES = 16 << 10  # what one stored span takes: name, status message, attributes and resource (JSON, UTF-8)
MAX_RESOURCE_BYTES = 4 << 10  # of which its resource's attributes
MAX_REQUEST_SPANS = 8192  # spans in one export request (four of a gateway's batches, an OTel Collector's batch)
MAX_REQUEST_BYTES = 16 << 20  # what one export request may store (no more than its body); the rest is rejected
DROPPED = "otel.dropped_attributes_count"
GATEWAY_SERVICE = "meshgate-gateway-"  # a gateway's service.name: this prefix and its group

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_PROTOBUF_TYPES = frozenset((PROTOBUF, "application/protobuf"))
_HEX = re.compile(r"[0-9a-fA-F]*")
_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")
_REQUEST_ID_KEYS = ("guid:x-request-id", "http.request.header.x-request-id")
_STATUS_KEYS = ("http.response.status_code", "http.status_code")
_STATUS_ERROR = 2  # Status.STATUS_CODE_ERROR
_COUNT_ROOM = len(f',"{DROPPED}":') + 11  # the count is a uint32 plus at most MAX_ITEMS


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
    unverified: str | None  # why the gateway hop it claims to be is not proven (see `Sender`); None: proven or none


class Sender(NamedTuple):
    """Who sent an export request: `group` when it authenticated as that group's gateway (its join token), and
    `who`, for the reason a span it sent is unverified. A span claims to be a gateway hop when its resource names a
    gateway group (`meshgate.group`, or a `service.name` of `meshgate-gateway-<group>`) or it carries
    `meshgate.reporter`; the claim is proven only when the sender is a gateway and every group named is its own.

    >>> Sender("catalog", "the join token gateway-1f2e3d of group catalog")
    """

    group: str | None
    who: str


LOOPBACK = Sender(None, "a loopback client without credentials")


class Spans(NamedTuple):
    """An export request's spans as rows, and how many were not taken: `invalid` (bad or zero ids) and `oversize`
    (past the `MAX_REQUEST_BYTES` the request may store)."""

    rows: list[SpanRow]
    invalid: int
    oversize: int


def span_rows(request: Any, sender: Sender = LOOPBACK) -> Spans:
    """Every valid span in an ExportTraceServiceRequest as a row. Raises ApiError(413) past MAX_REQUEST_SPANS."""
    count = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
    if count > MAX_REQUEST_SPANS:
        raise ApiError(413, f"{count} spans in one request; at most {MAX_REQUEST_SPANS}: send smaller batches")
    rows: list[SpanRow] = []
    invalid = oversize = 0
    room = MAX_REQUEST_BYTES
    for resource_spans in request.resource_spans:
        given = resource_spans.resource
        resource, resource_json = _bounded(given.attributes, MAX_RESOURCE_BYTES, given.dropped_attributes_count)
        service = str(resource.get("service.name") or "unknown_service")
        owner = _Owner(resource_json, len(resource_json.encode()), service, _claimed(resource, service), sender)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found = _row(span, owner)
                if found is None:
                    invalid += 1
                elif found[1] > room:
                    oversize += 1
                else:
                    rows.append(found[0])
                    room -= found[1]
    return Spans(rows, invalid, oversize)


class _Owner(NamedTuple):
    """What the spans of one resource share."""

    resource: str  # JSON
    size: int  # its UTF-8 bytes
    service: str
    groups: frozenset[str]  # the gateway groups it claims
    sender: Sender


def _claimed(resource: Mapping[str, object], service: str) -> frozenset[str]:
    groups = {service.removeprefix(GATEWAY_SERVICE)} if service.startswith(GATEWAY_SERVICE) else set()
    if resource.get("meshgate.group") is not None:
        groups.add(str(resource["meshgate.group"]))
    return frozenset(groups)


def _unverified(owner: _Owner, attributes: Mapping[str, object]) -> str | None:
    if not owner.groups and "meshgate.reporter" not in attributes:
        return None  # an application's span: it claims no gateway
    if owner.sender.group is not None and owner.groups <= {owner.sender.group}:
        return None
    claim = "gateway group " + ", ".join(sorted(owner.groups)) if owner.groups else "a gateway hop"
    return f"claims {claim} but was sent by {owner.sender.who}"


def _row(span: Any, owner: _Owner) -> tuple[SpanRow, int] | None:
    """The row and the bytes it takes (name, status message, attributes and resource); None for bad ids."""
    trace_id, span_id, parent = bytes(span.trace_id), bytes(span.span_id), bytes(span.parent_span_id)
    if len(trace_id) != 16 or len(span_id) != 8 or len(parent) not in (0, 8):
        return None
    if not any(trace_id) or not any(span_id):
        return None
    name, message = _clip(span.name), _clip(span.status.message)
    used = owner.size + len(name.encode()) + len(message.encode())
    attributes, encoded = _bounded(span.attributes, MAX_SPAN_BYTES - used, span.dropped_attributes_count)
    http_status = _http_status(attributes)
    request_id = next(filter(None, (_first_text(attributes.get(key)) for key in _REQUEST_ID_KEYS)), None)
    mesh_service = attributes.get("meshgate.service")
    status_code = int(span.status.code)
    failed = status_code == _STATUS_ERROR or "error.type" in attributes or (http_status or 0) >= 500
    start = int(span.start_time_unix_nano)
    row = SpanRow(
        trace_id.hex(),
        span_id.hex(),
        parent.hex() if any(parent) else "",
        name,
        int(span.kind),
        owner.service,
        start,
        max(start, int(span.end_time_unix_nano)),
        status_code,
        message,
        http_status,
        mesh_service if isinstance(mesh_service, str) else None,
        request_id,
        int(failed),
        encoded,
        owner.resource,
        _unverified(owner, attributes),
    )
    return row, used + len(encoded.encode())


def _clip(text: str) -> str:
    """At most MAX_TEXT bytes of UTF-8, cut between characters."""
    text = text[:MAX_TEXT]
    if len(text) * 4 <= MAX_TEXT:  # short enough in any script
        return text
    encoded = text.encode()
    return text if len(encoded) <= MAX_TEXT else encoded[:MAX_TEXT].decode("utf-8", "ignore")


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


def _bounded(pairs: Sequence[KeyValue], limit: int, dropped: int = 0) -> tuple[dict[str, object], str]:
    """The attributes in `pairs`, and their JSON object of at most `limit` bytes of UTF-8: those that do not fit,
    and those past MAX_ITEMS, are left out and counted under DROPPED, with the `dropped` the sender reported."""
    kept: dict[str, tuple[object, int]] = {}
    room = limit - 2 - _COUNT_ROOM  # the braces, and the count
    dropped += max(0, len(pairs) - MAX_ITEMS)
    for pair in pairs[:MAX_ITEMS]:
        key = pair.key[:MAX_TEXT]
        if key in kept:  # a repeated key: the last value wins, as in a dict
            room += kept.pop(key)[1]
            dropped += 1
        try:
            value = _value(pair.value, _Budget(room))
        except _OverBudget:
            dropped += 1
            continue
        size = len(_dumps({key: value}).encode()) - 1  # "key":value and a comma
        if size > room:
            dropped += 1
            continue
        kept[key] = value, size
        room -= size
    values = {key: value for key, (value, _) in kept.items()}
    if dropped:
        values[DROPPED] = dropped
    return values, _dumps(values)


class _OverBudget(Exception):
    pass


class _Budget:
    """Roughly the characters a value's JSON may still take; raises _OverBudget as soon as it runs out, so a
    deep or wide value is never built whole only to be left out."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left

    def take(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise _OverBudget


def _value(value: AnyValue, budget: _Budget) -> object:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        text = value.string_value[:MAX_TEXT]
        budget.take(len(text) + 3)
        return text
    if kind == "array_value":
        budget.take(2)
        return [_value(item, budget) for item in value.array_value.values[:MAX_ITEMS]]
    if kind == "kvlist_value":
        budget.take(2)
        nested: dict[str, object] = {}
        for pair in value.kvlist_value.values[:MAX_ITEMS]:
            key = pair.key[:MAX_TEXT]
            budget.take(len(key) + 4)
            nested[key] = _value(pair.value, budget)
        return nested
    if kind == "bytes_value":
        data = bytes(value.bytes_value[:MAX_TEXT])
        budget.take(2 * len(data) + 3)
        return data.hex()
    budget.take(8)
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":  # JSON has no NaN or infinities
        number = value.double_value
        return number if math.isfinite(number) else str(number)
    return None


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
