"""`PrometheusSignals`: the golden signals of `history` read from Prometheus (`--prometheus URL`), which
scrapes the gateways' /metrics, so history reaches as far back as Prometheus keeps it.

Prometheus does the counter arithmetic (increase() and rate() handle resets and extrapolate), and answers per
(reporter, source, destination, subset) with `code` and `grpc_status`, or `le`; this module turns that into the same
`Traffic`, `Point` and `GatewaySignals` the embedded history gives, so quantiles come from the same
`histogram_quantile`, edges follow the same counting rule (`counts_as_edge`) and failures the same classification
(`classify`, `classify_grpc` with the destination's `grpc.failure_codes` from the current mesh). Charts use `rate()`
over Grafana's `$__rate_interval` (max(step + scrape interval, 4 × scrape interval)) times the step. Gateways are
found by Prometheus's `instance` label: the address of their metrics (or admin) listener, as the scrape config names
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from dashboard.signals.history import (
    BOUNDS,
    FIRST_BUCKET,
    GAUGES,
    GRPC_CODES,
    LOOP_LAG,
    MAX_POINTS,
    RSS,
    SATURATION,
    WIDTH,
    Failures,
    GatewaySignals,
    Key,
    MeshRules,
    Point,
    SaturationPoint,
    SignalsError,
    Totals,
    Traffic,
    classify,
    classify_grpc,
    counts_as_edge,
)
from dashboard.store.model import GatewayRecord, Store
from gateway.units import is_wildcard, parse_address

PROMETHEUS_QUERY_TIMEOUT = 5.0  # seconds for one Prometheus query
MAX_WINDOW = 31 * 86400.0
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._:\[\]-]{1,253}")
_BY = "reporter, source, destination, subset"
_CODES = "code, grpc_status"  # grpc_status is "" (no label) for requests that are not gRPC calls
_GAUGE_NAMES = {**GAUGES, "meshgate_event_loop_lag_seconds": LOOP_LAG, "meshgate_process_resident_memory_bytes": RSS}

Sample = tuple[dict[str, str], float]  # a series' labels and one value


def _matcher(name: str, value: str) -> str:
    if not _LABEL_VALUE.fullmatch(value):
        raise ValueError(f"{name}: not a label value meshgate sends: {value!r}")
    return f'{name}="{value}"'


def _regex(values: list[str]) -> str:
    """A PromQL string literal holding an RE2 alternation of `values` taken literally."""
    escaped = "|".join(re.escape(value).replace("\\", "\\\\") for value in values)
    return f'"{escaped}"'


def _bucket(le: str) -> int | None:
    try:
        bound = float(le)
    except ValueError:
        return None
    return next((i for i, known in enumerate(BOUNDS) if known == bound or math.isclose(known, bound)), None)


class _Builder:
    """Per-key counts from `code` samples and cumulative `le` samples (made monotonic, then per bucket)."""

    def __init__(self) -> None:
        self.counts: dict[Any, list[float]] = {}
        self.cumulative: dict[Any, list[float]] = {}

    def code(self, key: object, labels: Mapping[str, str], subset: str, value: float, failures: Failures) -> None:
        code = labels.get("code", "")
        if code.isdigit():
            counts = self.counts.setdefault(key, [0.0] * WIDTH)
            classify(int(code), subset, counts, value)
            if (grpc := GRPC_CODES.get(labels.get("grpc_status", ""))) is not None:
                classify_grpc(grpc, failures(labels.get("destination", "")), counts, value)

    def le(self, key: object, le: str, value: float) -> None:
        index = _bucket(le)
        if index is not None:
            self.cumulative.setdefault(key, [0.0] * len(BOUNDS))[index] += value

    def build(self) -> dict[Any, list[float]]:
        for key, cumulative in self.cumulative.items():
            counts = self.counts.setdefault(key, [0.0] * WIDTH)
            highest = 0.0
            for i, value in enumerate(cumulative):
                counts[FIRST_BUCKET + i] = max(0.0, value - highest)  # increase() can break monotony a little
                highest = max(highest, value)
        return self.counts


class PrometheusSignals:
    """Golden signals from Prometheus's HTTP API, behind the same interface as the embedded `Stats`.

    >>> signals = PrometheusSignals("http://prometheus:9090", store, scrape_interval=15.0)
    >>> traffic = await signals.traffic(86400.0)       # the last day, beyond the embedded 6 h
    >>> await signals.close()
    """

    def __init__(
        self,
        url: str,
        store: Store,
        scrape_interval: float = 15.0,
        timeout: float = PROMETHEUS_QUERY_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not scrape_interval > 0:
            raise ValueError(f"the scrape interval must be positive, got {scrape_interval}")
        self.url = url.rstrip("/")
        self.store = store
        self.scrape = scrape_interval
        self.step = scrape_interval
        self.max_window = MAX_WINDOW
        self.clock = clock
        self.timeout = timeout
        self.client: httpx.AsyncClient | None = None  # made on first use, on the loop that uses it
        self._rules: MeshRules | None = None

    async def run(self) -> None:
        """Prometheus collects, so there is nothing to sample; when cancelled (shutdown), close the client."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    async def _get(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        if self.client is None:
            self.client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout)
        try:
            answer = await self.client.get(path, params=params)
            body = answer.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise SignalsError(f"Prometheus at {self.url} cannot be used: {exc or type(exc).__name__}") from None
        if answer.status_code != 200 or not isinstance(body, dict) or body.get("status") != "success":
            reason = body.get("error") if isinstance(body, dict) else None
            raise SignalsError(f"Prometheus at {self.url} answered {answer.status_code}: {reason or answer.text[:200]}")
        result = body.get("data", {}).get("result", [])
        return result if isinstance(result, list) else []

    async def query(self, promql: str, at: float) -> list[Sample]:
        samples = []
        for series in await self._get("/api/v1/query", {"query": promql, "time": f"{at:.3f}"}):
            value = _value(series.get("value"))
            if value is not None:
                samples.append((series.get("metric", {}), value))
        return samples

    async def query_range(self, promql: str, start: float, end: float, step: float) -> dict[float, list[Sample]]:
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        by_time: dict[float, list[Sample]] = {}
        for series in await self._get("/api/v1/query_range", params):
            for pair in series.get("values", ()):
                value = _value(pair)
                if value is not None:
                    by_time.setdefault(float(pair[0]), []).append((series.get("metric", {}), value))
        return by_time

    async def _mesh_rules(self) -> MeshRules:
        self._rules = MeshRules.of(await self.store.current(), self._rules)
        return self._rules

    def _window(self, window: float) -> str:
        if not 0 < window <= self.max_window:
            raise ValueError(f"window: expected up to {self.max_window:g}s, got {window:g}s")
        return f"{max(1, round(window))}s"

    async def traffic(self, window: float) -> Traffic:
        span, at = self._window(window), self.clock()
        codes, buckets, rules = await asyncio.gather(
            self.query(f"sum by ({_BY}, {_CODES}) (increase(meshgate_requests_total[{span}]))", at),
            self.query(f"sum by ({_BY}, le) (increase(meshgate_request_duration_seconds_bucket[{span}]))", at),
            self._mesh_rules(),
        )
        return Traffic(window, window, _edges(codes, buckets, rules, 1.0))

    def _range(self, window: float) -> tuple[float, float, float, str]:
        """start, end, step and the rate() range of a chart over `window`, aligned to the step."""
        self._window(window)
        step = max(self.scrape, float(math.ceil(window / MAX_POINTS)))
        end = math.floor(self.clock() / step) * step
        rate_range = max(step + self.scrape, 4 * self.scrape)
        return end - window + step, end, step, f"{math.ceil(rate_range)}s"

    async def points(self, window: float, destination: str) -> list[Point]:
        start, end, step, span = self._range(window)
        where = _matcher("destination", destination)
        codes, buckets, rules = await asyncio.gather(
            self.query_range(
                f"sum by ({_BY}, {_CODES}) (rate(meshgate_requests_total{{{where}}}[{span}]))", start, end, step
            ),
            self.query_range(
                f"sum by ({_BY}, le) (rate(meshgate_request_duration_seconds_bucket{{{where}}}[{span}]))",
                start,
                end,
                step,
            ),
            self._mesh_rules(),
        )
        points = []
        for i in range(round((end - start) / step) + 1):
            t = start + i * step
            points.append(Point(t, step, _edges(_at(codes, t), _at(buckets, t), rules, step)))
        return points

    async def gateway(self, record: GatewayRecord, window: float) -> GatewaySignals:
        span = self._window(window)
        where = f"instance=~{_regex(_targets(record))}"
        start, end, step, rate_range = self._range(window)
        at = self.clock()
        names = "|".join(_GAUGE_NAMES)
        gauges, cpu, codes, buckets, rules = await asyncio.gather(
            self.query_range(f'sum by (__name__) ({{__name__=~"{names}", {where}}})', start, end, step),
            self.query_range(
                f"sum(rate(meshgate_process_cpu_seconds_total{{{where}}}[{rate_range}]))", start, end, step
            ),
            self.query(
                f"sum by (reporter, destination, {_CODES}) (increase(meshgate_requests_total{{{where}}}[{span}]))", at
            ),
            self.query(
                f"sum by (reporter, le) (increase(meshgate_request_duration_seconds_bucket{{{where}}}[{span}]))", at
            ),
            self._mesh_rules(),
        )
        builder = _Builder()
        for labels, value in codes:
            builder.code(labels.get("reporter"), labels, "-", value, rules.failures)
        for labels, value in buckets:
            builder.le(labels.get("reporter"), labels.get("le", ""), value)
        own = builder.build()
        points = []
        for i in range(round((end - start) / step) + 1):
            t = start + i * step
            values = [0.0] * (len(SATURATION) + 2)
            found = False
            for labels, value in _at(gauges, t):
                if (index := _GAUGE_NAMES.get(labels.get("__name__", ""))) is not None:
                    values[index], found = value, True
            used = _at(cpu, t)
            points.append(SaturationPoint(t, step if found else 0.0, tuple(values), used[0][1] if used else None))
        return GatewaySignals(
            record.instance,
            window,
            Totals(tuple(own.get("destination", [0.0] * WIDTH)), window),
            Totals(tuple(own.get("source", [0.0] * WIDTH)), window),
            tuple(points),
        )


def _value(pair: object) -> float | None:
    if not isinstance(pair, list) or len(pair) != 2:
        return None
    try:
        value = float(pair[1])
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _at(by_time: Mapping[float, list[Sample]], t: float) -> list[Sample]:
    return by_time.get(t) or next((samples for when, samples in by_time.items() if abs(when - t) < 1e-3), [])


def _edges(codes: list[Sample], buckets: list[Sample], rules: MeshRules, scale: float) -> dict[Key, list[float]]:
    """Counts per (source, destination, subset) from samples by reporter, counting each call once."""
    builder = _Builder()

    def key(labels: Mapping[str, str]) -> Key | None:
        reporter, source = labels.get("reporter", ""), labels.get("source", "")
        destination, subset = labels.get("destination", ""), labels.get("subset", "")
        return (source, destination, subset) if counts_as_edge(reporter, source, destination, rules.owners) else None

    for labels, value in codes:
        if (found := key(labels)) is not None:
            builder.code(found, labels, found[2], value * scale, rules.failures)
    for labels, value in buckets:
        if (found := key(labels)) is not None:
            builder.le(found, labels.get("le", ""), value * scale)
    return builder.build()


def _targets(record: GatewayRecord) -> list[str]:
    """The `instance` labels Prometheus may know this gateway by: its metrics and admin listeners' addresses (a
    wildcard host stands for the host it advertises to peers)."""
    listeners = record.data.get("listeners") or {}
    advertise = record.data.get("advertise")
    hosts = []
    if isinstance(advertise, str):
        with contextlib.suppress(ValueError):  # checked on arrival (api/heartbeats.py); an odd one costs a candidate
            hosts.append(parse_address(advertise).host)
    targets = []
    for kind in ("metrics", "admin"):
        text = listeners.get(kind) if isinstance(listeners, dict) else None
        if not isinstance(text, str):
            continue
        try:
            address = parse_address(text)
        except ValueError:
            continue
        for host in hosts if is_wildcard(address.host) else [address.host]:
            targets.append(f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}")
    if not targets:
        raise SignalsError(f"gateway {record.instance} reports no metrics or admin listener for Prometheus to scrape")
    return targets
