"""Golden signals and the proxy's own saturation, recorded cheaply and formatted only when scraped.

The hot path does one thing per request: `Series.record(code, seconds)` on the series of its
(reporter, source, destination, subset, route), a dict increment and a bucket increment (no locks: one event
loop per process). A retried request also leaves the code of its first attempt (`Series.retried`): counts by first
attempt are the final counts with those requests moved back, derived only when scraped (`first_attempts`), so the
faults that retries hid still show (a canary's, say). A request whose span is exported also leaves its trace and
request IDs as the exemplar of its latency bucket (`Series.exemplar`); the others pay nothing for exemplars.
Everything else is read from the runtime's own state when /metrics is scraped: requests in flight, pools, pending
requests, ejected and unhealthy endpoints, open connections. `snapshot()` turns all of it into plain data, which
is what a worker sends its supervisor; `merge()` adds snapshots up (keeping each bucket's latest exemplar), and
`SnapshotCollector` renders the sum through prometheus-client, as Prometheus text or, when negotiated, OpenMetrics
with the exemplars, so one scrape shows the whole gateway.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SERIES_LABELS = ("reporter", "source", "destination", "subset", "route")
Snapshot = dict[str, Any]
SeriesKey = tuple[str, str, str, str, str]
Code = int | tuple[int, int]  # the HTTP status, or (HTTP status, grpc-status) for a gRPC call
Exemplars = dict[int, tuple[bytes, bytes, float, float]]  # bucket -> (trace id, request id, seconds, when)
Moved = dict[tuple[Code, Code], int]  # (first attempt's code, final code) -> retried requests
EXEMPLAR_LABELS_LIMIT = 128  # OpenMetrics: label names and values of an exemplar, in characters; Prometheus enforces

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Series:
    """Counts and latency buckets of one (reporter, source, destination, subset, route), the latest exemplar of
    each bucket, and the retried requests whose first attempt ended otherwise than the request.

    >>> series = Series()
    >>> series.record(200, 0.004)
    >>> series.retried(503, 200)                # that request's first try answered 503
    >>> first_attempts(series.codes, series.moved)
    {503: 1}
    """

    __slots__ = ("codes", "buckets", "sum", "exemplars", "moved")

    def __init__(self) -> None:
        self.codes: dict[Code, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.exemplars: Exemplars = {}
        self.moved: Moved = {}  # (first attempt's code, final code) -> requests; only retried ones that differ

    def record(self, code: Code, seconds: float) -> None:
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def exemplar(self, seconds: float, trace_id: bytes, request_id: bytes, when: float) -> None:
        """Only for requests whose span is exported: the exemplar then leads to a trace that exists."""
        self.exemplars[bisect_left(BUCKETS, seconds)] = (trace_id, request_id, seconds, when)

    def retried(self, first: Code, final: Code) -> None:
        """Only for retried requests, beside `record(final, ...)`: the others' first attempt is their outcome."""
        if first != final:
            self.moved[(first, final)] = self.moved.get((first, final), 0) + 1


def first_attempts(codes: dict[Code, int], moved: Moved) -> dict[Code, int]:
    """Requests by the code of their first attempt: the final counts, with each retried request moved back to its
    first code. The total is the same."""
    if not moved:
        return codes
    first = dict(codes)
    for (first_code, final), count in moved.items():
        first[final] = first.get(final, 0) - count
        first[first_code] = first.get(first_code, 0) + count
    return {code: count for code, count in first.items() if count}


class Metrics:
    """One process's recordings. Labels are bounded: sources, destinations, subsets and routes come from the
    config and mesh identities, never from request data (an unmatched host is `unknown`)."""

    def __init__(self) -> None:
        self.series: dict[SeriesKey, Series] = {}
        self.counters: dict[tuple[str, str], float] = {}  # (metric name, destination) -> count
        self.loop_lag = 0.0

    def series_for(self, key: SeriesKey) -> Series:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series()
        return series

    def count(self, name: str, destination: str, amount: int = 1) -> None:
        key = (name, destination)
        self.counters[key] = self.counters.get(key, 0) + amount

    async def watch_loop_lag(self, interval: float = 0.25) -> None:
        """Event-loop lag: how late a sleep wakes up. A busy or blocked loop delays every request it holds."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag = max(0.0, loop.time() - before - interval)


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The whole gateway: counts, buckets, moved first attempts and gauges add up; event-loop lag is the worst
    worker's; each bucket's exemplar is the latest of any worker's."""
    total: Snapshot = {
        "series": {},
        "exemplars": {},
        "moved": {},
        "counters": {},
        "gauges": {},
        "loop_lag": 0.0,
        "cpu": 0.0,
        "rss": 0,
    }
    for part in snapshots:
        for key, exemplars in part.get("exemplars", {}).items():
            have = total["exemplars"].setdefault(key, {})
            for bucket, exemplar in exemplars.items():
                if bucket not in have or exemplar[3] > have[bucket][3]:
                    have[bucket] = exemplar
        for key, moved in part.get("moved", {}).items():
            adding = total["moved"].setdefault(key, {})
            for pair, count in moved.items():
                adding[pair] = adding.get(pair, 0) + count
        for key, (codes, buckets, seconds) in part["series"].items():
            have = total["series"].get(key)
            if have is None:
                total["series"][key] = (dict(codes), list(buckets), seconds)
                continue
            for code, count in codes.items():
                have[0][code] = have[0].get(code, 0) + count
            total["series"][key] = (have[0], [a + b for a, b in zip(have[1], buckets, strict=True)], have[2] + seconds)
        for kind in ("counters", "gauges"):
            for key, value in part[kind].items():
                total[kind][key] = total[kind].get(key, 0) + value
        total["loop_lag"] = max(total["loop_lag"], part["loop_lag"])
        total["cpu"] += part["cpu"]
        total["rss"] += part["rss"]
    return total


# Counters exported at 0 for every configured destination before their first event, so rate() sees the first one.
ZERO_BASED = (
    "meshgate_retries_total",
    "meshgate_retry_budget_exhausted_total",
    "meshgate_circuit_breaker_rejections_total",
)
_COUNTERS = {
    "meshgate_retries_total": "Retries sent",
    "meshgate_retry_budget_exhausted_total": "Retries not sent because the retry budget was spent",
    "meshgate_connect_failovers_total": "Tries moved to another endpoint after a connect failure (not retries)",
    "meshgate_circuit_breaker_rejections_total": "Requests refused by max_requests or max_pending (503)",
    "meshgate_outlier_ejections_total": "Endpoints ejected by passive outlier detection",
    "meshgate_spans_exported_total": "Spans sent to the OTLP endpoint",
    "meshgate_spans_dropped_total": "Sampled spans dropped because the exporter was behind or failing",
    "meshgate_access_log_dropped_total": "Access-log lines dropped because the output could not keep up",
}
_GAUGES = {
    "meshgate_inflight_requests": ("destination", "Requests in flight"),
    "meshgate_pending_requests": ("destination", "Requests waiting for an upstream connection"),
    "meshgate_upstream_connections_active": ("destination", "Upstream connections carrying a request"),
    "meshgate_upstream_connections_idle": ("destination", "Idle pooled upstream connections"),
    "meshgate_endpoints_ejected": ("destination", "Endpoints currently ejected as outliers"),
    "meshgate_endpoints_unhealthy": ("destination", "Endpoints failing active health checks"),
    "meshgate_open_connections": ("listener", "Open client connections"),
}


class SnapshotCollector(Collector):
    """Renders a merged snapshot for prometheus-client's exposition (text, or OpenMetrics when negotiated)."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        data = self.source()
        requests = CounterMetricFamily(
            "meshgate_requests", "Requests answered", labels=(*SERIES_LABELS, "code", "grpc_status")
        )
        first = CounterMetricFamily(
            "meshgate_request_first_attempts",
            "Requests answered, by the outcome of their first attempt (a retried one's, else the answer's)",
            labels=(*SERIES_LABELS, "code", "grpc_status"),
        )
        durations = HistogramMetricFamily(
            "meshgate_request_duration_seconds", "Time to answer a request", labels=SERIES_LABELS
        )
        exemplars, moved = data.get("exemplars", {}), data.get("moved", {})
        for key, (codes, buckets, seconds) in sorted(data["series"].items()):
            _add_codes(requests, key, codes)
            _add_codes(first, key, first_attempts(codes, moved.get(key, {})))
            durations.add_metric(key, _cumulative(buckets, exemplars.get(key, {})), seconds)
        yield requests
        yield first
        yield durations
        for name, help_text in _COUNTERS.items():
            family = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=("destination",))
            for (metric, destination), value in sorted(data["counters"].items()):
                if metric == name:
                    family.add_metric((destination,), value)
            yield family
        for name, (label, help_text) in _GAUGES.items():
            gauge = GaugeMetricFamily(name, help_text, labels=(label,))
            for (metric, labels), value in sorted(data["gauges"].items()):
                if metric == name:
                    gauge.add_metric(labels, value)
            yield gauge
        yield GaugeMetricFamily("meshgate_event_loop_lag_seconds", "Worst event-loop lag", data["loop_lag"])
        yield CounterMetricFamily("meshgate_process_cpu_seconds", "CPU time of the gateway processes", data["cpu"])
        yield GaugeMetricFamily("meshgate_process_resident_memory_bytes", "RSS of the gateway processes", data["rss"])


def _add_codes(family: CounterMetricFamily, key: SeriesKey, codes: dict[Code, int]) -> None:
    for code, count in sorted(codes.items(), key=_code_order):
        labels = (str(code), "") if isinstance(code, int) else (str(code[0]), str(code[1]))
        family.add_metric((*key, *labels), count)


def _code_order(item: tuple[Code, int]) -> tuple[int, int]:
    code = item[0]
    return (code, -1) if isinstance(code, int) else code


def _cumulative(buckets: list[int], exemplars: Exemplars) -> list[Any]:
    """(le, cumulative count[, exemplar]) per bucket, as HistogramMetricFamily takes them."""
    cumulative: list[Any] = []
    running = 0
    for index, (bound, count) in enumerate(zip((*BUCKETS, float("inf")), buckets, strict=True)):
        running += count
        found = exemplars.get(index)
        cumulative.append((_bound(bound), running) if found is None else (_bound(bound), running, _exemplar(*found)))
    return cumulative


def _exemplar(trace_id: bytes, request_id: bytes, seconds: float, when: float) -> Exemplar:
    labels = {"trace_id": trace_id.decode("latin-1"), "request_id": request_id.decode("latin-1")}
    if sum(len(name) + len(value) for name, value in labels.items()) > EXEMPLAR_LABELS_LIMIT:
        del labels["request_id"]  # a long client-given ID: the trace ID alone still leads to the trace
    return Exemplar(labels, seconds, when)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))
