"""Unit tests of trace context propagation (extract / inject), the ring of hop records and the response flags.

The header formats are the ones the OpenTelemetry SDK's propagators read and write:
- W3C Trace Context: `traceparent: 00-<32 hex trace>-<16 hex parent>-<2 hex flags>`, plus `tracestate`;
- B3 single: `b3: <16|32 hex trace>-<16 hex span>[-<0|1|d>[-<16 hex parent span>]]`;
- B3 multi: `x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled` (0/1), `x-b3-flags` (1 = debug);
- Jaeger: `uber-trace-id: <trace>:<span>:<parent span>:<flags>`, ids as hex of up to 32 / 16 digits (leading zeros
  may be left out), `:` possibly URL-encoded as `%3A`.
No I/O.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.hops import HOP, HOP_FIELDS, HopRing, hop_record, hop_to_dict, response_flags
from gateway.propagation import B3_MULTI, B3_SINGLE, JAEGER, W3C, TraceContext, extract, inject, new_trace

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TRACE64 = "a3ce929d0e0e4736"
PARENT = "5fe865d0f3a3c1e2"

Headers = dict[bytes, bytes]


def headers(**values: str) -> Headers:
    """`x_b3_traceid="..."` -> `{b"x-b3-traceid": b"..."}`."""
    return {name.replace("_", "-").encode(): value.encode() for name, value in values.items()}


def assert_new_trace(context: TraceContext) -> None:
    """What a request without a usable incoming context gets: a fresh valid trace, no parent, no decision."""
    assert re.fullmatch(rb"[0-9a-f]{32}", context.trace_id) and context.trace_id != b"0" * 32, context.trace_id
    assert re.fullmatch(rb"[0-9a-f]{16}", context.span_id) and context.span_id != b"0" * 16, context.span_id
    assert context.parent_id == b""
    assert context.sampled is None
    assert context.format == 0
    assert context.tracestate == b""


def assert_joined(
    context: TraceContext, trace: str, parent: str, sampled: bool | None, fmt: int, also: int = 0
) -> None:
    """Joined from format `fmt`; `also` are the other formats that came in and are written upstream too."""
    assert context.trace_id == trace.encode()
    assert context.parent_id == parent.encode()
    assert context.sampled is sampled
    assert context.format == fmt | also
    # This hop's own span is new: valid, and not the caller's.
    assert re.fullmatch(rb"[0-9a-f]{16}", context.span_id) and context.span_id != b"0" * 16
    assert context.span_id != parent.encode()


def parse_lines(lines: bytes) -> Headers:
    """The header lines inject() renders, as extract() receives them (names lower-cased)."""
    assert lines.endswith(b"\r\n"), lines
    parsed: Headers = {}
    for line in lines[:-2].split(b"\r\n"):
        name, sep, value = line.partition(b": ")
        assert sep and name == name.strip() and value == value.strip(), line
        assert name.lower() not in parsed, f"header {name!r} written twice"
        parsed[name.lower()] = value
    return parsed


# --- extract: each format ----------------------------------------------------------------------------------


def test_new_trace_ids_are_valid_and_differ() -> None:
    contexts = [new_trace() for _ in range(50)]
    for context in contexts:
        assert_new_trace(context)
    assert len({c.trace_id for c in contexts}) == 50
    assert len({c.span_id for c in contexts}) == 50


def test_no_trace_headers_start_a_new_trace() -> None:
    assert_new_trace(extract({}))
    assert_new_trace(extract(headers(tracestate="congo=t61rcWkgMzE")))  # tracestate alone carries no ids


@pytest.mark.parametrize(("flags", "sampled"), [("01", True), ("00", False), ("03", True), ("02", False)])
def test_w3c_traceparent_with_tracestate(flags: str, sampled: bool) -> None:
    context = extract(
        headers(traceparent=f"00-{TRACE}-{SPAN}-{flags}", tracestate="rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    )
    assert_joined(context, TRACE, SPAN, sampled, W3C)
    assert context.tracestate == b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


def test_w3c_without_tracestate() -> None:
    context = extract(headers(traceparent=f"00-{TRACE}-{SPAN}-01"))
    assert_joined(context, TRACE, SPAN, True, W3C)
    assert context.tracestate == b""


def test_w3c_future_version_may_carry_more_fields() -> None:
    """W3C Trace Context 4.3: a higher version is parsed as version 00, ignoring what follows the flags."""
    context = extract(headers(traceparent=f"cc-{TRACE}-{SPAN}-01-what-the-future-holds"))
    assert_joined(context, TRACE, SPAN, True, W3C)


@pytest.mark.parametrize(
    ("value", "sampled"),
    [
        (f"{TRACE}-{SPAN}", None),  # no sampling state: the receiver decides
        (f"{TRACE}-{SPAN}-1", True),
        (f"{TRACE}-{SPAN}-0", False),
        (f"{TRACE}-{SPAN}-d", True),  # debug implies sampled
        (f"{TRACE}-{SPAN}-1-{PARENT}", True),  # with the caller's parent span
        (f"{TRACE}-{SPAN}-0-{PARENT}", False),
    ],
)
def test_b3_single(value: str, sampled: bool | None) -> None:
    assert_joined(extract(headers(b3=value)), TRACE, SPAN, sampled, B3_SINGLE)


def test_b3_single_64_bit_trace_id_is_left_padded_to_32_hex() -> None:
    context = extract(headers(b3=f"{TRACE64}-{SPAN}-1"))
    assert_joined(context, "0" * 16 + TRACE64, SPAN, True, B3_SINGLE)


def test_b3_single_upper_case_hex_is_read_as_lower_case() -> None:
    context = extract(headers(b3=f"{TRACE.upper()}-{SPAN.upper()}-1"))
    assert_joined(context, TRACE, SPAN, True, B3_SINGLE)


@pytest.mark.parametrize(
    ("extra", "sampled"),
    [
        ({}, None),
        ({"x_b3_sampled": "1"}, True),
        ({"x_b3_sampled": "0"}, False),
        ({"x_b3_sampled": "true"}, True),  # the old spelling some clients still send
        ({"x_b3_sampled": "false"}, False),
        ({"x_b3_flags": "1"}, True),  # debug: always sampled
        ({"x_b3_flags": "1", "x_b3_sampled": "0"}, True),  # debug wins over a sampled=0
        ({"x_b3_parentspanid": PARENT, "x_b3_sampled": "1"}, True),
    ],
)
def test_b3_multi(extra: dict[str, str], sampled: bool | None) -> None:
    context = extract(headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN, **extra))
    assert_joined(context, TRACE, SPAN, sampled, B3_MULTI)


def test_b3_multi_64_bit_trace_id_is_left_padded_to_32_hex() -> None:
    context = extract(headers(x_b3_traceid=TRACE64, x_b3_spanid=SPAN, x_b3_sampled="1"))
    assert_joined(context, "0" * 16 + TRACE64, SPAN, True, B3_MULTI)


@pytest.mark.parametrize(
    ("value", "trace", "parent", "sampled"),
    [
        (f"{TRACE}:{SPAN}:0:1", TRACE, SPAN, True),
        (f"{TRACE}:{SPAN}:{PARENT}:01", TRACE, SPAN, True),
        (f"{TRACE}:{SPAN}:0:0", TRACE, SPAN, False),
        (f"{TRACE}:{SPAN}:0:3", TRACE, SPAN, True),  # sampled + debug
        # jaeger-client writes ids without leading zeros
        (f"{TRACE64}:{SPAN}:0:1", "0" * 16 + TRACE64, SPAN, True),
        ("abc:def:0:1", "0" * 29 + "abc", "0" * 13 + "def", True),
        # the colons URL-encoded, as some HTTP clients send them (either case)
        (f"{TRACE}%3A{SPAN}%3A0%3A1", TRACE, SPAN, True),
        (f"{TRACE}%3a{SPAN}%3a0%3a1", TRACE, SPAN, True),
        (f"{TRACE.upper()}:{SPAN.upper()}:0:1", TRACE, SPAN, True),
    ],
)
def test_jaeger(value: str, trace: str, parent: str, sampled: bool) -> None:
    assert_joined(extract(headers(uber_trace_id=value)), trace, parent, sampled, JAEGER)


# --- extract: precedence ------------------------------------------------------------------------------------

OTHER_TRACE = "11111111111111111111111111111111"
OTHER_SPAN = "2222222222222222"
W3C_HEADERS = {"traceparent": f"00-{TRACE}-{SPAN}-01"}
B3_SINGLE_HEADERS = {"b3": f"{OTHER_TRACE}-{OTHER_SPAN}-1"}
B3_MULTI_HEADERS = {"x_b3_traceid": "3" * 32, "x_b3_spanid": "4" * 16, "x_b3_sampled": "1"}
JAEGER_HEADERS = {"uber_trace_id": f"{'5' * 32}:{'6' * 16}:0:1"}


def test_precedence_w3c_then_b3_single_then_b3_multi_then_jaeger() -> None:
    every = {**W3C_HEADERS, **B3_SINGLE_HEADERS, **B3_MULTI_HEADERS, **JAEGER_HEADERS}
    assert_joined(extract(headers(**every)), TRACE, SPAN, True, W3C, also=B3_SINGLE | B3_MULTI | JAEGER)
    without_w3c = {**B3_SINGLE_HEADERS, **B3_MULTI_HEADERS, **JAEGER_HEADERS}
    assert_joined(extract(headers(**without_w3c)), OTHER_TRACE, OTHER_SPAN, True, B3_SINGLE, also=B3_MULTI | JAEGER)
    multi_and_jaeger = extract(headers(**B3_MULTI_HEADERS, **JAEGER_HEADERS))
    assert_joined(multi_and_jaeger, "3" * 32, "4" * 16, True, B3_MULTI, also=JAEGER)


def test_every_incoming_format_is_written_upstream() -> None:
    """A request carrying W3C and B3 keeps both, so a service that reads only B3 stays in the trace."""
    context = extract(headers(**W3C_HEADERS, **B3_MULTI_HEADERS))
    written = parse_lines(inject(context))
    assert written[b"traceparent"].split(b"-")[1] == TRACE.encode()
    assert written[b"x-b3-traceid"] == TRACE.encode()  # the joined trace, in the B3 reader's format too
    assert written[b"x-b3-spanid"] == context.span_id


def test_a_malformed_format_falls_back_to_the_next_valid_one() -> None:
    context = extract(headers(traceparent="00-garbage", **B3_SINGLE_HEADERS, **JAEGER_HEADERS))
    assert_joined(context, OTHER_TRACE, OTHER_SPAN, True, B3_SINGLE, also=JAEGER)
    context = extract(headers(traceparent="00-garbage", b3="nonsense", **JAEGER_HEADERS))
    assert_joined(context, "5" * 32, "6" * 16, True, JAEGER, also=B3_SINGLE)


# --- extract: malformed input starts a new trace, never an error ---------------------------------------------

MALFORMED = {
    "w3c trace id too short": {"traceparent": f"00-{TRACE[:-1]}-{SPAN}-01"},
    "w3c trace id too long": {"traceparent": f"00-{TRACE}a-{SPAN}-01"},
    "w3c parent too short": {"traceparent": f"00-{TRACE}-{SPAN[:-1]}-01"},
    "w3c flags one digit": {"traceparent": f"00-{TRACE}-{SPAN}-1"},
    "w3c non-hex trace id": {"traceparent": f"00-{TRACE[:-1]}g-{SPAN}-01"},
    "w3c non-hex parent": {"traceparent": f"00-{TRACE}-{SPAN[:-1]}z-01"},
    "w3c all-zero trace id": {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},
    "w3c all-zero parent": {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},
    "w3c version ff": {"traceparent": f"ff-{TRACE}-{SPAN}-01"},
    "w3c version 00 with extra fields": {"traceparent": f"00-{TRACE}-{SPAN}-01-extra"},
    "w3c wrong separators": {"traceparent": f"00_{TRACE}_{SPAN}_01"},
    "w3c empty": {"traceparent": ""},
    "w3c garbage": {"traceparent": "hello, world"},
    "b3 single trace id 20 hex": {"b3": f"{TRACE[:20]}-{SPAN}-1"},
    "b3 single span id 15 hex": {"b3": f"{TRACE}-{SPAN[:-1]}-1"},
    "b3 single non-hex trace": {"b3": f"{TRACE[:-1]}x-{SPAN}-1"},
    "b3 single bad sampling state": {"b3": f"{TRACE}-{SPAN}-yes"},
    "b3 single all-zero trace id": {"b3": f"{'0' * 32}-{SPAN}-1"},
    "b3 single all-zero span id": {"b3": f"{TRACE}-{'0' * 16}-1"},
    "b3 single sampling only (no ids to join)": {"b3": "1"},
    "b3 single too many parts": {"b3": f"{TRACE}-{SPAN}-1-{PARENT}-extra"},
    "b3 single garbage": {"b3": "-------"},
    "b3 multi trace id missing": {"x_b3_spanid": SPAN, "x_b3_sampled": "1"},
    "b3 multi span id missing": {"x_b3_traceid": TRACE, "x_b3_sampled": "1"},
    "b3 multi trace id 20 hex": {"x_b3_traceid": TRACE[:20], "x_b3_spanid": SPAN},
    "b3 multi non-hex span id": {"x_b3_traceid": TRACE, "x_b3_spanid": "not-hex-at-all!!"},
    "b3 multi all-zero trace id": {"x_b3_traceid": "0" * 32, "x_b3_spanid": SPAN, "x_b3_sampled": "1"},
    "b3 multi all-zero 64-bit trace id": {"x_b3_traceid": "0" * 16, "x_b3_spanid": SPAN},
    "b3 multi all-zero span id": {"x_b3_traceid": TRACE, "x_b3_spanid": "0" * 16, "x_b3_sampled": "1"},
    "jaeger three parts": {"uber_trace_id": f"{TRACE}:{SPAN}:1"},
    "jaeger five parts": {"uber_trace_id": f"{TRACE}:{SPAN}:0:1:0"},
    "jaeger trace id 33 hex": {"uber_trace_id": f"a{TRACE}:{SPAN}:0:1"},
    "jaeger span id 17 hex": {"uber_trace_id": f"{TRACE}:a{SPAN}:0:1"},
    "jaeger non-hex trace": {"uber_trace_id": f"{TRACE[:-1]}q:{SPAN}:0:1"},
    "jaeger empty trace id": {"uber_trace_id": f":{SPAN}:0:1"},
    "jaeger all-zero trace id": {"uber_trace_id": f"0:{SPAN}:0:1"},
    "jaeger all-zero span id": {"uber_trace_id": f"{TRACE}:0000:0:1"},
    "jaeger non-hex flags": {"uber_trace_id": f"{TRACE}:{SPAN}:0:x"},
    "jaeger garbage": {"uber_trace_id": "%3A%3A%3A"},
}


@pytest.mark.parametrize("given", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_trace_headers_start_a_new_trace(given: dict[str, str]) -> None:
    context = extract(headers(**given))
    assert_new_trace(context)
    assert context.trace_id not in (TRACE.encode(), TRACE64.rjust(32, "0").encode())


def test_malformed_binary_values_never_raise() -> None:
    junk = bytes(range(256))
    for name in (b"traceparent", b"b3", b"x-b3-traceid", b"uber-trace-id"):
        assert_new_trace(extract({name: junk, b"x-b3-spanid": junk, b"tracestate": junk}))


# --- inject: what goes upstream parses back to this hop's span ----------------------------------------------

INCOMING = {
    "w3c": {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "congo=t61rcWkgMzE"},
    "b3-single": {"b3": f"{TRACE}-{SPAN}-1-{PARENT}"},
    "b3-multi": {"x_b3_traceid": TRACE, "x_b3_spanid": SPAN, "x_b3_parentspanid": PARENT, "x_b3_sampled": "1"},
    "jaeger": {"uber_trace_id": f"{TRACE}:{SPAN}:{PARENT}:1"},
    "none": {},
}
# The headers each incoming format adds to W3C's on the way upstream.
FORMAT_HEADERS = {
    "w3c": {b"tracestate"},
    "b3-single": {b"b3"},
    "b3-multi": {b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled"},
    "jaeger": {b"uber-trace-id"},
    "none": set(),
}


@pytest.mark.parametrize("fmt", INCOMING)
@pytest.mark.parametrize("sampled", [True, False])
def test_inject_parses_back_to_this_span_in_w3c_and_the_incoming_format(fmt: str, sampled: bool) -> None:
    context = extract(headers(**INCOMING[fmt]))
    context.sampled = sampled  # as the caller's flag or the sampler decided (covers both flag values)
    injected = parse_lines(inject(context))
    assert set(injected) == {b"traceparent"} | FORMAT_HEADERS[fmt], injected
    # Each format on its own names this hop's span as the parent, in the same trace, with the same decision.
    names = [{b"traceparent"}, FORMAT_HEADERS[fmt] - {b"tracestate"}]
    for subset in names:
        if not subset:
            continue
        again = extract({name: injected[name] for name in subset})
        assert again.trace_id == context.trace_id, (subset, injected)
        assert again.parent_id == context.span_id, (subset, injected)
        assert again.sampled is context.sampled, (subset, injected)
        assert again.span_id != context.span_id
    if fmt == "w3c":
        assert injected[b"tracestate"] == b"congo=t61rcWkgMzE", "tracestate is passed on unchanged"
        assert extract(injected).tracestate == b"congo=t61rcWkgMzE"


def test_inject_w3c_exact_bytes() -> None:
    context = extract(headers(traceparent=f"00-{TRACE}-{SPAN}-01"))
    assert inject(context) == b"traceparent: 00-%s-%s-01\r\n" % (TRACE.encode(), context.span_id)
    context.sampled = False
    assert inject(context) == b"traceparent: 00-%s-%s-00\r\n" % (TRACE.encode(), context.span_id)


def test_inject_keeps_the_padded_trace_id_of_a_64_bit_b3_trace() -> None:
    context = extract(headers(b3=f"{TRACE64}-{SPAN}-1"))
    injected = parse_lines(inject(context))
    padded = ("0" * 16 + TRACE64).encode()
    assert injected[b"traceparent"].split(b"-")[1] == padded
    assert extract({b"b3": injected[b"b3"]}).trace_id == padded


# --- HopRing ------------------------------------------------------------------------------------------------


def make_hop(**fields: Any) -> tuple[Any, ...]:
    """A hop record with plausible defaults; `fields` override by name (see HOP_FIELDS)."""
    values: dict[str, Any] = {
        "start": 1_700_000_000.25,
        "request_id": b"req-1",
        "trace_id": TRACE.encode(),
        "span_id": SPAN.encode(),
        "parent_span_id": b"",
        "sampled": True,
        "reporter": "destination",
        "source": "unknown",
        "destination": "hello",
        "subset": "v1",
        "route": "default",
        "endpoint": "127.0.0.1:9101",
        "method": b"GET",
        "target": b"/echo?x=1",
        "host": b"hello",
        "status": 200,
        "duration": 0.002,
        "upstream_duration": 0.0015,
        "tries": 1,
        "bytes_in": 0,
        "bytes_out": 17,
        "error": "",
        "peer": b"127.0.0.1",
        "grpc_status": -1,
    }
    unknown = set(fields) - set(values)
    assert not unknown, unknown
    values.update(fields)
    assert list(values) == list(HOP_FIELDS), "make_hop is out of date with HOP_FIELDS"
    return tuple(values.values())


def test_hop_ring_finds_hops_by_request_id() -> None:
    ring = HopRing(10)
    ring.add(make_hop(request_id=b"a", status=200))
    ring.add(make_hop(request_id=b"b", status=503))
    assert [hop[HOP["status"]] for hop in ring.get(b"a")] == [200]
    assert [hop[HOP["status"]] for hop in ring.get(b"b")] == [503]
    assert ring.get(b"c") == []


@pytest.mark.parametrize("size", [1, 3, 8, 50, 1000])
def test_hop_ring_holds_exactly_the_most_recent_records(size: int) -> None:
    ring = HopRing(size)
    for n in range(3 * size + 5):
        ring.add(make_hop(request_id=b"id-%d" % n, status=200 + n % 300))
        if n % max(1, size // 7) == 0 or n > 3 * size:
            for k in range(n + 1):
                expected = [make_hop(request_id=b"id-%d" % k, status=200 + k % 300)] if k > n - size else []
                assert ring.get(b"id-%d" % k) == expected, (n, k)
    assert size <= len(ring) < size + 2 * ring.block  # memory: less than two blocks more than asked for


def varied_hop(n: int) -> tuple[Any, ...]:
    """Hop records whose every field varies within a block, including values beyond the compact encodings."""
    return make_hop(
        start=1_700_000_000.25 + n / 7,
        request_id=b"r%d" % n,
        parent_span_id=b"" if n % 2 else PARENT.encode(),
        sampled=n % 3 == 0,
        reporter="source" if n % 2 else "destination",
        source=("unknown", "shop", "external")[n % 3],
        subset=("v1", "v2", "")[n % 3],
        route=("default", "canary-header")[n % 2],
        endpoint=None if n % 5 == 0 else f"127.0.0.1:{9100 + n % 4}",
        method=(b"GET", b"POST", b"PROPFIND")[n % 3],
        target=b"/items/%d?" % n + b"q" * (n % 300),  # lengths beyond 255 now and then
        host=(b"hello", b"hello:8080", b"caf\xc3\xa9")[n % 3],
        status=(200, 404, 503, 499)[n % 4],
        duration=n / 13,
        upstream_duration=0.0 if n % 4 == 3 else n / 17,
        tries=n % 4,
        bytes_in=n * 1_000_003 if n % 7 == 0 else 0,  # some beyond 32 bits
        bytes_out=n << 33 if n % 11 == 0 else n,
        error=("", "reset", "connect_failure", "downstream_disconnect")[n % 4],
        peer=b"10.0.0.%d" % (n % 7),
    )


@pytest.mark.parametrize("vary", [False, True])
def test_hop_ring_packs_blocks_and_unpacks_them_identically(vary: bool) -> None:
    ring = HopRing(100_000)
    if vary:
        hops = [varied_hop(n) for n in range(3000)]
    else:  # one route's steady traffic: most fields hold one value per block
        hops = [make_hop(request_id=b"r%d" % n, duration=n / 7, bytes_out=200 + n % 3) for n in range(3000)]
    for hop in hops:
        ring.add(hop)
    assert len(ring.blocks) == 3000 // ring.block and len(ring) == 3000
    for hop in hops[::7]:
        (found,) = ring.get(hop[HOP["request_id"]])
        assert found == hop and [type(v) for v in found] == [type(v) for v in hop]


def test_hop_ring_keeps_a_field_of_unexpected_values_as_they_are() -> None:
    """A count that is not an unsigned integer is kept as the object itself, not mangled. (Floats are packed as
    floats: the hot path never gives an int there, and the access-log comparison in tests/e2e would show one.)"""
    ring = HopRing(16)
    odd = [
        make_hop(request_id=b"odd-0", status=200.5),
        make_hop(request_id=b"odd-1", tries=-1),
        make_hop(request_id=b"odd-2", bytes_out=1 << 70),
        make_hop(request_id=b"odd-3", bytes_in=None),
        make_hop(request_id=b"odd-4", trace_id=b"not hex, and odd"),
        make_hop(request_id=b"odd-5", span_id=b"abc"),
    ]
    for hop in odd:
        ring.add(hop)
    assert not ring.young, "all of them packed"
    for hop in odd:
        (found,) = ring.get(hop[HOP["request_id"]])
        assert found == hop and [type(v) for v in found] == [type(v) for v in hop]


def test_hop_ring_keeps_several_hops_of_one_request_in_order() -> None:
    ring = HopRing(20)
    ring.add(make_hop(request_id=b"same", reporter="source", status=200))
    ring.add(make_hop(request_id=b"other"))
    ring.add(make_hop(request_id=b"same", reporter="destination", status=200))
    for n in range(10):
        ring.add(make_hop(request_id=b"more-%d" % n))
    assert [hop[HOP["reporter"]] for hop in ring.get(b"same")] == ["source", "destination"]
    assert len(ring.get(b"other")) == 1


def test_hop_ring_does_not_mistake_a_request_id_inside_another_field() -> None:
    ring = HopRing(16)
    ring.add(make_hop(request_id=b"a", target=b"/look/for/b"))
    ring.add(make_hop(request_id=b"c"))
    ring.add(make_hop(request_id=b"b"))
    assert [hop[HOP["target"]] for hop in ring.get(b"b")] == [b"/echo?x=1"]


def test_hop_ring_of_size_zero_keeps_nothing() -> None:
    ring = HopRing(0)
    for _ in range(10):
        ring.add(make_hop(request_id=b"a"))
    assert ring.get(b"a") == []
    assert not ring.young and not ring.blocks


def test_hop_to_dict_is_json_data_with_flags() -> None:
    record = hop_to_dict(make_hop(error="connect_failure", status=503, tries=3))
    assert record["request_id"] == "req-1"
    assert record["trace_id"] == TRACE
    assert record["method"] == "GET" and record["target"] == "/echo?x=1" and record["peer"] == "127.0.0.1"
    assert record["endpoint"] == "127.0.0.1:9101"
    assert record["flags"] == "UF,URX"
    assert hop_to_dict(make_hop(endpoint=None))["endpoint"] is None


# --- response flags ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "flags"),
    [
        ({}, "-"),
        ({"tries": 2}, "-"),  # retried, then succeeded: no flag
        ({"status": 404}, "-"),  # the upstream's own 404
        ({"status": 503, "tries": 1}, "-"),  # the upstream's own 503, not retried
        ({"status": 503, "tries": 3}, "URX"),
        ({"status": 503, "error": "connect_failure", "endpoint": None}, "UF"),
        ({"status": 503, "error": "connect_failure", "tries": 3}, "UF,URX"),
        ({"status": 504, "error": "per_try_timeout"}, "UT"),
        ({"status": 504, "error": "request_timeout", "tries": 2}, "UT,URX"),
        ({"status": 503, "error": "overflow"}, "UO"),
        ({"status": 502, "error": "reset"}, "UC"),
        ({"status": 404, "error": "no_route", "destination": "unknown", "endpoint": None, "tries": 0}, "NR"),
        ({"status": 503, "error": "no_healthy_upstream", "endpoint": None, "tries": 0}, "UH"),
        ({"status": 499, "error": "downstream_disconnect"}, "DC"),
    ],
)
def test_response_flags(fields: dict[str, Any], flags: str) -> None:
    assert response_flags(make_hop(**fields)) == flags


# --- hop_record -------------------------------------------------------------------------------------------------


def test_a_hop_record_holds_the_requests_fields_in_hop_fields_order() -> None:
    trace = SimpleNamespace(trace_id=b"a" * 32, span_id=b"b" * 16, parent_id=b"c" * 16)
    request = SimpleNamespace(
        request_id=b"req-1",
        endpoint=SimpleNamespace(name="127.0.0.1:9001"),
        method=b"POST",
        url=b"/pay",
        host=b"payments",
        status=503,
        upstream_time=0.002,
        tries=3,
        bytes_in=10,
        bytes_out=20,
        error="upstream_reset",
        grpc_status=-1,
    )
    key = ("destination", "shop", "payments", "v2", "default")
    hop = hop_record(request, trace, key, b"10.0.0.9", 1700000000.5, 0.004, True)
    assert len(hop) == len(HOP_FIELDS)
    as_dict = dict(zip(HOP_FIELDS, hop, strict=True))
    assert as_dict == {
        "start": 1700000000.5,
        "request_id": b"req-1",
        "trace_id": b"a" * 32,
        "span_id": b"b" * 16,
        "parent_span_id": b"c" * 16,
        "sampled": True,
        "reporter": "destination",
        "source": "shop",
        "destination": "payments",
        "subset": "v2",
        "route": "default",
        "endpoint": "127.0.0.1:9001",
        "method": b"POST",
        "target": b"/pay",
        "host": b"payments",
        "status": 503,
        "duration": 0.004,
        "upstream_duration": 0.002,
        "tries": 3,
        "bytes_in": 10,
        "bytes_out": 20,
        "error": "upstream_reset",
        "peer": b"10.0.0.9",
        "grpc_status": -1,
    }
    ring = HopRing(4)
    ring.add(hop)
    assert hop_to_dict(ring.get(b"req-1")[0])["endpoint"] == "127.0.0.1:9001"  # atomic values: the ring packs it
    unrouted = hop_record(SimpleNamespace(**{**vars(request), "endpoint": None}), trace, key, b"", 0.0, 0.0, False)
    assert unrouted[HOP["endpoint"]] is None
