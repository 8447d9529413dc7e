"""Trace context propagation: reading and writing the trace headers of a request.

`extract()` reads W3C `traceparent`/`tracestate`, B3 (single `b3` and multi `x-b3-*`) and Jaeger `uber-trace-id`;
malformed headers are ignored (a new trace starts), never an error. `inject()` writes W3C plus the format the
request arrived in, so a service still on jaeger-client stays in the same trace.
"""

from __future__ import annotations

import re
from random import getrandbits

# Incoming formats (bits: a request may carry several), remembered so the same formats are written upstream.
W3C, B3_SINGLE, B3_MULTI, JAEGER = 1, 2, 4, 8

_HEX = re.compile(rb"[0-9a-f]+")
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?")
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16

TRACE_HEADERS = frozenset(
    (
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
        b"uber-trace-id",
    )
)


class TraceContext:
    """This hop's place in a trace: ids as lower-case hex bytes, the incoming format and sampling decision."""

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "format", "tracestate")

    def __init__(
        self,
        trace_id: bytes,
        parent_id: bytes = b"",
        sampled: bool | None = None,
        format: int = 0,
        tracestate: bytes = b"",
    ) -> None:
        self.trace_id = trace_id
        self.span_id = b"%016x" % getrandbits(64)
        self.parent_id = parent_id
        self.sampled = sampled  # None: the caller did not decide; the sampler will
        self.format = format
        self.tracestate = tracestate


def new_trace() -> TraceContext:
    return TraceContext(b"%032x" % getrandbits(128))


def extract(headers: dict[bytes, bytes]) -> TraceContext:
    """The context a request carries, by precedence W3C, B3, Jaeger; a new trace when none is valid."""
    context = (
        _w3c(headers)
        or _b3_single(headers.get(b"b3"))
        or _b3_multi(headers)
        or _jaeger(headers.get(b"uber-trace-id"))
        or new_trace()
    )
    if context.format:  # a valid context: write every format that came in, for services reading only one
        context.format |= (
            (B3_SINGLE if b"b3" in headers else 0)
            | (B3_MULTI if b"x-b3-traceid" in headers else 0)
            | (JAEGER if b"uber-trace-id" in headers else 0)
        )
    return context


def _is_hex(value: bytes, *lengths: int) -> bool:
    return len(value) in lengths and _HEX.fullmatch(value) is not None


def _zero(trace_id: bytes, span_id: bytes) -> bool:
    """All-zero ids are invalid in every format."""
    return trace_id.strip(b"0") == b"" or span_id.strip(b"0") == b""


def _w3c(headers: dict[bytes, bytes]) -> TraceContext | None:
    value = headers.get(b"traceparent")
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if match is None or match[1] == b"ff" or (match[1] == b"00" and len(value.strip()) != 55):
        return None
    trace_id, parent_id = match[2], match[3]
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    sampled = bool(int(match[4], 16) & 1)
    return TraceContext(trace_id, parent_id, sampled, W3C, headers.get(b"tracestate", b""))


def _b3_single(value: bytes | None) -> TraceContext | None:
    if value is None:
        return None
    parts = value.strip().lower().split(b"-")
    if len(parts) < 2 or len(parts) > 4:
        return None  # a bare sampling flag ("0", "1", "d") carries no ids to join
    trace_id, parent_id = parts[0], parts[1]
    if not _is_hex(trace_id, 16, 32) or not _is_hex(parent_id, 16):
        return None
    sampled: bool | None = None
    if len(parts) > 2:
        if parts[2] not in (b"0", b"1", b"d"):
            return None
        sampled = parts[2] != b"0"
    if _zero(trace_id, parent_id):
        return None
    return TraceContext(trace_id.rjust(32, b"0"), parent_id, sampled, B3_SINGLE)


def _b3_multi(headers: dict[bytes, bytes]) -> TraceContext | None:
    trace_id = headers.get(b"x-b3-traceid", b"").strip().lower()
    parent_id = headers.get(b"x-b3-spanid", b"").strip().lower()
    if not _is_hex(trace_id, 16, 32) or not _is_hex(parent_id, 16):
        return None
    if _zero(trace_id, parent_id):
        return None
    flag = headers.get(b"x-b3-sampled", b"").strip().lower()
    sampled: bool | None = None
    if headers.get(b"x-b3-flags", b"").strip() == b"1":
        sampled = True  # debug
    elif flag in (b"1", b"true"):
        sampled = True
    elif flag in (b"0", b"false"):
        sampled = False
    return TraceContext(trace_id.rjust(32, b"0"), parent_id, sampled, B3_MULTI)


def _jaeger(value: bytes | None) -> TraceContext | None:
    if value is None:
        return None
    parts = value.strip().lower().replace(b"%3a", b":").split(b":")
    if len(parts) != 4:
        return None
    trace_id, span_id, _, flags = parts
    if not (0 < len(trace_id) <= 32 and _is_hex(trace_id, *range(1, 33))):
        return None
    if not (0 < len(span_id) <= 16 and _is_hex(span_id, *range(1, 17))):
        return None
    if not _is_hex(flags, 1, 2):
        return None
    trace_id, span_id = trace_id.rjust(32, b"0"), span_id.rjust(16, b"0")
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, bool(int(flags, 16) & 1), JAEGER)


def inject(context: TraceContext) -> bytes:
    """The header lines that carry this hop's span upstream: W3C, plus every other format the request came in."""
    flag = b"01" if context.sampled else b"00"
    lines = b"traceparent: 00-%s-%s-%s\r\n" % (context.trace_id, context.span_id, flag)
    if context.tracestate:
        lines += b"tracestate: %s\r\n" % context.tracestate
    if context.format & B3_SINGLE:
        lines += b"b3: %s-%s-%s-%s\r\n" % (context.trace_id, context.span_id, flag[1:], context.parent_id)
    if context.format & B3_MULTI:
        lines += b"x-b3-traceid: %s\r\nx-b3-spanid: %s\r\nx-b3-parentspanid: %s\r\nx-b3-sampled: %s\r\n" % (
            context.trace_id,
            context.span_id,
            context.parent_id,
            flag[1:],
        )
    if context.format & JAEGER:
        lines += b"uber-trace-id: %s:%s:%s:%s\r\n" % (context.trace_id, context.span_id, context.parent_id, flag)
    return lines


def new_request_id() -> bytes:
    """A random UUID4, without a system call per request (uuid.uuid4 reads os.urandom every time)."""
    return b"%08x-%04x-4%03x-%04x-%012x" % (
        getrandbits(32),
        getrandbits(16),
        getrandbits(12),
        0x8000 | getrandbits(14),  # the RFC 4122 variant
        getrandbits(48),
    )
