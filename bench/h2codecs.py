"""Three sans-I/O HTTP/2 codecs on the same bytes, for decision 0005: `python bench/h2codecs.py [--streams N]`.

h2 (pure Python), jh2 (the h2 fork with a compiled HPACK) and ngh2 (libnghttp2 bindings) each sit behind the same
small interface (`H2Codec`, `NgCodec`: bytes in, normalised events out), the shape the gateway's codec seam would
have. No sockets: a reference pair of h2 connections records the bytes a client and a server exchange, and every
codec is then timed (CPU time, one thread) replaying one side of that recording.

- server: N unary gRPC calls (HEADERS + one ~100-byte DATA with END_STREAM), `--inflight` at a time on one
  connection, decoded; each answered with HEADERS, ~100 bytes of DATA and trailers;
- client: the mirror, as the gateway towards an upstream: encode the requests, decode the recorded responses;
- bulk: one stream of 64 MiB in 16 KiB DATA frames, sent (with the peer's WINDOW_UPDATEs fed back per frame) and
  received (acknowledged per frame, so the codec writes WINDOW_UPDATEs);
- idle: `--idle-streams` open streams (HEADERS only) on one server connection, in a child process per codec:
  the RSS delta, the tracemalloc figures (tracemalloc sees no C or Rust allocations; RSS does) and the CPU time
  to open them (h2 counts its open streams on every new one);
- hostile: what each server connection does with a rapid reset, a CONTINUATION flood, CR LF in a header value
  and conflicting content-lengths (a table, not a failure: the gateway's own checks sit on top).

Every run is verified outside the timed region (each response's status, headers, body size and trailers; each
decoded request; DATA and WINDOW_UPDATE totals in bulk); a failure prints the reason and exits 2.

    python bench/h2codecs.py                       # 10,000 calls, 100 in flight, median of 3 rounds
    python bench/h2codecs.py --json out.json       # the same, with the figures written as JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from importlib import metadata
from types import ModuleType
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import jh2.config  # type: ignore[import-untyped]  # jh2 ships no py.typed
import jh2.connection  # type: ignore[import-untyped]
import jh2.events  # type: ignore[import-untyped]
import jh2.settings  # type: ignore[import-untyped]
import ngh2

Headers = list[tuple[bytes, bytes]]
# A normalised event: (kind, stream id, headers or data or error code, stream ended, flow-controlled length).
Event = tuple[int, int, Any, bool, int]
HEADERS, DATA, TRAILERS, RESET = range(4)
CODECS = ("h2", "jh2", "ngh2")

REQUEST_BODY = b"\x00\x00\x00\x00\x5f" + bytes(range(95))  # a gRPC message: flag, length, 95 bytes of protobuf
RESPONSE_BODY = b"\x00\x00\x00\x00\x5f" + bytes(range(95, 190))
RESPONSE_HEADERS: Headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILER_FIELDS: Headers = [(b"grpc-status", b"0"), (b"grpc-message", b"OK")]
BULK_BYTES, BULK_FRAME = 64 * 1024 * 1024, 16 * 1024
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
CLIENT_MAGIC = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class BenchFailure(Exception):
    """A codec produced or decoded something wrong; the bench exits 2 with this reason."""


class Codec(Protocol):
    def receive(self, data: bytes) -> list[Event]: ...
    def out(self) -> bytes: ...
    def request(self, headers: Headers) -> int: ...
    def respond(self, stream_id: int, headers: Headers) -> None: ...
    def data(self, stream_id: int, data: bytes, end: bool) -> None: ...
    def trailers(self, stream_id: int, headers: Headers) -> None: ...
    def ack(self, stream_id: int, length: int) -> None: ...


class H2Codec:
    """h2 or jh2, which share one API: `H2Codec(h2, client=False, max_streams=1000)`."""

    def __init__(self, lib: ModuleType, client: bool, max_streams: int) -> None:
        config = lib.config.H2Configuration(client_side=client, header_encoding=None)
        self.conn = lib.connection.H2Connection(config=config)
        if not client:  # as hypercorn does: the limit applies from the first SETTINGS, without waiting for an ACK
            limit = {lib.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams}
            self.conn.local_settings = lib.settings.Settings(client=False, initial_values=limit)
        self.conn.initiate_connection()
        events = lib.events
        self.kinds = {
            events.RequestReceived: HEADERS,
            events.ResponseReceived: HEADERS,
            events.DataReceived: DATA,
            events.TrailersReceived: TRAILERS,
            events.StreamReset: RESET,
        }

    def receive(self, data: bytes) -> list[Event]:
        normalised: list[Event] = []
        kinds = self.kinds
        for event in self.conn.receive_data(data):
            kind = kinds.get(type(event))
            if kind is None:  # StreamEnded is folded into the event before it; settings and pings need nothing
                continue
            if kind == DATA:
                ended = event.stream_ended is not None
                normalised.append((DATA, event.stream_id, event.data, ended, event.flow_controlled_length))
            elif kind == RESET:
                normalised.append((RESET, event.stream_id, event.error_code, True, 0))
            else:
                normalised.append((kind, event.stream_id, event.headers, event.stream_ended is not None, 0))
        return normalised

    def out(self) -> bytes:
        return self.conn.data_to_send()  # type: ignore[no-any-return]

    def request(self, headers: Headers) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers)
        return stream_id

    def respond(self, stream_id: int, headers: Headers) -> None:
        self.conn.send_headers(stream_id, headers)

    def data(self, stream_id: int, data: bytes, end: bool) -> None:
        self.conn.send_data(stream_id, data, end_stream=end)

    def trailers(self, stream_id: int, headers: Headers) -> None:
        self.conn.send_headers(stream_id, headers, end_stream=True)

    def ack(self, stream_id: int, length: int) -> None:
        self.conn.acknowledge_received_data(length, stream_id)


class NgCodec:
    """ngh2, with window updates left to the application as h2's are: `NgCodec(client=True, max_streams=1000)`."""

    def __init__(self, client: bool, max_streams: int) -> None:
        role = ngh2.Role.CLIENT if client else ngh2.Role.SERVER
        self.conn = ngh2.Connection(role, ngh2.Configuration(auto_window_update=False))
        self.conn.initiate_connection(None if client else {ngh2.Setting.MAX_CONCURRENT_STREAMS: max_streams})
        self.kinds: dict[type, int] = {
            ngh2.RequestReceived: HEADERS,
            ngh2.ResponseReceived: HEADERS,
            ngh2.DataReceived: DATA,
            ngh2.TrailersReceived: TRAILERS,
            ngh2.StreamReset: RESET,
        }

    def receive(self, data: bytes) -> list[Event]:
        self.conn.receive_data(data)
        normalised: list[Event] = []
        kinds = self.kinds
        for event in self.conn.events():
            kind = kinds.get(type(event))
            if kind is None:
                continue
            if kind == DATA:
                assert isinstance(event, ngh2.DataReceived)
                normalised.append((DATA, event.stream_id, event.data, event.end_stream, len(event.data)))
            elif kind == RESET:
                assert isinstance(event, ngh2.StreamReset)
                normalised.append((RESET, event.stream_id, event.error_code, True, 0))
            elif kind == TRAILERS:
                assert isinstance(event, ngh2.TrailersReceived)
                normalised.append((TRAILERS, event.stream_id, event.headers, True, 0))
            else:
                assert isinstance(event, ngh2.RequestReceived | ngh2.ResponseReceived)
                normalised.append((HEADERS, event.stream_id, event.headers, event.end_stream, 0))
        return normalised

    def out(self) -> bytes:
        return self.conn.data_to_send()

    def request(self, headers: Headers) -> int:
        return self.conn.send_request(headers)

    def respond(self, stream_id: int, headers: Headers) -> None:
        self.conn.send_response(stream_id, headers)

    def data(self, stream_id: int, data: bytes, end: bool) -> None:
        self.conn.send_data(stream_id, data, end_stream=end)

    def trailers(self, stream_id: int, headers: Headers) -> None:
        self.conn.send_trailers(stream_id, headers)

    def ack(self, stream_id: int, length: int) -> None:
        self.conn.acknowledge_received_data(length, stream_id)


def make_codec(name: str, client: bool, max_streams: int = 1000) -> Codec:
    if name == "ngh2":
        return NgCodec(client, max_streams)
    return H2Codec(h2 if name == "h2" else jh2, client, max_streams)


class ServerLoop:
    """The gateway's server side: keep each request's head and body size, answer it once it has ended."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.open: dict[int, list[Any]] = {}
        self.done: list[tuple[int, Any, int]] = []

    def feed(self, chunk: bytes) -> bytes:
        codec = self.codec
        for kind, stream_id, value, ended, flow in codec.receive(chunk):
            if kind == HEADERS:
                self.open[stream_id] = [value, 0]
            elif kind == DATA:
                self.open[stream_id][1] += len(value)
                codec.ack(stream_id, flow)
            elif kind == RESET:
                raise BenchFailure(f"server: stream {stream_id} reset by the client ({value})")
            if ended:
                head, size = self.open.pop(stream_id)
                self.done.append((stream_id, head, size))
                codec.respond(stream_id, RESPONSE_HEADERS)
                codec.data(stream_id, RESPONSE_BODY, False)
                codec.trailers(stream_id, TRAILER_FIELDS)
        return codec.out()


class ClientLoop:
    """The gateway's upstream side: send a batch of calls, then collect each response's parts."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.open: dict[int, list[Any]] = {}
        self.done: list[tuple[int, Any, int, Any]] = []

    def send(self, batch: list[Headers]) -> bytes:
        codec = self.codec
        for headers in batch:
            codec.data(codec.request(headers), REQUEST_BODY, True)
        return codec.out()

    def feed(self, chunk: bytes) -> None:
        codec = self.codec
        for kind, stream_id, value, ended, flow in codec.receive(chunk):
            if kind == HEADERS:
                self.open[stream_id] = [value, 0, None]
            elif kind == DATA:
                self.open[stream_id][1] += len(value)
                codec.ack(stream_id, flow)
            elif kind == TRAILERS:
                self.open[stream_id][2] = value
            elif kind == RESET:
                raise BenchFailure(f"client: stream {stream_id} reset by the server ({value})")
            if ended:
                head, size, trailers = self.open.pop(stream_id)
                self.done.append((stream_id, head, size, trailers))


def grpc_requests(count: int) -> list[Headers]:
    return [
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/grpc.testing.TestService/UnaryCall"),
            (b":authority", b"greeter.prod.svc.mesh.local:50051"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", b"1S"),
            (b"user-agent", b"grpc-python/1.85.0 grpc-c/50.0.0 (linux; chttp2)"),
            (b"traceparent", b"00-%032x-%016x-01" % (0x4BF92F3577B34DA6A3CE929D0E0E4736 + k, 0x00F067AA0BA902B7 + k)),
        ]
        for k in range(count)
    ]


def batches(requests: list[Headers], inflight: int) -> list[list[Headers]]:
    return [requests[i : i + inflight] for i in range(0, len(requests), inflight)]


def record_unary(requests: list[Headers], inflight: int) -> tuple[list[bytes], list[bytes]]:
    """The bytes a reference h2 client and server exchange, one chunk per batch of calls in flight."""
    client, server = ClientLoop(make_codec("h2", True)), ServerLoop(make_codec("h2", False))
    c2s = [client.codec.out()]
    s2c = [server.feed(c2s[0])]
    client.feed(s2c[0])
    for batch in batches(requests, inflight):
        c2s.append(client.send(batch))
        s2c.append(server.feed(c2s[-1]))
        client.feed(s2c[-1])
    c2s.append(client.codec.out())  # the last window updates
    check_requests("reference", server.done, requests)
    check_responses("reference", client.done, len(requests))
    return c2s, s2c


def as_tuples(headers: Any) -> Headers:
    return [(bytes(name), bytes(value)) for name, value in headers]


def check_requests(who: str, done: list[tuple[int, Any, int]], requests: list[Headers]) -> None:
    if len(done) != len(requests):
        raise BenchFailure(f"{who}: {len(done)} requests decoded, expected {len(requests)}")
    for stream_id, head, size in done:
        if as_tuples(head) != requests[(stream_id - 1) // 2]:
            raise BenchFailure(f"{who}: stream {stream_id} decoded the wrong request head: {head!r}")
        if size != len(REQUEST_BODY):
            raise BenchFailure(f"{who}: stream {stream_id} request body of {size} bytes, expected {len(REQUEST_BODY)}")


def check_responses(who: str, done: list[tuple[int, Any, int, Any]], count: int) -> None:
    if sorted(stream_id for stream_id, *_ in done) != list(range(1, 2 * count, 2)):
        raise BenchFailure(f"{who}: {len(done)} responses decoded, not exactly streams 1, 3, ... {2 * count - 1}")
    for stream_id, head, size, trailers in done:
        if as_tuples(head) != RESPONSE_HEADERS:
            raise BenchFailure(f"{who}: stream {stream_id} response head {head!r}")
        if size != len(RESPONSE_BODY):
            raise BenchFailure(f"{who}: stream {stream_id} response body of {size} bytes")
        if trailers is None or as_tuples(trailers) != TRAILER_FIELDS:
            raise BenchFailure(f"{who}: stream {stream_id} trailers {trailers!r}")


def time_server(name: str, c2s: list[bytes], requests: list[Headers], inflight: int) -> float:
    server = ServerLoop(make_codec(name, False))
    gc.collect()
    start = time.process_time()
    outs = [server.feed(chunk) for chunk in c2s]
    cpu = time.process_time() - start
    check_requests(f"{name} server", server.done, requests)
    referee = ClientLoop(make_codec("h2", True))  # decodes what the server under test wrote
    referee.codec.out()
    referee.feed(outs[0])
    for batch, out in zip(batches(requests, inflight), outs[1:], strict=False):
        referee.send(batch)
        referee.feed(out)
    referee.feed(outs[-1])
    check_responses(f"{name} server (decoded by h2)", referee.done, len(requests))
    return cpu


def time_client(name: str, s2c: list[bytes], requests: list[Headers], inflight: int) -> float:
    client = ClientLoop(make_codec(name, True))
    outs = [client.codec.out()]
    gc.collect()
    start = time.process_time()
    client.feed(s2c[0])
    for batch, chunk in zip(batches(requests, inflight), s2c[1:], strict=True):
        outs.append(client.send(batch))
        client.feed(chunk)
    outs.append(client.codec.out())
    cpu = time.process_time() - start
    check_responses(f"{name} client", client.done, len(requests))
    referee = ServerLoop(make_codec("h2", False))  # decodes what the client under test wrote
    for out in outs:
        referee.feed(out)
    check_requests(f"{name} client (decoded by h2)", referee.done, requests)
    return cpu


def frames(blob: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each frame in `blob`, after the client magic if it starts with it."""
    at = len(CLIENT_MAGIC) if blob.startswith(CLIENT_MAGIC) else 0
    while at < len(blob):
        length = int.from_bytes(blob[at : at + 3], "big")
        kind, flags, stream_id = blob[at + 3], blob[at + 4], int.from_bytes(blob[at + 5 : at + 9], "big") & 0x7FFFFFFF
        yield kind, flags, stream_id, blob[at + 9 : at + 9 + length]
        at += 9 + length


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload


BULK_HEADERS: Headers = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/upload"),
    (b":authority", b"store.prod.svc.mesh.local"),
    (b"content-type", b"application/octet-stream"),
]


def time_bulk_send(name: str) -> float:
    """Send 64 MiB on one stream; after each 16 KiB frame the peer's WINDOW_UPDATEs (stream and connection) arrive."""
    client = make_codec(name, True)
    client.out()
    client.receive(make_codec("h2", False).out() + SETTINGS_ACK)
    window_update = frame(8, 0, 0, BULK_FRAME.to_bytes(4, "big")) + frame(8, 0, 1, BULK_FRAME.to_bytes(4, "big"))
    payload, count = bytes(range(256)) * (BULK_FRAME // 256), BULK_BYTES // BULK_FRAME
    outs = []
    gc.collect()
    start = time.process_time()
    stream_id = client.request(BULK_HEADERS)
    for i in range(count):
        client.data(stream_id, payload, i == count - 1)
        outs.append(client.out())
        client.receive(window_update)
    cpu = time.process_time() - start
    sent = [(flags, len(body)) for kind, flags, sid, body in frames(b"".join(outs)) if kind == 0 and sid == stream_id]
    if sum(size for _, size in sent) != BULK_BYTES or not sent[-1][0] & 1:
        raise BenchFailure(f"{name} bulk send: {sum(size for _, size in sent)} bytes of DATA, END_STREAM missing?")
    return cpu


def time_bulk_receive(name: str) -> float:
    """Receive 64 MiB on one stream, 16 KiB frames read one at a time, each acknowledged as it is consumed."""
    reference = make_codec("h2", True)
    reference.request(BULK_HEADERS)
    payload = bytes(range(256)) * (BULK_FRAME // 256)
    count = BULK_BYTES // BULK_FRAME
    chunks = [reference.out(), SETTINGS_ACK] + [frame(0, 0, 1, payload)] * (count - 1) + [frame(0, 1, 1, payload)]
    server = make_codec(name, False)
    outs, received, ended = [server.out()], 0, False
    gc.collect()
    start = time.process_time()
    for chunk in chunks:
        for kind, stream_id, value, end, flow in server.receive(chunk):
            if kind == DATA:
                received += len(value)
                server.ack(stream_id, flow)
            ended = ended or end
        outs.append(server.out())
    cpu = time.process_time() - start
    granted = sum(
        int.from_bytes(body, "big") for kind, _, sid, body in frames(b"".join(outs)) if kind == 8 and sid == 0
    )
    if received != BULK_BYTES or not ended or granted < BULK_BYTES - 65535:
        raise BenchFailure(f"{name} bulk receive: {received} bytes, ended {ended}, connection window +{granted}")
    return cpu


def record_idle(count: int, max_streams: int) -> list[bytes]:
    # ngh2 records these bytes: h2 counts the open streams on every new one, which takes minutes at 10,000
    client, server = make_codec("ngh2", True), ServerLoop(make_codec("ngh2", False, max_streams))
    c2s = [client.out()]
    client.receive(server.feed(c2s[0]))
    for _ in range(0, count, 100):
        for headers in grpc_requests(100):
            client.request(headers)
        c2s.append(client.out())
        client.receive(server.feed(c2s[-1]))
    if len(server.open) != count:
        raise BenchFailure(f"reference idle: {len(server.open)} streams open, expected {count}")
    return c2s


def fill_idle(name: str, chunks: list[bytes], max_streams: int) -> tuple[Codec, int, bytes]:
    server = make_codec(name, False, max_streams)
    opened, outs = 0, [server.out()]
    for chunk in chunks:
        opened += sum(1 for event in server.receive(chunk) if event[0] == HEADERS)
        outs.append(server.out())
    return server, opened, b"".join(outs)


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def idle_child(name: str, path: str) -> None:
    """In a fresh process: RSS, then tracemalloc, of one server connection holding the recorded idle streams."""
    with open(path, "rb") as file:
        chunks, count, max_streams = pickle.load(file)
    gc.collect()
    before, start = rss_kib(), time.process_time()
    server, opened, out = fill_idle(name, chunks, max_streams)
    open_cpu = time.process_time() - start
    gc.collect()
    rss_delta = rss_kib() - before
    refused = [kind for kind, *_ in frames(out) if kind in (3, 7)]  # RST_STREAM, GOAWAY
    if opened != count or refused:
        print(json.dumps({"error": f"{name} idle: {opened} streams opened of {count}, {len(refused)} RST/GOAWAY"}))
        return
    del server, out
    gc.collect()
    tracemalloc.start()
    kept = fill_idle(name, chunks, max_streams)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    figures = {"rss_delta_kib": rss_delta, "traced_current": current, "traced_peak": peak, "open_cpu_s": open_cpu}
    print(json.dumps(figures))


def measure_idle(count: int) -> dict[str, dict[str, float]]:
    max_streams = 2 * count
    with tempfile.NamedTemporaryFile(suffix=".pickle", delete=False) as file:
        pickle.dump((record_idle(count, max_streams), count, max_streams), file)
    try:
        results = {}
        for name in CODECS:
            command = [sys.executable, __file__, "--idle-child", name, file.name]
            found = json.loads(subprocess.run(command, capture_output=True, check=True, text=True).stdout)
            if "error" in found:
                raise BenchFailure(found["error"])
            found["bytes_per_stream_rss"] = found["rss_delta_kib"] * 1024 / count
            found["bytes_per_stream_traced"] = found["traced_current"] / count
            found["open_us_per_stream"] = found["open_cpu_s"] / count * 1e6
            results[name] = found
        return results
    finally:
        os.unlink(file.name)


CONFLICTING_LENGTHS = [(b"content-length", b"100"), (b"content-length", b"5")]
REFUSALS = {(): "accepted", (3,): "RST_STREAM", (7,): "GOAWAY", (3, 7): "RST_STREAM + GOAWAY"}


def hostile_inputs() -> dict[str, bytes]:
    """Client bytes a codec should refuse, each after a valid preface (not timed; the table says what each did)."""
    preface = make_codec("h2", True).out()
    resets = H2Codec(h2, True, 1000)
    for headers in grpc_requests(5000):
        resets.conn.reset_stream(resets.request(headers), 8)  # CANCEL
    head = grpc_requests(1)[0]

    def encode(headers: Headers) -> bytes:  # a fresh HPACK context per input: each goes to a new connection
        return hpack.Encoder().encode(headers)

    return {
        "rapid reset (5,000 HEADERS + RST_STREAM)": resets.out()[len(preface) :],
        "CONTINUATION flood (100 empty frames)": frame(1, 0, 1, b"\x82") + frame(9, 0, 1, b"") * 100,
        "CR LF inside a header value": frame(1, 4, 1, encode([*head, (b"x-note", b"a\r\nx-injected: 1")])),
        "conflicting content-length": frame(1, 4, 1, encode([*head, *CONFLICTING_LENGTHS])),
    }


def hostile_verdicts() -> dict[str, dict[str, str]]:
    preface = make_codec("h2", True).out()
    verdicts: dict[str, dict[str, str]] = {}
    for label, attack in hostile_inputs().items():
        verdicts[label] = {}
        for name in CODECS:
            server = make_codec(name, False)
            try:
                server.receive(preface + attack)
            except Exception as error:  # each codec raises its own ProtocolError; any of them is a refusal
                verdicts[label][name] = f"raised {type(error).__name__}"
                continue
            refusals = sorted({kind for kind, *_ in frames(server.out()) if kind in (3, 7)})
            verdicts[label][name] = REFUSALS[tuple(refusals)]
    return verdicts


def run_rounds(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    requests = grpc_requests(args.streams)
    c2s, s2c = record_unary(requests, args.inflight)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in CODECS}
    cases: dict[str, Callable[[str], float]] = {
        "server_s": lambda name: time_server(name, c2s, requests, args.inflight),
        "client_s": lambda name: time_client(name, s2c, requests, args.inflight),
        "bulk_send_s": time_bulk_send,
        "bulk_receive_s": time_bulk_receive,
    }
    for _ in range(args.rounds):  # interleaved, so drift in the machine's speed hits every codec alike
        for name in CODECS:
            for case, run in cases.items():
                samples[name].setdefault(case, []).append(run(name))
    results: dict[str, dict[str, float]] = {}
    mib = BULK_BYTES / 2**20
    for name, cases_seen in samples.items():
        median = {case: statistics.median(values) for case, values in cases_seen.items()}
        results[name] = {
            "server_req_per_s": args.streams / median["server_s"],
            "server_us_per_req": median["server_s"] / args.streams * 1e6,
            "client_req_per_s": args.streams / median["client_s"],
            "client_us_per_req": median["client_s"] / args.streams * 1e6,
            "bulk_send_mib_per_s": mib / median["bulk_send_s"],
            "bulk_receive_mib_per_s": mib / median["bulk_receive_s"],
        }
    return results


RATED = ("server_req_per_s", "client_req_per_s", "bulk_send_mib_per_s", "bulk_receive_mib_per_s")


def print_table(results: dict[str, dict[str, Any]], idle_streams: int) -> None:
    print(
        f"{'codec':6} {'server req/s':>12} {'µs/req':>7} {'client req/s':>12} {'µs/req':>7} "
        f"{'bulk send MiB/s':>15} {'bulk recv MiB/s':>15}"
    )
    for name, row in results.items():
        print(
            f"{name:6} {row['server_req_per_s']:12,.0f} {row['server_us_per_req']:7.1f} "
            f"{row['client_req_per_s']:12,.0f} {row['client_us_per_req']:7.1f} "
            f"{row['bulk_send_mib_per_s']:15,.0f} {row['bulk_receive_mib_per_s']:15,.0f}"
        )
    print("\nratio to h2 in this run (higher is faster)")
    for name, row in results.items():
        ratios = "  ".join(f"{key.removesuffix('_per_s')} {row[key] / results['h2'][key]:5.2f}" for key in RATED)
        print(f"{name:6} {ratios}")
    if not idle_streams:
        return
    print(f"\n{idle_streams:,} idle streams on one server connection, per stream")
    print(f"{'codec':6} {'RSS bytes':>10} {'traced bytes':>12} {'traced peak':>12} {'CPU to open, µs':>16}")
    for name, row in results.items():
        idle = row["idle"]
        print(
            f"{name:6} {idle['bytes_per_stream_rss']:10,.0f} {idle['bytes_per_stream_traced']:12,.0f} "
            f"{idle['traced_peak'] / idle_streams:12,.0f} {idle['open_us_per_stream']:16,.1f}"
        )


def environment() -> dict[str, str]:
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    versions = {name: metadata.version(name) for name in CODECS}
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(), "cpu": cpu} | versions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--streams", type=int, default=10_000, help="unary calls per case (default 10,000)")
    parser.add_argument("--inflight", type=int, default=100, help="calls in flight on the connection (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians reported (default 3)")
    parser.add_argument("--idle-streams", type=int, default=10_000, help="open idle streams measured (0: skip)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--idle-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.idle_child:
        idle_child(*args.idle_child)
        return 0
    try:
        results: dict[str, dict[str, Any]] = dict(run_rounds(args))
        if args.idle_streams:
            for name, idle in measure_idle(args.idle_streams).items():
                results[name]["idle"] = idle
        hostile = hostile_verdicts()
    except BenchFailure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 2
    env = environment()
    print(" ".join(f"{key} {value}" for key, value in env.items()))
    print(f"{args.streams:,} unary calls, {args.inflight} in flight, 64 MiB bulk, median of {args.rounds} rounds\n")
    print_table(results, args.idle_streams)
    print(f"\nhostile input to a server connection, one read each\n{'':42} " + " ".join(f"{n:22}" for n in CODECS))
    for label, verdicts in hostile.items():
        print(f"{label:42} " + " ".join(f"{verdicts[name]:22}" for name in CODECS))
    if args.json:
        with open(args.json, "w") as file:
            figures = {"environment": env, "arguments": vars(args), "results": results, "hostile": hostile}
            json.dump(figures, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
