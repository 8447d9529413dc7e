"""The hop records every request leaves behind, and the ring that keeps the most recent ones.

The hot path builds one `hop` tuple per request (fields in `HOP_FIELDS`) of atomic values only (bytes, str,
numbers, None), so that `HopRing` can pack the most recent ones compactly for `GET /requests/{id}`; sampled hops
also go to the OTLP exporter (exporter.py), and every hop to the access log (accesslog.py).
"""

from __future__ import annotations

from binascii import unhexlify
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
from itertools import accumulate
from struct import calcsize, pack, unpack_from
from struct import error as struct_error
from typing import Any, Protocol

# The hop record: one tuple per request, built on the hot path; these name its positions.
HOP_FIELDS = (
    "start",  # wall-clock seconds
    "request_id",
    "trace_id",
    "span_id",
    "parent_span_id",
    "sampled",
    "reporter",
    "source",
    "destination",
    "subset",
    "route",
    "endpoint",
    "method",
    "target",
    "host",
    "status",
    "duration",
    "upstream_duration",
    "tries",
    "bytes_in",
    "bytes_out",
    "error",
    "peer",
    "grpc_status",  # a gRPC call's outcome (rpc.py); -1 for other requests
)
HOP = {name: index for index, name in enumerate(HOP_FIELDS)}
RING_BLOCK = 1024  # hop records packed together in the ring, once every 1024 requests


class _Trace(Protocol):  # propagation.TraceContext
    @property
    def trace_id(self) -> bytes: ...

    @property
    def span_id(self) -> bytes: ...

    @property
    def parent_id(self) -> bytes: ...


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class HopSource(Protocol):
    """A finished request as `hop_record` reads it (exchange.Exchange)."""

    @property
    def request_id(self) -> bytes: ...

    @property
    def endpoint(self) -> _Named | None: ...

    method: bytes
    url: bytes
    host: bytes
    status: int
    upstream_time: float
    tries: int
    bytes_in: int
    bytes_out: int
    error: str
    grpc_status: int


def hop_record(
    request: HopSource,
    trace: _Trace,
    key: tuple[str, str, str, str, str],
    peer: bytes,
    start: float,
    duration: float,
    export: bool,
) -> tuple[Any, ...]:
    """The hop record of a finished request, fields in HOP_FIELDS order. `key` is its golden signals' series
    (reporter, source, destination, subset, route), `start` its wall-clock start, `export` whether the span goes
    to the OTLP exporter. Atomic values only (the endpoint as a str), so the ring can pack it."""
    endpoint = request.endpoint
    reporter, source, destination, subset, route = key
    return (
        start,
        request.request_id,
        trace.trace_id,
        trace.span_id,
        trace.parent_id,
        export,
        reporter,
        source,
        destination,
        subset,
        route,
        endpoint.name if endpoint is not None else None,
        request.method,
        request.url,
        request.host,
        request.status,
        duration,
        request.upstream_time,
        request.tries,
        request.bytes_in,
        request.bytes_out,
        request.error,
        peer,
        request.grpc_status,
    )


class HopRing:
    """The most recent `size` hop records, found by request ID. Bounded: the oldest are forgotten first.

    The hot path extends one flat list with each record's values. Every `block` records, `seal()` packs that block
    field by field (`_pack`): times and counts with struct, trace and span ids as the raw bytes their hex spells,
    other bytes joined end to end with one byte for each length, and a field that has one value across the block
    (labels, method, host, peer, mostly) stored once. A record then costs ~135 bytes instead of ~685 as a tuple of
    Python objects indexed by a dict, for fewer instructions per request (`bench/hotpath.py --memory`,
    `--instructions`). A lookup scans each block's request IDs (one bytes object) and rebuilds only the records
    that match, equal to the hops that were added.

    >>> ring = HopRing(100_000); ring.add(hop); ring.get(b"5f0c...")
    """

    __slots__ = ("size", "block", "limit", "young", "blocks", "packed")

    def __init__(self, size: int) -> None:
        self.size = size
        self.block = max(1, min(RING_BLOCK, size // 8))
        self.limit = self.block * _FIELDS  # Exchange.record() inlines add(): it compares len(young) with this
        # The newest records' values, one record after another, so that a block's fields are strided slices.
        self.young: list[Any] = []
        self.blocks: deque[_Block] = deque()  # oldest first
        self.packed = 0  # records in blocks

    def __len__(self) -> int:
        """Records held: `size` once that many were added, and up to two blocks more."""
        return self.packed + len(self.young) // _FIELDS

    def add(self, hop: tuple[Any, ...]) -> None:
        if self.size:
            young = self.young
            young += hop
            if len(young) >= self.limit:
                self.seal()

    def seal(self) -> None:
        values, self.young = self.young, []
        block = _Block(len(values) // _FIELDS, [_pack(values[at::_FIELDS], *how) for at, how in enumerate(_PACKING)])
        self.blocks.append(block)
        self.packed += block.count
        while self.packed - self.blocks[0].count >= self.size:  # the newer blocks alone hold `size` records
            self.packed -= self.blocks.popleft().count

    def get(self, request_id: bytes) -> list[tuple[Any, ...]]:
        """The hops of `request_id` among the most recent `size` records, oldest first."""
        found: list[tuple[Any, ...]] = []
        forgotten = len(self) - self.size  # the oldest block may still hold records older than that
        for block in self.blocks:
            if block.count > forgotten:
                found += [block.record(index) for index in block.find(request_id) if index >= forgotten]
            forgotten -= block.count
        young = self.young
        found += [
            tuple(young[at : at + _FIELDS]) for at in range(0, len(young), _FIELDS) if young[at + 1] == request_id
        ]
        return found


class Column(Protocol):
    """One field of a packed block of hop records, by record index."""

    def __getitem__(self, index: int, /) -> Any: ...


class _Same:
    """A field with the same value in every record of the block."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __getitem__(self, index: int) -> Any:
        return self.value


class _Numbers:
    """Floats or counts packed with struct (3x faster here than array(), which parses each item as an argument)."""

    __slots__ = ("packed", "code", "size")

    def __init__(self, packed: bytes, code: str) -> None:
        self.packed, self.code, self.size = packed, code, calcsize(code)

    def __getitem__(self, index: int) -> Any:
        return unpack_from(self.code, self.packed, index * self.size)[0]


class _Bools:
    __slots__ = ("flags",)

    def __init__(self, flags: bytes) -> None:
        self.flags = flags

    def __getitem__(self, index: int) -> bool:
        return bool(self.flags[index])


class _Bytes:
    """Byte strings joined end to end, and their lengths (one byte each when they are short)."""

    __slots__ = ("joined", "lengths")

    def __init__(self, joined: bytes, lengths: bytes | _Numbers) -> None:
        self.joined, self.lengths = joined, lengths

    def offsets(self, count: int) -> list[int]:
        lengths = self.lengths
        return list(accumulate((lengths[index] for index in range(count)), initial=0))

    def __getitem__(self, index: int) -> bytes:
        offsets = self.offsets(index + 1)
        return self.joined[offsets[index] : offsets[index + 1]]


class _Hex(_Bytes):
    """Lower-case hex ids, stored as the raw bytes they spell (half the size); `lengths` still count hex digits."""

    __slots__ = ()

    def offsets(self, count: int) -> list[int]:
        return [offset // 2 for offset in super().offsets(count)]

    def __getitem__(self, index: int) -> bytes:
        return super().__getitem__(index).hex().encode()


# How each hop field is packed, by the type Exchange.record() always gives it; and whether it is worth looking for
# one value across a block (not for fields that differ from request to request).
FLOAT, COUNT, BOOL, BYTES, HEX, SHARED = range(6)
_PACKING = tuple(
    {
        "start": (FLOAT, False),
        "request_id": (BYTES, False),
        "trace_id": (HEX, False),
        "span_id": (HEX, False),
        "parent_span_id": (HEX, True),
        "sampled": (BOOL, True),
        "method": (BYTES, True),
        "target": (BYTES, False),
        "host": (BYTES, True),
        "status": (COUNT, True),
        "duration": (FLOAT, False),
        "upstream_duration": (FLOAT, False),
        "tries": (COUNT, True),
        "bytes_in": (COUNT, True),
        "bytes_out": (COUNT, True),
        "peer": (BYTES, True),
    }.get(name, (SHARED, True))  # reporter, source, destination, subset, route, endpoint, error: config strings
    for name in HOP_FIELDS
)
_FIELDS = len(HOP_FIELDS)
_EVEN = bytes(range(0, 256, 2))


def _pack(values: Sequence[Any], kind: int, repeats: bool) -> Column:
    """One field of a block, as compactly as its values allow; a value of another type keeps the field as it is."""
    if repeats and values.count(values[0]) == len(values):
        return _Same(values[0])
    try:
        if kind == FLOAT:
            return _Numbers(pack(f"<{len(values)}d", *values), "<d")
        if kind == COUNT:
            return _counts(values)
        if kind == BOOL:
            return _Bools(bytes(values))
        if kind == HEX:
            return _hex(values)
        if kind == BYTES:
            return _joined(values)
    except (TypeError, ValueError, OverflowError, struct_error):
        pass  # not the type the hot path gives this field: kept as the objects themselves, below
    return tuple(values)


def _joined(values: Sequence[bytes]) -> _Bytes:
    lengths = list(map(len, values))
    try:
        sizes: bytes | _Numbers = bytes(lengths)
    except ValueError:  # a length over 255
        sizes = _counts(lengths)
    return _Bytes(b"".join(values), sizes)


def _hex(values: Sequence[bytes]) -> _Bytes:
    """Trace and span ids are lower-case hex (extract() lowers what it reads): packed as raw bytes."""
    lengths = bytes(map(len, values))  # 0, 16 or 32 digits
    if lengths.translate(None, _EVEN):  # an odd number of digits: not whole bytes
        return _joined(values)
    return _Hex(unhexlify(b"".join(values)), lengths)  # raises ValueError on a character that is not hex


def _counts(values: Sequence[int]) -> _Numbers:
    for code in "HIQ":
        with suppress(struct_error):  # too large (or negative) for this size: try a wider one
            return _Numbers(pack(f"<{len(values)}{code}", *values), "<" + code)
    raise OverflowError("not an unsigned 64-bit count")


class _Block:
    __slots__ = ("count", "columns")

    def __init__(self, count: int, columns: list[Column]) -> None:
        self.count, self.columns = count, columns

    def find(self, request_id: bytes) -> list[int]:
        ids = self.columns[1]
        if not isinstance(ids, _Bytes):
            return [index for index in range(self.count) if ids[index] == request_id]
        if request_id not in ids.joined:
            return []
        offsets, joined = ids.offsets(self.count), ids.joined
        return [index for index in range(self.count) if joined[offsets[index] : offsets[index + 1]] == request_id]

    def record(self, index: int) -> tuple[Any, ...]:
        return tuple(column[index] for column in self.columns)


def hop_to_dict(hop: tuple[Any, ...]) -> dict[str, Any]:
    """A hop record as JSON-able data (admin /requests/{id}, access log)."""
    record = dict(zip(HOP_FIELDS, hop, strict=True))
    for name, value in record.items():
        if isinstance(value, bytes):
            record[name] = value.decode("latin-1")
    if record["grpc_status"] < 0:
        record["grpc_status"] = None
    record["flags"] = response_flags(hop)
    return record


def response_flags(hop: tuple[Any, ...]) -> str:
    """Envoy-style response flags: UF connect failure, UT timeout, UO overflow, URX retries exhausted, UC upstream
    reset, NR no route, UH no healthy upstream, DC downstream disconnect."""
    error = hop[HOP["error"]]
    flags = []
    code = _FLAGS.get(error)
    if code:
        flags.append(code)
    if hop[HOP["tries"]] > 1 and hop[HOP["status"]] >= 500:
        flags.append("URX")
    return ",".join(flags) or "-"


_FLAGS = {
    "connect_failure": "UF",
    "per_try_timeout": "UT",
    "request_timeout": "UT",
    "overflow": "UO",
    "reset": "UC",
    "no_route": "NR",
    "no_healthy_upstream": "UH",
    "downstream_disconnect": "DC",
}
