"""What exporting a span costs the gateway: `python bench/otlp.py [--spans N] [--instructions]`.

1. Encoding alone, per span: `gateway.exporter.SpanEncoder` against the official `opentelemetry-proto` classes (the
   reference encoder the tests compare it with), on the same hop records; and what gzip (level 1) would add.
2. The whole export path, per span: hop records go through `Exporter.add()` at a steady rate, and `Exporter.run()`
   batches, encodes and POSTs them with httpx to a real OTLP/HTTP receiver in another process (it decodes every
   body with the official classes and answers 200, as a collector does). The figure is this process's CPU time
   (user + system) over the spans the receiver accepted, with the CPU of the feeding loop alone subtracted.
3. `--instructions`: encoding as instruction counts under valgrind (callgrind), robust to a noisy shared machine:
   two runs that differ only in the number of spans encoded, the difference divided by that number.

Run it against another tree with `PYTHONPATH=/path/to/tree python bench/otlp.py --path-only` (parts 2 and 3 use
only `Exporter(endpoint, group, metrics)`, `add()` and `run()`).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import subprocess
import sys
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from random import getrandbits
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # `tests.gateway.otlp_reference`; PYTHONPATH still chooses the gateway package

import callgrind  # noqa: E402  # bench/, beside this script
import uvloop  # noqa: E402

from gateway.exporter import Exporter  # noqa: E402
from gateway.telemetry import Metrics  # noqa: E402


def make_hops(count: int) -> list[tuple[Any, ...]]:
    """Plausible hop records: distinct ids, half with a parent, 1 in 20 failed, paths of various lengths."""
    hops = []
    for n in range(count):
        failed = n % 20 == 0
        hops.append(
            (
                1_790_000_000.0 + n * 0.001,
                b"%08x-%04x-4%03x-%04x-%012x" % (getrandbits(32), n & 0xFFFF, 0, 0x8000, getrandbits(48)),
                b"%032x" % getrandbits(128),
                b"%016x" % getrandbits(64),
                b"%016x" % getrandbits(64) if n % 2 else b"",
                True,
                "destination",
                "shop",
                "catalog",
                "v1" if n % 10 else "v2",
                "default",
                "127.0.0.1:9101" if n % 3 else "127.0.0.1:9102",
                b"GET" if n % 5 else b"POST",
                b"/catalog/items/%d?view=full" % n if n % 4 else b"/",
                b"catalog",
                503 if failed else 200,
                0.000450 + n % 97 * 1e-6,
                0.000310 + n % 89 * 1e-6,
                3 if failed else 1,
                0 if n % 5 else 128,
                512 + n % 1000,
                "connect_failure" if failed else "",
                b"10.0.0.%d" % (n % 8),
            )
        )
    return hops


def per_span(encode: Callable[[], object], spans: int, rounds: int = 5) -> float:
    """Median CPU µs per span of `encode()` over `rounds` runs."""
    samples = []
    for _ in range(rounds):
        started = time.process_time()
        encode()
        samples.append((time.process_time() - started) / spans * 1e6)
    return sorted(samples)[rounds // 2]


def encoding(spans: int) -> None:
    from gateway.exporter import SpanEncoder
    from tests.gateway.otlp_reference import encode, resource

    hops = make_hops(spans)
    encoder = SpanEncoder("bench")
    body = encoder.request(encoder.spans(hops))
    new = per_span(lambda: encoder.request(encoder.spans(hops)), spans)
    reference = per_span(lambda: encode(hops, resource("bench"), {}), spans)
    compressed = gzip.compress(body, 1)
    gzipped = per_span(lambda: gzip.compress(body, 1), spans)
    print(f"encode, SpanEncoder:               {new:6.2f} us/span")
    print(f"encode, official protobuf classes: {reference:6.2f} us/span")
    print(
        f"gzip level 1 of the body:          {gzipped:6.2f} us/span more "
        f"({len(body) / spans:.0f} -> {len(compressed) / spans:.0f} bytes a span)"
    )


# --- the whole export path -------------------------------------------------------------------------------------


def serve() -> None:
    """The receiver (a child process): decodes each POST with the official classes, prints its port, serves."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    answer = ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            try:
                ExportTraceServiceRequest.FromString(body)
                status = 200
            except Exception:  # not OTLP: the exporter counts the batch as dropped and the bench fails
                status = 400
            self.send_response(status)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


async def export_path(endpoint: str, spans: int, rate: int) -> tuple[float, float]:
    """(CPU µs per exported span, of which the feeding loop alone), spans added at `rate` per second."""
    hops = make_hops(spans)
    step = 256
    pause = step / rate
    metrics = Metrics()

    async def feed(exporter: Exporter | None) -> None:
        for first in range(0, spans, step):
            if exporter is not None:
                for hop in hops[first : first + step]:
                    exporter.add(hop)
            await asyncio.sleep(pause)

    started = time.process_time()
    await feed(None)
    idle = time.process_time() - started
    exporter = Exporter(endpoint, "bench", metrics)
    task = asyncio.get_running_loop().create_task(exporter.run())
    await asyncio.sleep(0.01)  # the exporter's httpx client is made once per process: not a cost per span
    started = time.process_time()
    await feed(exporter)
    exporter.wakeup.set()  # the last, partial batch: now rather than after the export interval
    while sum(metrics.counters.values()) < spans:
        await asyncio.sleep(0.005)
    used = time.process_time() - started
    task.cancel()
    exported = metrics.counters.get(("meshgate_spans_exported_total", "catalog"), 0)
    assert exported == spans, f"only {exported} of {spans} spans were accepted: {metrics.counters}"
    return (used - idle) / spans * 1e6, idle / spans * 1e6


def whole_path(spans: int, rate: int) -> None:
    receiver = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
        uvloop.run(export_path(endpoint, min(spans, 2048), rate))  # warm up: imports, connection, caches
        results = sorted(uvloop.run(export_path(endpoint, spans, rate)) for _ in range(3))
    finally:
        receiver.terminate()
        receiver.wait()
    used, idle = results[1]
    print(
        f"export path (batch, encode, POST to a local receiver): {used:6.2f} us/span "
        f"(median of 3; {spans} spans at {rate}/s; the feeding loop's own {idle:.2f} us/span subtracted)"
    )


# --- instruction counts ----------------------------------------------------------------------------------------


def instructions(spans: int) -> None:
    def count(n: int, encoder: str) -> int:
        return callgrind.instructions(__file__, "--encode-once", str(n), encoder)

    for encoder in ("SpanEncoder", "official"):
        per = (count(spans, encoder) - count(0, encoder)) / spans
        print(f"encode, {encoder:<11} instructions per span (callgrind): {per:,.0f}")


def encode_once(spans: int, encoder: str) -> None:
    """One encoding of `spans` hops (under valgrind): everything else is the same for every span count."""
    from gateway.exporter import SpanEncoder
    from tests.gateway.otlp_reference import encode, resource

    hops = make_hops(2048)[:spans]
    if encoder == "SpanEncoder":
        span_encoder = SpanEncoder("bench")
        span_encoder.request(span_encoder.spans(hops))
    else:
        encode(hops, resource("bench"), {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=20_000, help="spans added per second in the export path")
    parser.add_argument("--path-only", action="store_true", help="only the whole export path (for other trees)")
    parser.add_argument("--instructions", action="store_true", help="also count instructions under valgrind")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--encode-once", nargs=2, metavar=("SPANS", "ENCODER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
    elif args.encode_once:
        encode_once(int(args.encode_once[0]), args.encode_once[1])
    else:
        if not args.path_only:
            encoding(min(args.spans, 4096))
        whole_path(args.spans, args.rate)
        if args.instructions:
            instructions(500)


if __name__ == "__main__":
    main()
