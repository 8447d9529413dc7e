"""The span store: spans from OTLP/HTTP (`receiver`) in one SQLite file, bounded, written off the request path.

The receiver hands `SpanRow`s to `SpanStore.offer`, which only appends them to a queue bounded in spans and in
bytes; one writer thread inserts whatever is queued in one transaction, keeps a summary row per trace (`traces`:
what the recent-traces list reads), and evicts whole traces, oldest first, past `max_spans`, `max_bytes` (the
file's size: its pages in use) or `max_age`. Freed pages go back to the file system (incremental vacuum), so the
file shrinks again after a burst. Every span that is not kept is counted under a reason (`DROP_REASONS`);
`SpanCollector` reports the counts when /metrics is scraped. Reads run on their own thread and connection, and come
back as the dashboard's one span shape (`span_dict`), which the gateways' hop records and Jaeger's spans are turned
into as well; a stored span whose gateway hop its sender did not prove says why in `unverified`, and is no hop.

Measured here: ~25 µs a span to write (four indexes on random ids), ~40 µs once evictions run; ~1 KB a span on
disk, so the default 200,000 spans take about 200 MB, within the default 512 MiB; spans of the largest size
(`otlp.MAX_SPAN_BYTES`) reach `max_bytes` first.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import itertools
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dashboard.datadir import private_file
from dashboard.spans.receiver import SpanRow

log = logging.getLogger("meshgate.spans")

_T = TypeVar("_T")

DB_FILE = "spans.db"
MAX_SPANS = 200_000
MAX_BYTES = 512 << 20  # the file's pages in use (its size once freed pages are returned)
MAX_AGE = 24 * 3600.0  # seconds
MAX_QUEUED = 50_000  # spans received but not yet written; more are dropped (reason "queue")
MAX_QUEUED_BYTES = 64 << 20  # their text (names, attributes, resources), also what one write transaction adds
PRUNE_INTERVAL = 1.0  # seconds between age checks while no spans arrive
MAX_SERVICES = 2048  # characters of a trace's list of services (what the service filter searches)
VACUUM_SLACK = 4 << 20  # bytes of freed pages the file keeps for the next writes (at most max_bytes / 8)
WAL_LIMIT = 4 << 20  # bytes the write-ahead log is cut back to once checkpointed (SQLite keeps its largest size)
TRIM_AFTER = 8 << 20  # bytes of rows written since the writer was last idle, after which memory goes back
# Why spans were not kept: bad ids; the writer's queue full; already stored; older than max_age; evicted past
# max_spans; past the bytes one request may store (otlp.MAX_REQUEST_BYTES); evicted past max_bytes; a disk error.
DROP_REASONS = ("invalid", "queue", "duplicate", "age", "count", "oversize", "size", "error")


@dataclass(frozen=True)
class TraceFilters:
    """What the recent-traces list asks for; `parse` reads it from query parameters (empty values are absent).

    >>> TraceFilters.parse({"service": "catalog", "status": "5xx", "min_duration_ms": "250"})
    TraceFilters(service='catalog', status='5xx', min_duration_ms=250.0, limit=50)
    """

    service: str | None = None
    status: str | None = None  # 2xx | 4xx | 5xx (the root span's HTTP status) | error (any span failed)
    min_duration_ms: float | None = None
    limit: int = 50

    STATUSES = ("2xx", "3xx", "4xx", "5xx", "error")
    MAX_LIMIT = 500

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> TraceFilters:
        """Raises ValueError with a one-line reason."""
        service = params.get("service") or None
        if service is not None and len(service) > 256:
            raise ValueError("service: expected at most 256 characters")
        status = params.get("status") or None
        if status is not None and status not in cls.STATUSES:
            raise ValueError(f"status: expected one of {', '.join(cls.STATUSES)}, got {status!r}")
        text = params.get("min_duration_ms") or None
        duration = None
        if text is not None:
            try:
                duration = float(text)
            except ValueError:
                duration = -1.0
            if not 0 <= duration < 1e9:  # also refuses nan and inf
                raise ValueError(f"min_duration_ms: expected milliseconds >= 0, got {text!r}")
        limit_text = params.get("limit") or "50"
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= cls.MAX_LIMIT:
            raise ValueError(f"limit: expected an integer from 1 to {cls.MAX_LIMIT}, got {limit_text!r}")
        return cls(service, status, duration, int(limit_text))


@dataclass(frozen=True)
class StoredSpan:
    """A span read back from the store, with its attributes and resource decoded."""

    row: SpanRow
    attributes: dict[str, Any]
    resource: dict[str, Any]


# The span as the dashboard shows it, whichever source it came from; `source` says which ("store", "ring",
# "jaeger") and `found_in` every source that had it (a sampled hop is in the store and in its gateway's ring).
SPAN_KEYS = (
    "trace_id",  # 32 hex digits
    "span_id",  # 16 hex digits
    "parent_span_id",  # "" for a root
    "name",
    "kind",  # server | client | internal | producer | consumer | unspecified
    "service",  # the resource's service.name (a gateway's is meshgate-gateway-<group>)
    "group",  # the gateway group that recorded the hop
    "reporter",  # source (the caller's gateway) | destination (the owner's gateway)
    "caller",  # the calling group, external or unknown (the hop's `source` label)
    "destination",  # the mesh service called
    "subset",
    "route",
    "endpoint",
    "method",
    "path",
    "start",  # seconds since the epoch
    "duration_ms",
    "status",  # the HTTP status code
    "error",  # why the hop failed (an error type, or the 5xx code), else None
    "tries",
    "request_id",
    "unverified",  # why this span, which claims to be a gateway's hop, is not shown as one; None for the others
    "attributes",
    "source",
    "found_in",
)
KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def span_dict(**fields: Any) -> dict[str, Any]:
    """A span in the dashboard's shape: every key of `SPAN_KEYS`, None where the source did not say."""
    span = dict.fromkeys(SPAN_KEYS)
    span.update(fields)
    span["attributes"] = span["attributes"] or {}
    span["found_in"] = span["found_in"] or [span["source"]]
    return span


def text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def from_stored(stored: StoredSpan) -> dict[str, Any]:
    """A stored span in the dashboard's shape. One whose sender did not prove the gateway group it claims keeps
    its attributes but gets no group or reporter: it is shown, marked, and is never taken for a gateway hop."""
    row, attributes = stored.row, stored.attributes
    proven = row.unverified is None
    retries = integer(attributes.get("meshgate.retries"))
    error = text(attributes.get("error.type"))
    if error is None and row.status_code == 2:  # Status.STATUS_CODE_ERROR
        error = row.status_message or "error"
    if error is None and (row.http_status or 0) >= 500:
        error = str(row.http_status)
    return span_dict(
        trace_id=row.trace_id,
        span_id=row.span_id,
        parent_span_id=row.parent_span_id,
        name=row.name,
        kind=KINDS.get(row.kind, "unspecified"),
        service=row.service,
        group=text(stored.resource.get("meshgate.group")) if proven else None,
        reporter=text(attributes.get("meshgate.reporter")) if proven else None,
        caller=text(attributes.get("meshgate.source")),
        destination=row.mesh_service,
        subset=text(attributes.get("meshgate.subset")),
        route=text(attributes.get("meshgate.route")),
        endpoint=text(attributes.get("meshgate.endpoint")),
        method=text(attributes.get("http.request.method")) or text(attributes.get("http.method")),
        path=text(attributes.get("url.path")) or text(attributes.get("http.target")),
        start=row.start_ns / 1e9,
        duration_ms=(row.end_ns - row.start_ns) / 1e6,
        status=row.http_status,
        error=error,
        tries=None if retries is None else retries + 1,
        request_id=row.request_id,
        unverified=row.unverified,
        attributes={**attributes, **{f"resource.{key}": value for key, value in stored.resource.items()}},
        source="store",
    )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_span_id TEXT NOT NULL, name TEXT NOT NULL,
    kind INTEGER NOT NULL, service TEXT NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
    status_code INTEGER NOT NULL, status_message TEXT NOT NULL, http_status INTEGER, mesh_service TEXT,
    request_id TEXT, error INTEGER NOT NULL, attributes TEXT NOT NULL, resource TEXT NOT NULL, unverified TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS spans_trace ON spans (trace_id, span_id);
CREATE INDEX IF NOT EXISTS spans_request ON spans (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS spans_start ON spans (start_ns);
CREATE TABLE IF NOT EXISTS traces (
    trace_id TEXT PRIMARY KEY, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, spans INTEGER NOT NULL,
    errors INTEGER NOT NULL, root_key INTEGER NOT NULL, name TEXT NOT NULL, service TEXT NOT NULL,
    mesh_service TEXT, http_status INTEGER, request_id TEXT, services TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_start ON traces (start_ns)
"""
_COLUMNS = ", ".join(SpanRow._fields)
_INSERT = f"INSERT OR IGNORE INTO spans ({_COLUMNS}) VALUES ({', '.join('?' * len(SpanRow._fields))})"
# A gateway's own span replaces one stored under its IDs first that did not prove that gateway (anyone who saw
# the hop's traceparent could post one before the gateway's batch came); otherwise the first one stays.
_PROVE = f"""
UPDATE spans SET ({_COLUMNS}) = ({", ".join("?" * len(SpanRow._fields))})
WHERE trace_id = ? AND span_id = ? AND unverified IS NOT NULL
"""
# The summary row keeps the root's name and status: the span without a parent, else the earliest (`root_key`).
_NEWER_ROOT = "excluded.root_key < root_key"
_UPSERT_TRACE = f"""
INSERT INTO traces (trace_id, start_ns, end_ns, spans, errors, root_key, name, service, mesh_service, http_status,
                    request_id, services)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (trace_id) DO UPDATE SET
    start_ns = min(start_ns, excluded.start_ns), end_ns = max(end_ns, excluded.end_ns),
    spans = spans + excluded.spans, errors = errors + excluded.errors,
    root_key = min(root_key, excluded.root_key),
    name = CASE WHEN {_NEWER_ROOT} THEN excluded.name ELSE name END,
    service = CASE WHEN {_NEWER_ROOT} THEN excluded.service ELSE service END,
    mesh_service = CASE WHEN {_NEWER_ROOT} THEN excluded.mesh_service ELSE mesh_service END,
    http_status = CASE WHEN {_NEWER_ROOT} THEN excluded.http_status ELSE http_status END,
    request_id = CASE WHEN {_NEWER_ROOT} THEN coalesce(excluded.request_id, request_id)
                 ELSE coalesce(request_id, excluded.request_id) END,
    services = CASE WHEN instr(services, excluded.services) OR length(services) > {MAX_SERVICES} THEN services
               ELSE services || substr(excluded.services, 2) END
"""
_SEP = "\x1f"  # traces.services: every service.name and meshgate.service in the trace, each between two of these
_HAS_PARENT = 1 << 62  # root_key: spans with a parent sort after every span without one
_STATUS_RANGES = {"2xx": (200, 299), "3xx": (300, 399), "4xx": (400, 499), "5xx": (500, 599)}
_SUMMARY = "trace_id, start_ns, end_ns, spans, errors, name, service, mesh_service, http_status, request_id"
_ROW_OVERHEAD = 256  # bytes of a row besides its text: ids (twice: the table and the index), times, numbers


class Written(NamedTuple):
    """What one write did, span by span."""

    inserted: int
    duplicate: int
    age: int  # too old when they arrived, or evicted for age
    over_limit: int  # evicted because the store held more than max_spans
    over_size: int  # evicted because the file's pages in use took more than max_bytes


_INCREMENTAL = 2  # PRAGMA auto_vacuum: freed pages are kept until `PRAGMA incremental_vacuum` returns them
_UNPROVEN = "stored before the dashboard checked who sends gateway spans"
# An older file gets the `unverified` column; its spans that claim a gateway hop were never checked.
_MARK_UNPROVEN = """
UPDATE spans SET unverified = ? WHERE service LIKE 'meshgate-gateway-%' OR resource LIKE '%"meshgate.group":%'
    OR attributes LIKE '%"meshgate.reporter":%'
"""


class _Database:
    """The SQLite file: the writer thread's connection and its queries, and the reader's."""

    def __init__(self, path: str) -> None:
        self.path = path
        private_file(path)
        self.conn = _connect(path)
        self._prepare()
        (self.page_size,) = self.conn.execute("PRAGMA page_size").fetchone()
        (self.stored,) = self.conn.execute("SELECT COUNT(*) FROM spans").fetchone()
        self.used = self.used_bytes()  # as of the last write, for /metrics (read on other threads)

    def _prepare(self) -> None:
        """Create the tables, or bring a file written by an older version up to date."""
        tables = self.conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if self.conn.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
            self.conn.execute(f"PRAGMA auto_vacuum = {_INCREMENTAL}")
            if tables:
                log.info("%s: rewriting the span store once, so that it can shrink", self.path)
            self.conn.execute("VACUUM")  # the mode takes effect when the file is rewritten (in WAL mode, even empty)
        for statement in filter(str.strip, _SCHEMA.split(";")):
            self.conn.execute(statement)
        if "unverified" not in {column[1] for column in self.conn.execute("PRAGMA table_info(spans)")}:
            self.conn.execute("ALTER TABLE spans ADD COLUMN unverified TEXT")
            self.conn.execute(_MARK_UNPROVEN, (_UNPROVEN,))

    def write(self, rows: Sequence[SpanRow], cutoff_ns: int, max_spans: int, max_bytes: int) -> Written:
        fresh = [row for row in rows if row.start_ns >= cutoff_ns]
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            inserted, proven = [], 0
            for row in fresh:
                if self.conn.execute(_INSERT, row).rowcount == 1:
                    inserted.append(row)
                elif row.unverified is None:
                    proven += self.conn.execute(_PROVE, (*row, row.trace_id, row.span_id)).rowcount
            self.conn.executemany(_UPSERT_TRACE, _summaries(inserted))
            self.stored += len(inserted)
            age = self._evict("SELECT trace_id FROM traces WHERE start_ns < ?", (cutoff_ns,))
            count = self._evict_oldest(self.stored - max_spans)
            size = self._evict_oversize(max_bytes)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # the original error is the one to report
                self.conn.execute("ROLLBACK")
                (self.stored,) = self.conn.execute("SELECT COUNT(*) FROM spans").fetchone()
            raise
        self.conn.execute("COMMIT")
        try:
            self._return_free_pages(min(VACUUM_SLACK, max_bytes // 8))
            self.used = self.used_bytes()
        except sqlite3.Error as err:  # housekeeping: the spans are written, and the next write tries again
            log.warning("%s: freed pages not returned: %s", self.path, err)
        duplicate = len(fresh) - len(inserted) - proven
        return Written(len(inserted), duplicate, len(rows) - len(fresh) + age, count, size)

    def used_bytes(self) -> int:
        """The pages in use: the file's size once freed pages are returned (the log's pages count as written)."""
        (pages,) = self.conn.execute("PRAGMA page_count").fetchone()
        (free,) = self.conn.execute("PRAGMA freelist_count").fetchone()
        return int(pages - free) * int(self.page_size)

    def _evict_oversize(self, max_bytes: int) -> int:
        evicted = 0
        while self.stored and (used := self.used_bytes()) > max_bytes:
            # The oldest share of the spans that would bring it under, at their average size. Pages only half
            # emptied stay in use, so this may take another round; each round evicts at least one trace.
            gone = self._evict_oldest(math.ceil(self.stored * (used - max_bytes) / used))
            if not gone:  # spans without a summary cannot happen; stop rather than loop
                break
            evicted += gone
        return evicted

    def _evict_oldest(self, excess: int) -> int:
        """Evict whole traces, oldest first, until at least `excess` spans are gone (or none are left)."""
        evicted = 0
        while evicted < excess:
            oldest = self.conn.execute("SELECT trace_id, spans FROM traces ORDER BY start_ns LIMIT 256").fetchall()
            if not oldest:  # spans without a summary cannot happen; stop rather than loop
                break
            chosen, total = [], evicted
            for trace_id, spans in oldest:
                chosen.append(trace_id)
                total += spans
                if total >= excess:
                    break
            evicted += self._delete(chosen)
        return evicted

    def _return_free_pages(self, slack: int) -> None:
        """Give freed pages back to the file system once there are more than `slack` bytes of them, then let the
        file shrink (a checkpoint copies the log in; it does not wait for readers)."""
        (free,) = self.conn.execute("PRAGMA freelist_count").fetchone()
        if free * self.page_size > slack:
            # executescript steps the pragma to its end: execute() would free one page per call.
            self.conn.executescript("PRAGMA incremental_vacuum")
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def release_memory(self) -> None:
        """Empty this connection's page cache and hand freed heap back to the system: a burst's rows are freed,
        but SQLite's cache and glibc's arenas (the decoding threads' too) would otherwise keep their memory."""
        with contextlib.suppress(sqlite3.Error):  # only memory: the writer must go on whatever happens here
            self.conn.execute("PRAGMA shrink_memory")
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _evict(self, query: str, params: tuple[object, ...]) -> int:
        return self._delete([trace_id for (trace_id,) in self.conn.execute(query, params).fetchall()])

    def _delete(self, trace_ids: list[str]) -> int:
        if not trace_ids:
            return 0
        deleted = self.conn.executemany("DELETE FROM spans WHERE trace_id = ?", [(t,) for t in trace_ids]).rowcount
        self.conn.executemany("DELETE FROM traces WHERE trace_id = ?", [(t,) for t in trace_ids])
        self.stored -= deleted
        return deleted


def _connect(path: str) -> sqlite3.Connection:
    # check_same_thread=False: each connection is made here but used by one thread only (the writer, the reader).
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # telemetry: a crash may lose the last writes, never the file
    conn.execute("PRAGMA cache_size=-32768")  # KiB: the ids are random, so index pages are touched all over
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
    return conn


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, which hands freed heap memory back to the system (after a burst, several threads'
    arenas hold it); None where there is none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def row_size(row: SpanRow) -> int:
    """About what a row takes, in memory and written: its text, and its ids, numbers and index entries."""
    return len(row.name) + len(row.status_message) + len(row.attributes) + len(row.resource) + _ROW_OVERHEAD


def _summaries(rows: Iterable[SpanRow]) -> list[tuple[object, ...]]:
    """One `traces` upsert per trace among `rows`."""
    by_trace: dict[str, list[SpanRow]] = {}
    for row in rows:
        by_trace.setdefault(row.trace_id, []).append(row)
    summaries: list[tuple[object, ...]] = []
    for trace_id, spans in by_trace.items():
        root = min(spans, key=_root_key)
        request_id = root.request_id or next((span.request_id for span in spans if span.request_id), None)
        summaries.append(
            (
                trace_id,
                min(span.start_ns for span in spans),
                max(span.end_ns for span in spans),
                len(spans),
                sum(span.error for span in spans),
                _root_key(root),
                root.name,
                root.service,
                root.mesh_service,
                root.http_status,
                request_id,
                _services(spans),
            )
        )
    return summaries


def _services(rows: list[SpanRow]) -> str:
    names = {row.service for row in rows} | {row.mesh_service for row in rows if row.mesh_service}
    return _SEP + "".join(name.replace(_SEP, "") + _SEP for name in sorted(names))


def _root_key(row: SpanRow) -> int:
    return (_HAS_PARENT if row.parent_span_id else 0) + max(0, min(row.start_ns, _HAS_PARENT - 1))


class SpanStore:
    """Spans in one SQLite file, bounded by `max_spans`, `max_bytes` (the file's pages in use) and `max_age`
    (seconds), oldest traces evicted first.

    `offer` never waits: it queues rows for the writer thread (at most `max_queued` spans and `max_queued_bytes` of
    their text; the rest are dropped and counted), and keeps no reference to them once they are written. Reads run
    on their own thread and connection (WAL: they never wait for the writer). The caller owns the store: `close()`
    writes what is queued, then stops the threads.

    >>> spans = SpanStore(os.path.join(data, DB_FILE), max_spans=200_000, max_bytes=512 << 20, max_age=86400)
    >>> batch = span_rows(decode_export(body, "application/x-protobuf")[0], sender)
    >>> spans.offer(batch.rows, batch.invalid, batch.oversize)
    >>> await spans.by_request("5f0c1d2e-...")
    >>> await spans.close()
    """

    def __init__(
        self,
        path: str,
        *,
        max_spans: int = MAX_SPANS,
        max_bytes: int = MAX_BYTES,
        max_age: float = MAX_AGE,
        max_queued: int = MAX_QUEUED,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if min(max_spans, max_bytes, max_queued, max_queued_bytes) < 1 or not max_age > 0:
            raise ValueError("max_spans, max_bytes, max_queued, max_queued_bytes and max_age must be positive")
        self.max_spans, self.max_bytes, self.max_age = max_spans, max_bytes, max_age
        self.max_queued, self.max_queued_bytes = max_queued, max_queued_bytes
        self.clock = clock
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        self._db = _Database(path)
        self._reader = _connect(path)
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshgate-spans-read")
        self.received = 0
        self.unverified = 0  # spans received that claim a gateway hop their sender did not prove
        self.dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self._changed = threading.Condition()  # guards the counts and the queue
        self._pending: list[tuple[Sequence[SpanRow], int]] = []  # rows and their size (`row_size`)
        self._queued = 0
        self._queued_bytes = 0
        self._offered = 0
        self._written = 0
        self._closing = False
        self._writer = threading.Thread(target=self._write_forever, name="meshgate-spans-write", daemon=True)
        self._writer.start()

    @property
    def stored(self) -> int:
        return int(self._db.stored)

    @property
    def used_bytes(self) -> int:
        """The file's pages in use, as of the last write."""
        return int(self._db.used)

    def offer(self, rows: Sequence[SpanRow], invalid: int = 0, oversize: int = 0) -> int:
        """Queue `rows` for the writer; returns how many it took. `invalid` and `oversize` spans (see
        `otlp.Spans`) are counted, not stored."""
        sizes = list(itertools.accumulate(map(row_size, rows)))
        unverified = sum(row.unverified is not None for row in rows)
        with self._changed:
            taken = 0 if self._closing else max(0, min(len(rows), self.max_queued - self._queued))
            taken = bisect.bisect_right(sizes, self.max_queued_bytes - self._queued_bytes, hi=taken)
            if taken:
                self._pending.append((rows[:taken], sizes[taken - 1]))
                self._queued += taken
                self._queued_bytes += sizes[taken - 1]
                self._offered += taken
                self._changed.notify_all()
            self.received += len(rows) + invalid + oversize
            self.unverified += unverified
            self.dropped["invalid"] += invalid
            self.dropped["oversize"] += oversize
            self.dropped["queue"] += len(rows) - taken
        return taken

    def wait_written(self, timeout: float) -> bool:
        """Wait until every span offered before this call is written (or dropped); False after `timeout`."""
        with self._changed:
            target = self._offered
            return self._changed.wait_for(lambda: self._written >= target, timeout)

    def _write_forever(self) -> None:
        burst = 0  # bytes of rows written since memory was last given back
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing, PRUNE_INTERVAL)
                batches, self._pending = self._pending, []
                closing = self._closing
            rows = [row for batch, _ in batches for row in batch]
            size = sum(size for _, size in batches)
            del batches  # the rows go with this write: nothing holds a burst once it is on disk
            outcome = self._write(rows)
            count = len(rows)
            del rows
            with self._changed:
                self._queued -= count
                self._queued_bytes -= size
                self._written += count
                if outcome is None:
                    self.dropped["error"] += count
                else:
                    self.dropped.update(
                        duplicate=outcome.duplicate, age=outcome.age, count=outcome.over_limit, size=outcome.over_size
                    )
                self._changed.notify_all()
                idle = not self._pending
            burst += size
            if idle and burst >= TRIM_AFTER:  # a burst is over: give back what it took, not after every write
                self._db.release_memory()
                burst = 0
            if closing and not count:
                return

    def _write(self, rows: list[SpanRow]) -> Written | None:
        cutoff = int((self.clock() - self.max_age) * 1e9)
        try:
            return self._db.write(rows, cutoff, self.max_spans, self.max_bytes)
        except sqlite3.Error as err:  # disk full, file removed: count the loss and keep serving
            log.error("%s: %d spans not written: %s", self._db.path, len(rows), err)
            return None

    async def _read(self, call: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._reads, partial(call, *args))

    async def by_request(self, request_id: str, limit: int = 20) -> list[StoredSpan]:
        """Every span of the (at most `limit`) traces holding a span with this request ID."""
        return await self._read(self._by_request, request_id, limit)

    async def by_traces(self, trace_ids: Iterable[str]) -> list[StoredSpan]:
        return await self._read(self._by_traces, sorted(set(trace_ids)))

    async def recent(self, filters: TraceFilters) -> list[dict[str, Any]]:
        """Summaries of the most recent traces that pass `filters`, newest first."""
        return await self._read(self._recent, filters)

    async def examples(self, service: str, subset: str, since: float, limit: int = 3) -> list[dict[str, Any]]:
        """Request IDs of `service`'s `subset` answered by its owner's gateway since `since` (seconds since the
        epoch), failed ones first, then the slowest: what a rollout decision shows from the canary."""
        return await self._read(self._examples, service, subset, int(since * 1e9), limit)

    def _examples(self, service: str, subset: str, since_ns: int, limit: int) -> list[dict[str, Any]]:
        query = """
            SELECT request_id, trace_id, http_status, error, (end_ns - start_ns) / 1e6 FROM spans
            WHERE start_ns >= ? AND mesh_service = ? AND request_id IS NOT NULL AND unverified IS NULL
              AND json_extract(attributes, '$."meshgate.subset"') = ?
              AND json_extract(attributes, '$."meshgate.reporter"') = 'destination'
            ORDER BY error DESC, end_ns - start_ns DESC LIMIT ?
        """
        rows = self._reader.execute(query, (since_ns, service, subset, limit))
        return [
            {"request_id": request_id, "trace_id": trace_id, "status": status, "error": bool(error), "ms": ms}
            for request_id, trace_id, status, error, ms in rows
        ]

    def _by_request(self, request_id: str, limit: int) -> list[StoredSpan]:
        query = "SELECT DISTINCT trace_id FROM spans WHERE request_id = ? LIMIT ?"
        return self._by_traces([trace_id for (trace_id,) in self._reader.execute(query, (request_id, limit))])

    def _by_traces(self, trace_ids: list[str]) -> list[StoredSpan]:
        if not trace_ids:
            return []
        marks = ", ".join("?" * len(trace_ids))
        query = f"SELECT {_COLUMNS} FROM spans WHERE trace_id IN ({marks}) ORDER BY start_ns, span_id"
        rows = (SpanRow(*row) for row in self._reader.execute(query, trace_ids))
        return [StoredSpan(row, json.loads(row.attributes), json.loads(row.resource)) for row in rows]

    def _recent(self, filters: TraceFilters) -> list[dict[str, Any]]:
        where: list[str] = ["1"]
        params: list[object] = []
        if filters.service is not None:
            where.append("instr(services, ?)")
            params.append(_SEP + filters.service + _SEP)
        if filters.status == "error":
            where.append("errors > 0")
        elif filters.status is not None:
            where.append("http_status BETWEEN ? AND ?")
            params += _STATUS_RANGES[filters.status]
        if filters.min_duration_ms is not None:
            where.append("end_ns - start_ns >= ?")
            params.append(int(filters.min_duration_ms * 1e6))
        query = f"SELECT {_SUMMARY} FROM traces WHERE {' AND '.join(where)} ORDER BY start_ns DESC LIMIT ?"
        names = [name.strip() for name in _SUMMARY.split(",")]
        return [
            _summary(dict(zip(names, row, strict=True)))
            for row in self._reader.execute(query, (*params, filters.limit))
        ]

    async def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        await self._read(self._reader.close)
        self._reads.shutdown(wait=True)
        self._db.conn.close()


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "trace_id": row["trace_id"],
        "request_id": row["request_id"],
        "name": row["name"],
        "service": row["service"],
        "destination": row["mesh_service"],
        "start": row["start_ns"] / 1e9,
        "duration_ms": (row["end_ns"] - row["start_ns"]) / 1e6,
        "status": row["http_status"],
        "error": row["errors"] > 0,
        "spans": row["spans"],
    }


class SpanCollector(Collector):
    """The span store's counts as metrics, read at scrape time:
    `meshgate_dashboard_spans_received_total`, `meshgate_dashboard_spans_dropped_total{reason}`,
    `meshgate_dashboard_spans_unverified_total`, `meshgate_dashboard_spans_stored` and
    `meshgate_dashboard_spans_store_bytes`.

    >>> registry.register(SpanCollector(spans))
    """

    def __init__(self, spans: SpanStore) -> None:
        self.spans = spans

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily("meshgate_dashboard_spans_received", "Spans received at /v1/traces")
        received.add_metric([], self.spans.received)
        yield received
        dropped = CounterMetricFamily(
            "meshgate_dashboard_spans_dropped", "Spans received but not kept, or evicted, by reason", labels=["reason"]
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], self.spans.dropped[reason])
        yield dropped
        yield GaugeMetricFamily("meshgate_dashboard_spans_stored", "Spans in the span store", self.spans.stored)
        yield GaugeMetricFamily(
            "meshgate_dashboard_spans_store_bytes", "The span store file's pages in use", self.spans.used_bytes
        )
        unverified = CounterMetricFamily(
            "meshgate_dashboard_spans_unverified",
            "Spans received that claim a gateway hop their sender did not prove (shown, marked, never as hops)",
        )
        unverified.add_metric([], self.spans.unverified)
        yield unverified
