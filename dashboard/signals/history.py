"""Golden signals from the gateways' heartbeats: `Stats` samples the store and keeps a bounded history of them.

Data flow. Every `step` seconds `Stats.sample()` reads `store.gateways(stats=True)` and `store.current()` (which
group owns which service). Reading the store, not only the heartbeats this process received, gives every dashboard
replica the whole mesh. A gateway's `stats` are cumulative since its process started; for each new heartbeat the
counters are differenced against the previous one's. A counter that went down, or a new `started`, is a restart: the
new value is the increase, as in Prometheus's rate(). The increase is spread evenly over the time between the two
heartbeats into frames of fixed width, so a late heartbeat does not make a spike.

What is kept, per (source, destination, subset): requests, failures, 4xx, denied calls (403 before routing: the
gateway's authorization refusal, which has no subset), the 17 latency buckets and the calls per gRPC status code (17).
A failure is a 5xx, or a gRPC call (HTTP 200) whose code is in its destination's `grpc.failure_codes` (the mesh's
service config, `gateway.rpc.DEFAULT_FAILURE_CODES` for a destination it does not define); the codes apply to each
heartbeat's increase as the mesh says when it is sampled, so changing them does not rewrite the past. Edges are
counted once: `reporter="destination"` series, plus `reporter="source"` series of a group calling a service it owns
itself (its gateway serves those directly, so no destination side records them). Per gateway instance: its own
traffic by reporter, CPU time, and its saturation gauges (in flight, pending, pool, connections, ejected, loop lag,
RSS).

Memory is bounded: `FINE_FRAMES` frames of `step` seconds (30 min at the default 5 s), then minute frames for
`RETENTION` (6 h); older frames are dropped. A frame holds, per active key, one array of 38 doubles (~370 bytes), and
idle keys cost nothing: with 100 busy (source, destination, subset) triples that is at most 720 × 100 × 370 B ≈ 27
MB. Gateways send at most `MAX_SERIES` series each; instances silent for `RETENTION` are forgotten.

Reading: `traffic(window)` sums a window into `Traffic` (counts per key), `points(window, destination)` cuts it
into at most `MAX_POINTS` `Point`s for charts, `gateway(instance, window)` gives `GatewaySignals`. `Totals` turns
counts into rps, error rate and quantiles (`histogram_quantile`, Prometheus's interpolation). `PrometheusSignals`
(dashboard/signals/prometheus.py) answers the same calls from PromQL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dashboard.errors import DashboardError
from dashboard.mesh import Mesh
from dashboard.store.model import GatewayRecord, Revision, Store, StoreError
from gateway import rpc
from gateway.config import ConfigError
from gateway.telemetry import BUCKETS

log = logging.getLogger("meshgate.signals")

BOUNDS: tuple[float, ...] = (*(float(bound) for bound in BUCKETS), math.inf)
REQUESTS, ERRORS, CLIENT_ERRORS, DENIED = range(4)
FIRST_BUCKET = 4
FIRST_GRPC = FIRST_BUCKET + len(BOUNDS)  # then the calls per gRPC status code, OK (0) to UNAUTHENTICATED (16)
WIDTH = FIRST_GRPC + len(rpc.NAMES)  # numbers per key and frame
GRPC_CODES = {str(code): code for code in range(len(rpc.NAMES))}  # the keys of a series' "grpc" counts
STEP = 5.0  # seconds between samples (the width of fine frames)
FINE_FRAMES = 360
COARSE_WIDTH = 60.0
RETENTION = 6 * 3600.0
MAX_SERIES = 4096  # per heartbeat; more are ignored
MAX_INSTANCES = 4096
MAX_POINTS = 120  # chart points per window
MAX_LABEL = 253
MAX_CACHED = 16  # windows answered since the last sample, kept until the next
SATURATION = ("inflight", "pending", "pool_active", "pool_idle", "connections", "ejected", "unhealthy")
GAUGES = {  # the summed saturation gauges, by their index in a saturation vector
    "meshgate_inflight_requests": 0,
    "meshgate_pending_requests": 1,
    "meshgate_upstream_connections_active": 2,
    "meshgate_upstream_connections_idle": 3,
    "meshgate_open_connections": 4,
    "meshgate_endpoints_ejected": 5,
    "meshgate_endpoints_unhealthy": 6,
}
LOOP_LAG, RSS = len(SATURATION), len(SATURATION) + 1  # after the summed gauges in a saturation vector

Key = tuple[str, str, str]  # (source, destination, subset)
Counts = Sequence[float]  # WIDTH numbers: REQUESTS, ERRORS, CLIENT_ERRORS, DENIED, per-bucket, per-gRPC-code counts
Failures = Callable[[str], frozenset[int]]  # a destination's failing gRPC codes


class SignalsError(DashboardError):
    """Signals cannot be read now (Prometheus down, or refusing a query). `str(err)` is one line."""

    status = 503
    headers = {"retry-after": "5"}


def histogram_quantile(q: float, buckets: Sequence[float], bounds: Sequence[float] = BOUNDS) -> float | None:
    """Prometheus's histogram_quantile over per-bucket (not cumulative) counts whose upper `bounds` end in +Inf.

    The rank q × total falls in some bucket; the answer interpolates linearly inside it (from 0 for the first
    bucket), and is the largest finite bound when the rank falls in +Inf. None when there are no observations.

    >>> histogram_quantile(0.5, [0, 10, 10], (1.0, 2.0, math.inf))
    2.0
    """
    if not 0 <= q <= 1:
        raise ValueError(f"a quantile is between 0 and 1, got {q}")
    cumulative = list(itertools.accumulate(max(0.0, count) for count in buckets))
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = q * total
    last = len(cumulative) - 1
    index = next((i for i in range(last) if cumulative[i] >= rank), last)
    if index == last:
        return bounds[-2]
    if index == 0 and bounds[0] <= 0:
        return bounds[0]
    below = cumulative[index - 1] if index else 0.0
    start = bounds[index - 1] if index else 0.0
    count = cumulative[index] - below
    if count <= 0:  # only for q = 0 with an empty first bucket (Prometheus: NaN)
        return start
    return start + (bounds[index] - start) * ((rank - below) / count)


def add_into(total: list[float], counts: Counts, weight: float = 1.0) -> None:
    for i, value in enumerate(counts):
        total[i] += value * weight


def summed(many: Iterable[Counts]) -> list[float]:
    total = [0.0] * WIDTH
    for counts in many:
        add_into(total, counts)
    return total


def count_value(value: float) -> float | int:
    """A count for JSON: an integer when it is one (spread fractions add up again over whole intervals)."""
    nearest = round(value)
    return int(nearest) if abs(value - nearest) < 1e-6 else round(value, 3)


@dataclass(frozen=True, slots=True)
class Totals:
    """Counts over `seconds` of data: the golden signals of whatever they were summed over.

    >>> Totals.of([counts], 300.0).summary()["rps"]
    """

    counts: tuple[float, ...]
    seconds: float

    @classmethod
    def of(cls, many: Iterable[Counts], seconds: float) -> Totals:
        return cls(tuple(summed(many)), seconds)

    @property
    def requests(self) -> float:
        return self.counts[REQUESTS]

    @property
    def rps(self) -> float | None:
        return self.counts[REQUESTS] / self.seconds if self.seconds > 0 else None

    @property
    def error_rate(self) -> float | None:
        return self.counts[ERRORS] / self.counts[REQUESTS] if self.counts[REQUESTS] > 0 else None

    def quantile_ms(self, q: float) -> float | None:
        seconds = histogram_quantile(q, self.counts[FIRST_BUCKET:FIRST_GRPC])
        return None if seconds is None else round(seconds * 1000, 3)

    def summary(self) -> dict[str, object]:
        rps, error_rate = self.rps, self.error_rate
        return {
            "requests": count_value(self.counts[REQUESTS]),
            "rps": None if rps is None else round(rps, 4),
            "error_rate": None if error_rate is None else round(error_rate, 5),
            "errors": count_value(self.counts[ERRORS]),
            "client_errors": count_value(self.counts[CLIENT_ERRORS]),
            "denied": count_value(self.counts[DENIED]),
            "p50_ms": self.quantile_ms(0.5),
            "p95_ms": self.quantile_ms(0.95),
            "p99_ms": self.quantile_ms(0.99),
        }

    def grpc_codes(self) -> dict[str, float | int]:
        """gRPC calls by status code name, the codes seen only: `{"OK": 1200, "UNAVAILABLE": 25}`."""
        calls = self.counts[FIRST_GRPC:]
        return {rpc.NAMES[code]: count_value(count) for code, count in enumerate(calls) if count_value(count)}


@dataclass(frozen=True, slots=True)
class Traffic:
    """A window's counts per (source, destination, subset); `seconds` of data lie behind them (at most `window`)."""

    window: float
    seconds: float
    counts: Mapping[Key, Counts]

    def totals(self, keep: Callable[[Key], bool] = lambda key: True) -> Totals:
        return Totals.of((counts for key, counts in self.counts.items() if keep(key)), self.seconds)

    def grouped(self, by: Callable[[Key], str | tuple[str, str]]) -> dict[Any, Totals]:
        groups: dict[Any, list[Counts]] = {}
        for key, counts in self.counts.items():
            groups.setdefault(by(key), []).append(counts)
        return {name: Totals.of(many, self.seconds) for name, many in groups.items()}


@dataclass(frozen=True, slots=True)
class Point:
    """One chart point: the counts per key of the interval ending at `time`, with `seconds` of data (0: none)."""

    time: float
    seconds: float
    counts: Mapping[Key, Counts]

    def totals(self, keep: Callable[[Key], bool] = lambda key: True) -> Totals:
        return Totals.of((counts for key, counts in self.counts.items() if keep(key)), self.seconds)


@dataclass(frozen=True, slots=True)
class SaturationPoint:
    """A gateway's saturation over the interval ending at `time`: the highest value of each gauge in it, CPU use in
    cores and the latest RSS; `seconds` of data (0: none)."""

    time: float
    seconds: float
    gauges: tuple[float, ...]  # SATURATION, then loop lag (s), then RSS (bytes)
    cpu: float | None

    def summary(self) -> dict[str, object]:
        if self.seconds <= 0:
            return {"t": round(self.time, 3), **dict.fromkeys((*SATURATION, "loop_lag_ms", "cpu", "rss"))}
        named = {name: count_value(self.gauges[i]) for i, name in enumerate(SATURATION)}
        cpu = None if self.cpu is None else round(self.cpu, 4)
        lag = round(self.gauges[LOOP_LAG] * 1000, 3)
        return {"t": round(self.time, 3), **named, "loop_lag_ms": lag, "cpu": cpu, "rss": int(self.gauges[RSS])}


@dataclass(frozen=True, slots=True)
class GatewaySignals:
    """One gateway's own signals over a window: what it served (reporter destination), what its apps sent through
    it (reporter source), and its saturation over time."""

    instance: str
    window: float
    served: Totals
    sent: Totals
    points: tuple[SaturationPoint, ...]


class Signals(Protocol):
    """Where golden signals come from: the embedded `Stats`, or `PrometheusSignals`.

    >>> traffic = await signals.traffic(300.0)
    >>> traffic.grouped(lambda key: key[1])["catalog"].summary()
    """

    step: float
    max_window: float

    async def run(self) -> None:
        """Collect until cancelled (the embedded history samples the store; Prometheus needs nothing)."""
        ...

    async def close(self) -> None: ...

    async def traffic(self, window: float) -> Traffic: ...

    async def points(self, window: float, destination: str) -> list[Point]:
        """Chart points over `window` for the keys whose destination is `destination`, oldest first."""
        ...

    async def gateway(self, record: GatewayRecord, window: float) -> GatewaySignals: ...


def owners_of(mesh: Mapping[str, Any]) -> dict[str, str]:
    """Service -> the group that owns it."""
    groups: Mapping[str, Sequence[str]] = mesh.get("groups") or {}
    return {service: group for group, services in groups.items() for service in services}


def counts_as_edge(reporter: str, source: str, destination: str, owners: Mapping[str, str]) -> bool:
    """Each call once: from the destination's side, or from the source's when its own gateway served it."""
    return reporter == "destination" or (reporter == "source" and owners.get(destination) == source)


@dataclass(frozen=True, slots=True)
class MeshRules:
    """What counting needs from a mesh version: the group owning each service (which side records an edge) and
    each service's failing gRPC codes.

    >>> rules = MeshRules.of(await store.current())
    >>> rules.failures("catalog")
    frozenset({2, 4, 7, 13, 14, 15})
    """

    version: int
    owners: Mapping[str, str]
    failure_codes: Mapping[str, frozenset[int]]

    @classmethod
    def of(cls, revision: Revision, last: MeshRules | None = None) -> MeshRules:
        """The rules of `revision`; `last` again when it is of the same version (parsing once per version)."""
        if last is not None and last.version == revision.version:
            return last
        try:
            services = Mesh.parse(revision.mesh, source="mesh").services
        except ConfigError:  # stored meshes were valid when written; a newer rule must not stop the signals
            services = ()
        codes = {service.name: service.grpc.failure_codes for service in services}
        return cls(revision.version, owners_of(revision.mesh), codes)

    def failures(self, destination: str) -> frozenset[int]:
        return self.failure_codes.get(destination, rpc.DEFAULT_FAILURE_CODES)


def default_failures(destination: str) -> frozenset[int]:
    return rpc.DEFAULT_FAILURE_CODES


def classify(code: int, subset: str, counts: list[float], count: float) -> None:
    counts[REQUESTS] += count
    if 500 <= code <= 599:
        counts[ERRORS] += count
    elif 400 <= code <= 499:
        counts[CLIENT_ERRORS] += count
        if code == 403 and subset == "":
            counts[DENIED] += count


def classify_grpc(code: int, failures: frozenset[int], counts: list[float], count: float) -> None:
    """A gRPC call's status code (already counted under its HTTP status by `classify`)."""
    counts[FIRST_GRPC + code] += count
    if code in failures:
        counts[ERRORS] += count


class _Tier:
    """Frames of `width` seconds, the newest `capacity` kept; a frame maps keys to arrays of numbers."""

    def __init__(self, width: float, capacity: int) -> None:
        self.width = width
        self.capacity = capacity
        self.frames: dict[int, dict[tuple[str, ...], array[float]]] = {}

    @property
    def span(self) -> float:
        """How far back this tier reaches, whole frames only."""
        return (self.capacity - 1) * self.width

    def add(self, key: tuple[str, ...], start: float, end: float, values: Sequence[float]) -> None:
        """Spread `values` evenly over [start, end]."""
        width = self.width
        last = self.index(end)
        if end <= start:
            self._into(last, key, values, 1.0)
            return
        for index in range(max(math.floor(start / width), last - self.capacity + 1), last + 1):
            overlap = min(end, (index + 1) * width) - max(start, index * width)
            if overlap > 0:
                self._into(index, key, values, overlap / (end - start))

    def _into(self, index: int, key: tuple[str, ...], values: Sequence[float], weight: float) -> None:
        frame = self.frames.setdefault(index, {})
        have = frame.get(key)
        if have is None:
            frame[key] = array("d", (value * weight for value in values))
        else:
            for i, value in enumerate(values):
                have[i] += value * weight

    def index(self, when: float) -> int:
        """The frame a moment belongs to; one on a boundary closes the frame before (which holds the time up to it)."""
        return math.ceil(when / self.width) - 1

    def set(self, key: tuple[str, ...], when: float, values: Sequence[float]) -> None:
        self.frames.setdefault(self.index(when), {})[key] = array("d", values)

    def prune(self, now: float) -> None:
        oldest = math.floor(now / self.width) - self.capacity + 1
        for index in [index for index in self.frames if index < oldest]:
            del self.frames[index]

    def extent(self, index: int, origin: float, horizon: float) -> float:
        """Seconds of frame `index` that hold data: history begins at `origin` and reaches `horizon`."""
        return max(0.0, min((index + 1) * self.width, horizon) - max(index * self.width, origin))


@dataclass(slots=True)
class _Instance:
    group: str
    seen: float
    started: object
    series: dict[tuple[str, ...], array[float]] = field(default_factory=dict)
    cpu: float = 0.0
    measured: bool = False  # has a baseline to difference against


@dataclass(frozen=True, slots=True)
class _Heartbeat:
    series: dict[tuple[str, ...], array[float]]  # (reporter, source, destination, subset, route) -> cumulative
    gauges: tuple[float, ...]
    cpu: float


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _series(item: object) -> tuple[tuple[str, ...], array[float]] | None:
    if not isinstance(item, dict):
        return None
    labels, codes, buckets = item.get("labels"), item.get("codes"), item.get("buckets")
    if not (isinstance(labels, list) and len(labels) == 5) or not isinstance(codes, dict):
        return None
    if not all(isinstance(label, str) and len(label) <= MAX_LABEL for label in labels):
        return None
    if not isinstance(buckets, list) or len(buckets) != len(BOUNDS):
        return None
    counts = [0.0] * WIDTH
    for code, count in codes.items():
        number = _number(count)
        if number is None or not (isinstance(code, str) and code.isdigit() and len(code) == 3):
            return None
        classify(int(code), labels[3], counts, number)
    for i, count in enumerate(buckets):
        number = _number(count)
        if number is None:
            return None
        counts[FIRST_BUCKET + i] = number
    grpc = item.get("grpc", {})
    if not isinstance(grpc, dict) or len(grpc) > len(GRPC_CODES):
        return None
    for key, count in grpc.items():
        number, code = _number(count), GRPC_CODES.get(key) if isinstance(key, str) else None
        if number is None or code is None:
            return None
        counts[FIRST_GRPC + code] = number  # failures are counted on increases (`Stats._record`), not totals
    return tuple(labels), array("d", counts)


def parse_heartbeat(data: Mapping[str, Any]) -> _Heartbeat | None:
    """The numbers of a heartbeat's `stats`, which come from the network: anything malformed is left out."""
    stats = data.get("stats")
    if not isinstance(stats, dict) or not isinstance(stats.get("series", []), list):
        return None
    series = dict(filter(None, map(_series, stats.get("series", [])[:MAX_SERIES])))
    gauges = [0.0] * (len(SATURATION) + 2)
    for entry in stats.get("gauges") or ():
        if isinstance(entry, list) and len(entry) == 3 and entry[0] in GAUGES:
            gauges[GAUGES[entry[0]]] += _number(entry[2]) or 0.0
    gauges[LOOP_LAG] = _number(stats.get("loop_lag")) or 0.0
    gauges[RSS] = _number(stats.get("rss")) or 0.0
    return _Heartbeat(series, tuple(gauges), _number(stats.get("cpu")) or 0.0)


class Stats:
    """The embedded golden-signal history, sampled from the store's heartbeats every `step` seconds.

    >>> stats = Stats(store, step=5.0)
    >>> spawn(stats.run())                               # the dashboard's server starts the sampler
    >>> traffic = await stats.traffic(300.0)             # the last 5 minutes
    >>> traffic.grouped(lambda key: key[1])["catalog"].summary()
    {'requests': 1500, 'rps': 5.0, 'error_rate': 0.002, ..., 'p99_ms': 48.1}

    `ingest(records, now, owners, failures)` is the whole arithmetic and does no I/O, so tests feed it heartbeats
    by hand.
    """

    def __init__(
        self, store: Store, step: float = STEP, origin: float | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        if not step > 0:
            raise ValueError(f"the sampling step must be positive, got {step}")
        self.store = store
        self.step = step
        self.clock = clock
        self.fine = _Tier(step, FINE_FRAMES)
        coarse = max(COARSE_WIDTH, step)
        self.coarse = _Tier(coarse, math.ceil(RETENTION / coarse) + 1)
        self.max_window = RETENTION
        self.origin = clock() if origin is None else origin  # history begins here
        self.horizon = self.origin  # and reaches here (the last sample)
        self.version = 0  # bumped by every sample, so answers can be cached until the next
        self._instances: dict[str, _Instance] = {}
        self._cache: dict[tuple[object, ...], object] = {}
        self._rules: MeshRules | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.step
            try:
                await self.sample()
            except StoreError as exc:  # the store comes back; the next sample differences across the gap
                log.warning("golden signals: cannot read the store: %s", exc)
            except Exception:  # a bug with one odd heartbeat must not freeze the history of the whole mesh
                log.exception("golden signals: sampling failed")
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def close(self) -> None:
        return None  # nothing held open

    async def sample(self) -> None:
        rules = self._rules = MeshRules.of(await self.store.current(), self._rules)
        records = await self.store.gateways(stats=True)
        self.ingest(records, self.clock(), rules.owners, rules.failures)

    def ingest(
        self,
        records: Iterable[GatewayRecord],
        now: float,
        owners: Mapping[str, str],
        failures: Failures = default_failures,
    ) -> None:
        for record in records:
            if now - record.seen <= RETENTION:
                self._ingest(record, owners, failures)
        self.horizon = max(self.horizon, now)
        for instance in [key for key, state in self._instances.items() if now - state.seen > RETENTION]:
            del self._instances[instance]
        self.fine.prune(self.horizon)
        self.coarse.prune(self.horizon)
        self.version += 1
        self._cache.clear()

    def _ingest(self, record: GatewayRecord, owners: Mapping[str, str], failures: Failures) -> None:
        state = self._instances.get(record.key)  # group and instance: one group cannot blend into another's
        if state is not None and record.seen <= state.seen:
            return  # no heartbeat since the last sample
        beat = parse_heartbeat(record.data)
        started = record.data.get("started")
        if state is None:
            if len(self._instances) >= MAX_INSTANCES:
                return
            state = self._instances[record.key] = _Instance(record.group, record.seen, started)
            since = _number(started)
            if beat is not None and since is not None and since >= self.origin:
                # Started while we watched: everything it counted is new.
                since = max(self.origin, min(since, record.seen))
                self._record(record, state, beat, {}, 0.0, since, owners, failures)
            elif beat is not None:  # counted before we watched: a baseline, as rate() needs two samples
                state.series, state.cpu, state.measured = beat.series, beat.cpu, True
            return
        if beat is None or not state.measured:
            state.seen, state.started = record.seen, started
            if beat is not None:
                state.series, state.cpu, state.measured = beat.series, beat.cpu, True
            return
        start = state.seen
        previous, cpu = state.series, state.cpu
        if started != state.started:  # a restart: counters begin again at 0
            previous, cpu = {}, 0.0
            if isinstance(started, int | float):
                start = min(max(started, state.seen), record.seen)
        self._record(record, state, beat, previous, cpu, start, owners, failures)

    def _record(
        self,
        record: GatewayRecord,
        state: _Instance,
        beat: _Heartbeat,
        previous: Mapping[tuple[str, ...], array[float]],
        cpu: float,
        start: float,
        owners: Mapping[str, str],
        failures: Failures,
    ) -> None:
        end = record.seen
        instance = record.key
        edges: dict[tuple[str, ...], list[float]] = {}
        own: dict[str, list[float]] = {}
        for labels, now in beat.series.items():
            before = previous.get(labels)
            if before is None or any(b > n for b, n in zip(before, now, strict=True)):
                delta = list(now)  # new, or reset since the last heartbeat
            else:
                delta = [n - b for n, b in zip(now, before, strict=True)]
            if not delta[REQUESTS]:
                continue
            reporter, source, destination, subset, _ = labels
            delta[ERRORS] += sum(delta[FIRST_GRPC + code] for code in failures(destination))
            add_into(own.setdefault(reporter, [0.0] * WIDTH), delta)
            if counts_as_edge(reporter, source, destination, owners):
                add_into(edges.setdefault(("edge", source, destination, subset), [0.0] * WIDTH), delta)
        used = beat.cpu - cpu if beat.cpu >= cpu else beat.cpu
        for tier in (self.fine, self.coarse):
            for key, counts in edges.items():
                tier.add(key, start, end, counts)
            for reporter, counts in own.items():
                tier.add(("own", instance, reporter), start, end, counts)
            tier.add(("cpu", instance), start, end, (used,))
            tier.set(("gauges", instance), end, beat.gauges)
        state.group, state.seen, state.started = record.group, end, record.data.get("started")
        state.series, state.cpu, state.measured = beat.series, beat.cpu, True

    # Reading

    def _tier(self, window: float) -> _Tier:
        if not 0 < window <= self.max_window:
            raise ValueError(f"window: the embedded history keeps up to {self.max_window:g}s, got {window:g}s")
        return self.fine if window <= self.fine.span else self.coarse

    async def traffic(self, window: float) -> Traffic:
        cached = self._cache.get(("traffic", window))
        if isinstance(cached, Traffic):
            return cached
        tier = self._tier(window)
        start = self.horizon - window
        totals: dict[Key, list[float]] = {}
        for index in range(math.floor(start / tier.width), tier.index(self.horizon) + 1):
            frame = tier.frames.get(index)
            extent = tier.extent(index, self.origin, self.horizon)
            if not frame or extent <= 0:
                continue
            inside = tier.extent(index, max(self.origin, start), self.horizon)
            for key, counts in frame.items():
                if key[0] == "edge":
                    add_into(totals.setdefault((key[1], key[2], key[3]), [0.0] * WIDTH), counts, inside / extent)
        seconds = max(0.0, self.horizon - max(start, self.origin))
        traffic = Traffic(window, seconds, totals)
        if len(self._cache) >= MAX_CACHED:  # windows are any number of seconds: keep the cache small
            self._cache.clear()
        self._cache[("traffic", window)] = traffic
        return traffic

    def _chunks(self, window: float) -> tuple[_Tier, list[tuple[float, float, range]]]:
        """The frames of `window` in runs of whole frames, newest last: (end time, seconds of data, indices)."""
        tier = self._tier(window)
        per_point = max(1, math.ceil(window / (tier.width * MAX_POINTS)))
        last = tier.index(self.horizon)
        first = last - math.ceil(window / tier.width) + 1
        chunks = []
        for end in range(last, first - 1, -per_point):
            indices = range(max(first, end - per_point + 1), end + 1)
            seconds = sum(tier.extent(index, self.origin, self.horizon) for index in indices)
            chunks.append((min((end + 1) * tier.width, self.horizon), seconds, indices))
        chunks.reverse()
        return tier, chunks

    async def points(self, window: float, destination: str) -> list[Point]:
        tier, chunks = self._chunks(window)
        points = []
        for end, seconds, indices in chunks:
            counts: dict[Key, list[float]] = {}
            for index in indices:
                for key, values in tier.frames.get(index, {}).items():
                    if key[0] == "edge" and key[2] == destination:
                        add_into(counts.setdefault((key[1], key[2], key[3]), [0.0] * WIDTH), values)
            points.append(Point(end, seconds, counts))
        return points

    async def gateway(self, record: GatewayRecord, window: float) -> GatewaySignals:
        tier, chunks = self._chunks(window)
        instance = record.key
        served, sent = [0.0] * WIDTH, [0.0] * WIDTH
        points = []
        for end, seconds, indices in chunks:
            gauges: list[float] | None = None
            used = 0.0
            for index in indices:
                frame = tier.frames.get(index, {})
                for reporter, total in (("destination", served), ("source", sent)):
                    if (counts := frame.get(("own", instance, reporter))) is not None:
                        add_into(total, counts)
                used += sum(frame.get(("cpu", instance), ()))
                if (values := frame.get(("gauges", instance))) is not None:
                    gauges = list(values) if gauges is None else [*map(max, gauges[:RSS], values[:RSS]), values[RSS]]
            cpu = used / seconds if seconds > 0 and gauges is not None else None
            point = SaturationPoint(end, seconds if gauges is not None else 0.0, tuple(gauges or ()), cpu)
            points.append(point)
        covered = sum(seconds for _, seconds, _ in chunks)
        return GatewaySignals(
            record.instance, window, Totals(tuple(served), covered), Totals(tuple(sent), covered), tuple(points)
        )
