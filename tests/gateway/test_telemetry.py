"""Unit tests of the golden-signal recording (`Series`, `Metrics`), exemplars, first attempts of retried requests,
`snapshot()`, `merge()` and the exposition through `SnapshotCollector`.

The rendered text is produced by prometheus-client's `generate_latest` (Prometheus text) or its OpenMetrics
`generate_latest` on a `CollectorRegistry`, and read back with the matching prometheus-client parser, as a scraper
would read it. No sockets, no event loop.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.runtime import snapshot
from gateway.telemetry import (
    BUCKETS,
    SERIES_LABELS,
    Code,
    Metrics,
    Moved,
    Series,
    Snapshot,
    SnapshotCollector,
    first_attempts,
    merge,
)

# DESIGN.md, Contracts.
CONTRACT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
INF = len(CONTRACT_BUCKETS)  # the index of the +Inf bucket in `Series.buckets`

HELLO = ("destination", "unknown", "hello", "v1", "default")
CANARY = ("destination", "shop", "hello", "v2", "canary-header")
OUTBOUND = ("source", "shop", "catalog", "v1", "default")


def test_buckets_are_the_contract() -> None:
    assert tuple(BUCKETS) == CONTRACT_BUCKETS
    assert SERIES_LABELS == ("reporter", "source", "destination", "subset", "route")
    assert len(Series().buckets) == len(CONTRACT_BUCKETS) + 1


def bucket_of(seconds: float) -> int:
    series = Series()
    series.record(200, seconds)
    placed = [i for i, count in enumerate(series.buckets) if count]
    assert len(placed) == 1, series.buckets
    return placed[0]


@pytest.mark.parametrize(("index", "bound"), list(enumerate(CONTRACT_BUCKETS)))
def test_record_places_a_value_equal_to_a_bound_in_that_bucket(index: int, bound: float) -> None:
    # Prometheus buckets are `le`: a value equal to the upper bound belongs to that bucket, not the next.
    assert bucket_of(bound) == index
    assert bucket_of(math.nextafter(bound, 0.0)) == index
    assert bucket_of(math.nextafter(bound, math.inf)) == index + 1


@pytest.mark.parametrize(
    ("seconds", "index"),
    [(0.0, 0), (0.00005, 0), (0.0003, 2), (0.05, 8), (0.0500001, 9), (10.0, INF - 1), (10.5, INF), (3600.0, INF)],
)
def test_record_places_values_between_bounds(seconds: float, index: int) -> None:
    assert bucket_of(seconds) == index


def test_record_counts_codes_and_sums_seconds() -> None:
    series = Series()
    for code, seconds in [(200, 0.001), (200, 0.002), (503, 0.25), (404, 0.0)]:
        series.record(code, seconds)
    assert series.codes == {200: 2, 503: 1, 404: 1}
    assert sum(series.buckets) == 4
    assert series.sum == pytest.approx(0.253)


def test_metrics_keeps_one_series_per_label_set_and_counts_by_destination() -> None:
    metrics = Metrics()
    first = metrics.series_for(HELLO)
    assert metrics.series_for(HELLO) is first
    assert metrics.series_for(CANARY) is not first
    assert set(metrics.series) == {HELLO, CANARY}
    metrics.count("meshgate_retries_total", "hello")
    metrics.count("meshgate_retries_total", "hello")
    metrics.count("meshgate_retries_total", "catalog")
    metrics.count("meshgate_retry_budget_exhausted_total", "hello")
    assert metrics.counters == {
        ("meshgate_retries_total", "hello"): 2,
        ("meshgate_retries_total", "catalog"): 1,
        ("meshgate_retry_budget_exhausted_total", "hello"): 1,
    }


# snapshot() and merge()


def part(
    series: dict[tuple[str, ...], tuple[dict[Code, int], list[int], float]],
    counters: dict[tuple[str, str], float] | None = None,
    gauges: dict[tuple[str, tuple[str, ...]], float] | None = None,
    loop_lag: float = 0.0,
    cpu: float = 0.0,
    rss: int = 0,
    exemplars: dict[tuple[str, ...], dict[int, tuple[bytes, bytes, float, float]]] | None = None,
    moved: dict[tuple[str, ...], Moved] | None = None,
) -> Snapshot:
    return {
        "series": series,
        "exemplars": exemplars or {},
        "moved": moved or {},
        "counters": counters or {},
        "gauges": gauges or {},
        "loop_lag": loop_lag,
        "cpu": cpu,
        "rss": rss,
    }


def buckets(**at: int) -> list[int]:
    """Per-bucket (not cumulative) counts: `buckets(b3=2, inf=1)`."""
    counts = [0] * (INF + 1)
    for name, count in at.items():
        counts[INF if name == "inf" else int(name[1:])] = count
    return counts


def test_merge_sums_series_counters_and_gauges_and_takes_the_worst_loop_lag() -> None:
    worker_a = part(
        {HELLO: ({200: 3, 503: 1}, buckets(b3=3, b9=1), 0.5), CANARY: ({200: 1}, buckets(b0=1), 0.0001)},
        counters={("meshgate_retries_total", "hello"): 2},
        gauges={("meshgate_inflight_requests", ("hello",)): 1, ("meshgate_open_connections", ("inbound",)): 2},
        loop_lag=0.002,
        cpu=1.5,
        rss=40_000_000,
    )
    worker_b = part(
        {HELLO: ({200: 2, 404: 1}, buckets(b3=1, b4=1, inf=1), 12.25), OUTBOUND: ({200: 5}, buckets(b5=5), 0.02)},
        counters={("meshgate_retries_total", "hello"): 1, ("meshgate_retry_budget_exhausted_total", "hello"): 4},
        gauges={("meshgate_inflight_requests", ("hello",)): 2, ("meshgate_open_connections", ("edge",)): 1},
        loop_lag=0.125,
        cpu=0.5,
        rss=30_000_000,
    )
    supervisor = part({}, gauges={("meshgate_open_connections", ("admin",)): 1}, loop_lag=0.001, cpu=0.25, rss=1000)
    inputs = [worker_a, worker_b, supervisor]
    before = copy.deepcopy(inputs)

    total = merge(inputs)

    assert total["series"] == {
        HELLO: ({200: 5, 503: 1, 404: 1}, buckets(b3=4, b4=1, b9=1, inf=1), pytest.approx(12.75)),
        CANARY: ({200: 1}, buckets(b0=1), 0.0001),
        OUTBOUND: ({200: 5}, buckets(b5=5), 0.02),
    }
    assert total["counters"] == {
        ("meshgate_retries_total", "hello"): 3,
        ("meshgate_retry_budget_exhausted_total", "hello"): 4,
    }
    assert total["gauges"] == {
        ("meshgate_inflight_requests", ("hello",)): 3,
        ("meshgate_open_connections", ("inbound",)): 2,
        ("meshgate_open_connections", ("edge",)): 1,
        ("meshgate_open_connections", ("admin",)): 1,
    }
    assert total["loop_lag"] == 0.125  # the worst worker's, not a sum
    assert total["cpu"] == pytest.approx(2.25)
    assert total["rss"] == 70_001_000
    # The supervisor merges the same worker snapshots at every scrape: merging must not touch them.
    assert inputs == before
    assert merge(inputs) == total


def test_merge_of_one_snapshot_is_that_snapshot_and_of_none_is_empty() -> None:
    one = part({HELLO: ({200: 1}, buckets(b2=1), 0.0003)}, counters={("meshgate_retries_total", "hello"): 1})
    assert merge([one]) == one
    assert merge([]) == part({})


def test_snapshot_copies_recordings_and_reads_runtime_state() -> None:
    metrics = Metrics()
    metrics.series_for(HELLO).record(200, 0.003)
    metrics.count("meshgate_retries_total", "hello")
    metrics.loop_lag = 0.01
    runtime = SimpleNamespace(
        metrics=metrics,
        table=None,  # no routes: no per-destination gauges
        endpoints={
            ("hello", "127.0.0.1:1"): SimpleNamespace(ejections=2),
            ("hello", "127.0.0.1:2"): SimpleNamespace(ejections=1),
        },
        connections=[SimpleNamespace(kind=kind) for kind in ("inbound", "inbound", "admin")],
        listener_kinds={"inbound", "outbound"},  # the data listeners this process serves
    )
    taken = snapshot(cast(Any, runtime))
    metrics.series_for(HELLO).record(500, 1.0)  # later traffic does not change a snapshot already taken
    metrics.count("meshgate_retries_total", "hello")

    assert taken["series"] == {HELLO: ({200: 1}, buckets(b5=1), 0.003)}
    assert taken["counters"] == {
        ("meshgate_retries_total", "hello"): 1,
        ("meshgate_outlier_ejections_total", "hello"): 3,  # summed over the service's endpoints
    }
    assert taken["gauges"] == {
        ("meshgate_open_connections", ("inbound",)): 2,
        ("meshgate_open_connections", ("outbound",)): 0,  # a quiet listener reads 0, not "no data"
        ("meshgate_open_connections", ("admin",)): 1,
    }
    assert taken["loop_lag"] == 0.01
    assert taken["cpu"] > 0
    assert taken["rss"] > 1_000_000  # this Python process's resident set, in bytes


# Exemplars

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_TRACE = b"0af7651916cd43dd8448eb211c80319c"
DURATIONS = "meshgate_request_duration_seconds"


def test_exemplar_goes_to_the_bucket_of_its_value_and_the_latest_wins() -> None:
    series = Series()
    series.exemplar(0.003, TRACE, b"req-1", 1_700_000_000.5)
    series.exemplar(0.004, OTHER_TRACE, b"req-2", 1_700_000_001.5)  # same bucket (le 0.005): replaces the first
    series.exemplar(0.0001, TRACE, b"req-3", 1_700_000_002.5)  # on a bound: that bound's bucket
    assert series.exemplars == {
        5: (OTHER_TRACE, b"req-2", 0.004, 1_700_000_001.5),
        0: (TRACE, b"req-3", 0.0001, 1_700_000_002.5),
    }
    assert series.buckets == [0] * (INF + 1), "an exemplar is not an observation: record() counts"


def test_snapshot_carries_exemplars_and_merge_keeps_the_latest_per_bucket() -> None:
    metrics = Metrics()
    metrics.series_for(HELLO).record(200, 0.003)
    metrics.series_for(CANARY).record(200, 0.003)  # no exemplar: absent from the snapshot's exemplars
    metrics.series_for(HELLO).exemplar(0.003, TRACE, b"req-a", 100.0)
    runtime = SimpleNamespace(metrics=metrics, table=None, endpoints={}, connections=[], listener_kinds=set())
    taken = snapshot(cast(Any, runtime))
    metrics.series_for(HELLO).exemplar(0.003, OTHER_TRACE, b"req-b", 101.0)  # later: not in the snapshot taken
    assert taken["exemplars"] == {HELLO: {5: (TRACE, b"req-a", 0.003, 100.0)}}

    older = part({}, exemplars={HELLO: {5: (OTHER_TRACE, b"req-old", 0.004, 99.0), 7: (TRACE, b"req-c", 0.02, 50.0)}})
    newer = part({}, exemplars={HELLO: {5: (TRACE, b"req-new", 0.002, 120.0)}, CANARY: {0: (TRACE, b"r", 0.0001, 1.0)}})
    total = merge([older, taken, newer])
    assert total["exemplars"] == {
        HELLO: {5: (TRACE, b"req-new", 0.002, 120.0), 7: (TRACE, b"req-c", 0.02, 50.0)},
        CANARY: {0: (TRACE, b"r", 0.0001, 1.0)},
    }
    assert merge([newer, older, taken]) == total, "the latest wins whatever the order of the workers"


def parse_openmetrics(text: str) -> list[Metric]:
    return list(openmetrics_families(text))  # type: ignore[no-untyped-call]


def openmetrics_exposition(data: Snapshot) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: data))
    text: bytes = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
    return text.decode()


def test_openmetrics_exposition_carries_exemplars_on_their_buckets() -> None:
    data = part(
        {HELLO: ({200: 3, 503: 1}, buckets(b3=2, b5=1, inf=1), 12.5), CANARY: ({200: 1}, buckets(b0=1), 0.0001)},
        exemplars={
            HELLO: {5: (TRACE, b"req-1", 0.004, 1_700_000_000.25), INF: (OTHER_TRACE, b"req-2", 12.0, 1_700_000_001.0)}
        },
    )
    text = openmetrics_exposition(data)
    assert text.endswith("# EOF\n")
    families = {family.name: family for family in parse_openmetrics(text)}
    histogram = families["meshgate_request_duration_seconds"]
    assert histogram.type == "histogram"
    with_exemplars = {
        s.labels["le"]: (s.exemplar.labels, s.exemplar.value, float(cast(Any, s.exemplar.timestamp)))
        for s in histogram.samples
        if s.exemplar is not None
    }
    assert with_exemplars == {
        "0.005": ({"trace_id": TRACE.decode(), "request_id": "req-1"}, 0.004, 1_700_000_000.25),
        "+Inf": ({"trace_id": OTHER_TRACE.decode(), "request_id": "req-2"}, 12.0, 1_700_000_001.0),
    }
    for sample in histogram.samples:
        if sample.exemplar is not None:
            assert sample.labels["destination"] == "hello" and sample.labels["subset"] == "v1"
    # The counts are those of the plain exposition.
    counts = {
        s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket") and s.labels["subset"] == "v1"
    }
    assert counts["0.001"] == 2 and counts["0.005"] == 3 and counts["+Inf"] == 4
    assert families["meshgate_requests"].type == "counter"


def test_exemplar_of_a_long_request_id_keeps_only_the_trace_id() -> None:
    """OpenMetrics caps an exemplar's label names and values at 128 characters (Prometheus refuses the scrape)."""
    long_id = b"r" * 100
    data = part({HELLO: ({200: 1}, buckets(b5=1), 0.004)}, exemplars={HELLO: {5: (TRACE, long_id, 0.004, 1.0)}})
    (histogram,) = [f for f in parse_openmetrics(openmetrics_exposition(data)) if f.name == DURATIONS]
    (exemplar,) = [s.exemplar for s in histogram.samples if s.exemplar is not None]
    assert exemplar.labels == {"trace_id": TRACE.decode()}


def test_plain_text_is_the_same_with_or_without_exemplars() -> None:
    plain = part({HELLO: ({200: 3}, buckets(b3=2, b5=1), 0.01)})
    with_exemplars = {**plain, "exemplars": {HELLO: {5: (TRACE, b"req-1", 0.004, 1.0)}}}
    assert exposition(with_exemplars) == exposition(plain)
    assert "trace_id" not in exposition(with_exemplars)


# SnapshotCollector


def exposition(data: Snapshot) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: data))
    return generate_latest(registry).decode()


def render(data: Snapshot) -> dict[str, list[Sample]]:
    """The samples of each family, as a scraper parses the exposition."""
    return {family.name: family.samples for family in text_string_to_metric_families(exposition(data))}


def family_types(data: Snapshot) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(exposition(data))}


def labelled(samples: list[Sample], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in samples if s.name == name}


def labels_of(key: tuple[str, ...], **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({**dict(zip(SERIES_LABELS, key, strict=True)), **extra}.items()))


def test_collector_renders_requests_and_cumulative_histogram_with_inf_count_and_sum() -> None:
    data = part(
        {
            HELLO: ({200: 4, 503: 1, (200, 14): 2}, buckets(b0=1, b3=2, b9=1, inf=1), 11.5),
            CANARY: ({404: 2}, buckets(b15=2), 20.0),
        }
    )
    families = render(data)

    assert labelled(families["meshgate_requests"], "meshgate_requests_total") == {
        labels_of(HELLO, code="200", grpc_status=""): 4,
        labels_of(HELLO, code="503", grpc_status=""): 1,
        labels_of(HELLO, code="200", grpc_status="14"): 2,  # a gRPC call: its code beside the HTTP status
        labels_of(CANARY, code="404", grpc_status=""): 2,
    }
    histogram = families["meshgate_request_duration_seconds"]
    bucket_samples = [s for s in histogram if s.name == "meshgate_request_duration_seconds_bucket"]
    for key, expected_cumulative, count, total in [
        (HELLO, [1, 1, 1, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5], 5, 11.5),
        (CANARY, [0] * 15 + [2, 2], 2, 20.0),
    ]:
        mine = [s for s in bucket_samples if labels_of(key, le=s.labels["le"]) == tuple(sorted(s.labels.items()))]
        bounds = [s.labels["le"] for s in mine]
        assert [float(b) for b in bounds[:-1]] == list(CONTRACT_BUCKETS), bounds  # in order, exactly these
        assert bounds[-1] == "+Inf"
        assert [s.value for s in mine] == expected_cumulative
        assert labelled(histogram, "meshgate_request_duration_seconds_count")[labels_of(key)] == count
        assert labelled(histogram, "meshgate_request_duration_seconds_sum")[labels_of(key)] == total
        assert mine[-1].value == count  # +Inf is the count


def test_collector_renders_counters_gauges_and_process_figures() -> None:
    data = part(
        {},
        counters={
            ("meshgate_retries_total", "hello"): 3,
            ("meshgate_retry_budget_exhausted_total", "hello"): 2,
            ("meshgate_circuit_breaker_rejections_total", "catalog"): 7,
            ("meshgate_outlier_ejections_total", "hello"): 1,
        },
        gauges={
            ("meshgate_inflight_requests", ("hello",)): 4,
            ("meshgate_endpoints_ejected", ("hello",)): 1,
            ("meshgate_open_connections", ("inbound",)): 5,
        },
        loop_lag=0.03,
        cpu=2.5,
        rss=50_000_000,
    )
    families = render(data)
    types = family_types(data)
    for name, destination, value in [
        ("meshgate_retries", "hello", 3),
        ("meshgate_retry_budget_exhausted", "hello", 2),
        ("meshgate_circuit_breaker_rejections", "catalog", 7),
        ("meshgate_outlier_ejections", "hello", 1),
    ]:
        assert types[name] == "counter", name
        assert labelled(families[name], f"{name}_total") == {(("destination", destination),): value}
    assert labelled(families["meshgate_inflight_requests"], "meshgate_inflight_requests") == {
        (("destination", "hello"),): 4
    }
    assert labelled(families["meshgate_endpoints_ejected"], "meshgate_endpoints_ejected") == {
        (("destination", "hello"),): 1
    }
    assert labelled(families["meshgate_open_connections"], "meshgate_open_connections") == {
        (("listener", "inbound"),): 5
    }
    assert types["meshgate_inflight_requests"] == "gauge"
    assert labelled(families["meshgate_event_loop_lag_seconds"], "meshgate_event_loop_lag_seconds") == {(): 0.03}
    assert labelled(families["meshgate_process_cpu_seconds"], "meshgate_process_cpu_seconds_total") == {(): 2.5}
    assert labelled(families["meshgate_process_resident_memory_bytes"], "meshgate_process_resident_memory_bytes") == {
        (): 50_000_000
    }
    assert types["meshgate_requests"] == "counter"
    assert types["meshgate_request_duration_seconds"] == "histogram"


# First attempts of retried requests (meshgate_request_first_attempts_total)

FIRST = "meshgate_request_first_attempts_total"


def test_a_retried_request_is_counted_under_its_first_attempt_and_the_total_stays() -> None:
    series = Series()
    for code in (200, 200, 200, 503, (200, 0)):
        series.record(code, 0.001)
    series.retried(503, 200)  # 503, retried, 200
    series.retried(504, 200)  # a per-try timeout, retried, 200
    series.retried(503, 503)  # retried and failed alike: nothing moves
    series.retried((200, 14), (200, 0))  # gRPC: UNAVAILABLE Trailers-Only, retried, OK
    assert series.codes == {200: 3, 503: 1, (200, 0): 1}, "retried() leaves the final counts alone"
    assert series.moved == {(503, 200): 1, (504, 200): 1, ((200, 14), (200, 0)): 1}
    first = first_attempts(series.codes, series.moved)
    assert first == {200: 1, 503: 2, 504: 1, (200, 14): 1}  # (200, 0) reached 0 and is left out
    assert sum(first.values()) == sum(series.codes.values())


def test_without_retries_first_attempts_are_the_final_counts() -> None:
    codes: dict[Code, int] = {200: 5, 404: 1}
    assert first_attempts(codes, {}) == codes
    # Moves that cancel out (one 503 -> 200, one 200 -> 503) leave the same counts.
    assert first_attempts({200: 1, 503: 1}, {(503, 200): 1, (200, 503): 1}) == {200: 1, 503: 1}


def test_snapshot_copies_moved_first_attempts_and_merge_sums_them() -> None:
    metrics = Metrics()
    metrics.series_for(HELLO).record(200, 0.003)
    metrics.series_for(HELLO).retried(503, 200)
    metrics.series_for(CANARY).record(200, 0.003)  # never retried: absent from "moved"
    runtime = SimpleNamespace(metrics=metrics, table=None, endpoints={}, connections=[], listener_kinds=set())
    taken = snapshot(cast(Any, runtime))
    metrics.series_for(HELLO).retried(503, 200)  # later: not in the snapshot taken
    assert taken["moved"] == {HELLO: {(503, 200): 1}}

    other = part({}, moved={HELLO: {(503, 200): 2, (504, 200): 1}, CANARY: {((200, 14), (200, 0)): 1}})
    inputs = [taken, other]
    before = copy.deepcopy(inputs)
    total = merge(inputs)
    assert total["moved"] == {HELLO: {(503, 200): 3, (504, 200): 1}, CANARY: {((200, 14), (200, 0)): 1}}
    assert inputs == before, "merging must not touch the workers' snapshots"
    # A snapshot from before the field existed (a worker of an older build) merges as one without retries.
    legacy = {key: value for key, value in part({HELLO: ({200: 1}, buckets(b5=1), 0.003)}).items() if key != "moved"}
    assert merge([legacy, other])["moved"] == other["moved"]


def test_collector_renders_first_attempts_for_every_series_with_the_same_totals() -> None:
    data = part(
        {
            HELLO: ({200: 4, 503: 1}, buckets(b3=5), 0.01),
            CANARY: ({404: 2}, buckets(b3=2), 0.01),  # never retried: still exposed, equal to its requests
            OUTBOUND: ({(200, 0): 3}, buckets(b3=3), 0.01),
        },
        moved={HELLO: {(503, 200): 2, (504, 200): 1}, OUTBOUND: {((200, 14), (200, 0)): 1}},
    )
    families = render(data)
    assert family_types(data)["meshgate_request_first_attempts"] == "counter"
    first = labelled(families["meshgate_request_first_attempts"], FIRST)
    assert first == {
        labels_of(HELLO, code="200", grpc_status=""): 1,
        labels_of(HELLO, code="503", grpc_status=""): 3,
        labels_of(HELLO, code="504", grpc_status=""): 1,
        labels_of(CANARY, code="404", grpc_status=""): 2,
        labels_of(OUTBOUND, code="200", grpc_status="0"): 2,
        labels_of(OUTBOUND, code="200", grpc_status="14"): 1,
    }
    requests = labelled(families["meshgate_requests"], "meshgate_requests_total")
    for key in (HELLO, CANARY, OUTBOUND):
        mine = dict(zip(SERIES_LABELS, key, strict=True)).items()
        assert sum(v for labels, v in first.items() if mine <= dict(labels).items()) == sum(
            v for labels, v in requests.items() if mine <= dict(labels).items()
        ), key
    # Sorted like meshgate_requests_total: by series, then by code.
    order = [(s.labels["source"], s.labels["code"], s.labels["grpc_status"]) for s in families[FIRST[:-6]]]
    assert order == [
        ("shop", "404", ""),  # CANARY
        ("unknown", "200", ""),  # HELLO
        ("unknown", "503", ""),
        ("unknown", "504", ""),
        ("shop", "200", "0"),  # OUTBOUND (reporter "source" sorts last)
        ("shop", "200", "14"),
    ]
