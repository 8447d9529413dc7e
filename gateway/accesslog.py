"""The access log: one JSON line per request, to stdout or a file, written off the hot path and off the loop.

The hot path appends the request's hop record to a buffer. Every 200 ms `run()` hands the buffer to a writer
thread, which formats the lines and writes them (in pieces of whole lines no larger than PIPE_BUF, so the lines
of several workers sharing stdout never interleave). A slow disk or pipe blocks only that thread; when it falls
behind, lines are dropped and counted (`meshgate_access_log_dropped_total`) rather than slowing requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import queue
import select
import sys
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway.hops import HOP, response_flags

if TYPE_CHECKING:
    from gateway.telemetry import Metrics

FLUSH_INTERVAL = 0.2
MAX_BUFFERED = 50_000  # lines gathered between two hand-offs
MAX_BATCHES = 25  # hand-offs the writer may fall behind (5 s) before lines are dropped
STOP_TIMEOUT = 2.0


class AccessLog:
    """>>> log = AccessLog("stdout", metrics); log.add(hop); await log.run()  # a task, until cancelled"""

    def __init__(self, target: str, metrics: Metrics) -> None:
        self.target = target
        self.metrics = metrics
        if target == "stdout":
            self.fd, self.owns_fd = sys.stdout.fileno(), False
        else:
            self.fd, self.owns_fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), True
        self.buffer: list[tuple[Any, ...]] = []
        self.batches: queue.Queue[list[tuple[Any, ...]] | None] = queue.Queue(MAX_BATCHES)
        self.writer = threading.Thread(target=self._write_batches, name="meshgate-access-log", daemon=True)

    def add(self, hop: tuple[Any, ...]) -> None:
        if len(self.buffer) < MAX_BUFFERED:
            self.buffer.append(hop)
        else:
            self.metrics.count("meshgate_access_log_dropped_total", hop[HOP["destination"]])

    def hand_off(self) -> None:
        if not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        try:
            self.batches.put_nowait(batch)
        except queue.Full:
            for hop in batch:
                self.metrics.count("meshgate_access_log_dropped_total", hop[HOP["destination"]])

    async def run(self) -> None:
        self.writer.start()
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                self.hand_off()
        finally:
            self.hand_off()
            # A writer stuck on its output is a daemon thread: it dies with the process, and keeps its fd open.
            with contextlib.suppress(queue.Full):
                self.batches.put(None, timeout=STOP_TIMEOUT)
            self.writer.join(STOP_TIMEOUT)
            if self.owns_fd and not self.writer.is_alive():
                os.close(self.fd)

    def _write_batches(self) -> None:
        while (batch := self.batches.get()) is not None:
            piece: list[bytes] = []
            size = 0
            for hop in batch:
                line = line_of(hop).encode("utf-8", "backslashreplace")
                if size + len(line) > select.PIPE_BUF and piece:
                    self._write(b"".join(piece))
                    piece, size = [], 0
                piece.append(line)
                size += len(line)
            if piece:
                self._write(b"".join(piece))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except OSError:
                return  # the output is gone (closed pipe, full disk): these lines are lost, the gateway goes on


_LINE = (
    '{"request_id":"%s","trace_id":"%s","span_id":"%s","parent_span_id":"%s","reporter":"%s","source":"%s",'
    '"destination":"%s","subset":"%s","route":"%s","endpoint":%s,"method":"%s","target":%s,"host":%s,"status":%d,'
    '"duration":%r,"upstream_duration":%r,"tries":%d,"bytes_in":%d,"bytes_out":%d,"error":"%s","peer":"%s",'
    '"grpc_status":%s,"flags":"%s","time":"%s.%03d+00:00","retries":%d}\n'
)


def line_of(hop: tuple[Any, ...]) -> str:
    """One JSON line. Only the target and Host come from the client unchecked, so only they go through json;
    everything else is a validated token, a config name, an address or a number (3x faster than json.dumps of
    the whole record, measured here)."""
    (start, request_id, trace_id, span_id, parent, _, reporter, source, destination, subset, route, endpoint) = hop[:12]
    (method, target, host, status, duration, upstream, tries, bytes_in, bytes_out, error, peer, grpc_status) = hop[12:]
    seconds = int(start)
    return _LINE % (
        request_id.decode("latin-1"),
        trace_id.decode(),
        span_id.decode(),
        parent.decode(),
        reporter,
        source,
        destination,
        subset,
        route,
        f'"{endpoint}"' if endpoint is not None else "null",
        method.decode("latin-1"),
        json.dumps(target.decode("latin-1")),
        json.dumps(host.decode("latin-1")),
        status,
        duration,
        upstream,
        tries,
        bytes_in,
        bytes_out,
        error,
        peer.decode("latin-1"),
        grpc_status if grpc_status >= 0 else "null",
        response_flags(hop),
        _second(seconds),
        int((start - seconds) * 1000),
        max(0, tries - 1),
    )


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
