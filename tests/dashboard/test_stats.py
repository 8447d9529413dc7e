"""The golden-signal arithmetic of `dashboard.signals.history`,
on heartbeats built by hand with the gateway's own recorder.

Each heartbeat's `stats` is what a gateway sends: `gateway.telemetry.Metrics` records requests exactly as the hot
path does, and `gateway.control.stats_json` encodes the snapshot, so the only hand-made parts are the times.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from dashboard.signals.history import (
    BOUNDS,
    FINE_FRAMES,
    MAX_POINTS,
    RETENTION,
    Stats,
    Totals,
    histogram_quantile,
    parse_heartbeat,
)
from dashboard.store import open_store
from dashboard.store.model import GatewayRecord, Store
from gateway.control import stats_json
from gateway.telemetry import BUCKETS, Metrics

pytestmark = pytest.mark.anyio
EDGE = ("destination", "shop", "catalog", "v1", "default")


def heartbeat(
    metrics: Metrics,
    seen: float,
    *,
    started: float = 0.0,
    instance: str = "gw-catalog",
    group: str = "catalog",
    gauges: dict[tuple[str, tuple[str, ...]], float] | None = None,
    cpu: float = 0.0,
    rss: int = 0,
    loop_lag: float = 0.0,
) -> GatewayRecord:
    snapshot = {
        "series": {key: (dict(s.codes), list(s.buckets), s.sum) for key, s in metrics.series.items()},
        "counters": {},
        "gauges": gauges or {},
        "loop_lag": loop_lag,
        "cpu": cpu,
        "rss": rss,
    }
    data = {"instance": instance, "group": group, "started": started, "stats": stats_json(snapshot)}
    return GatewayRecord(instance, group, data, seen)


def record(metrics: Metrics, labels: tuple[str, str, str, str, str], code: int, seconds: float, n: int) -> None:
    series = metrics.series_for(labels)
    for _ in range(n):
        series.record(code, seconds)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(str(tmp_path / "data"))
    yield opened
    await opened.close()


def stats_at(store: Store, origin: float = 95.0, step: float = 5.0) -> Stats:
    return Stats(store, step=step, origin=origin)


def feed(stats: Stats, beats: Iterable[GatewayRecord], now: float, owners: dict[str, str] | None = None) -> None:
    stats.ingest(list(beats), now, owners or {"catalog": "catalog", "storefront": "shop"})


# histogram_quantile: Prometheus's interpolation


def test_quantile_interpolates_inside_the_bucket_where_the_rank_falls() -> None:
    bounds = (0.1, 0.2, 1.0, math.inf)
    buckets = [50, 20, 40, 10]  # cumulative 50, 70, 110, 120 (Prometheus's own histograms.test data)
    assert histogram_quantile(0.5, buckets, bounds) == pytest.approx(0.1 + 0.1 * (60 - 50) / 20)  # 0.15
    assert histogram_quantile(0.25, buckets, bounds) == pytest.approx(0.1 * 30 / 50)  # from 0 in the first bucket
    assert histogram_quantile(0.75, buckets, bounds) == pytest.approx(0.2 + 0.8 * (90 - 70) / 40)  # 0.6
    assert histogram_quantile(1.0, buckets, bounds) == 1.0  # in +Inf: the largest finite bound
    assert histogram_quantile(0.95, buckets, bounds) == 1.0  # rank 114 > 110
    assert histogram_quantile(0.5, [0, 0, 0, 0], bounds) is None
    assert histogram_quantile(0.5, [0, 10, 10], (1.0, 2.0, math.inf)) == 2.0  # rank 10 is exactly bucket 2's top
    with pytest.raises(ValueError):
        histogram_quantile(1.5, buckets, bounds)


def test_quantiles_of_real_recordings_fall_in_the_right_bucket() -> None:
    metrics = Metrics()
    record(metrics, EDGE, 200, 0.003, 90)  # (0.0025, 0.005]
    record(metrics, EDGE, 200, 0.07, 10)  # (0.05, 0.1]
    beat = parse_heartbeat(heartbeat(metrics, 1.0).data)
    assert beat is not None
    totals = Totals(tuple(beat.series[EDGE]), 10.0)
    assert totals.quantile_ms(0.5) == pytest.approx(2.5 + 2.5 * 50 / 90, abs=1e-3)  # ms, to the microsecond
    assert totals.quantile_ms(0.99) == pytest.approx(50 + 50 * 9 / 10, abs=1e-3)
    assert len(BOUNDS) == len(BUCKETS) + 1 and BOUNDS[-1] == math.inf


# Rates over windows


async def test_rates_over_windows_spread_each_increase_over_its_heartbeat_interval(store: Store) -> None:
    stats, metrics = stats_at(store), Metrics()
    record(metrics, EDGE, 200, 0.003, 7)  # counted before the dashboard watched: a baseline only
    feed(stats, [heartbeat(metrics, 100.0)], 100.0)
    record(metrics, EDGE, 200, 0.003, 50)
    feed(stats, [heartbeat(metrics, 110.0)], 110.0)
    record(metrics, EDGE, 500, 0.07, 100)
    feed(stats, [heartbeat(metrics, 120.0)], 120.0)

    whole = (await stats.traffic(20.0)).totals().summary()
    assert whole["requests"] == 150 and whole["rps"] == 7.5
    assert whole["errors"] == 100 and whole["error_rate"] == pytest.approx(100 / 150, abs=1e-5)
    last_ten = (await stats.traffic(10.0)).totals()
    assert last_ten.requests == pytest.approx(100) and last_ten.rps == pytest.approx(10.0)
    # 105..120: half of the first interval's 50 (spread evenly over 100..110) and all of the second's 100.
    fifteen = (await stats.traffic(15.0)).totals()
    assert fifteen.requests == pytest.approx(125) and fifteen.rps == pytest.approx(125 / 15)
    # Windows reaching before the history began are divided by the time actually covered (since 95).
    assert (await stats.traffic(300.0)).seconds == pytest.approx(25.0)


async def test_a_sample_without_a_new_heartbeat_counts_nothing_twice(store: Store) -> None:
    stats, metrics = stats_at(store), Metrics()
    feed(stats, [heartbeat(metrics, 100.0)], 100.0)
    record(metrics, EDGE, 200, 0.003, 40)
    beat = heartbeat(metrics, 104.0)
    for now in (104.0, 104.2, 104.4, 104.6):  # the sampler is faster than the heartbeats
        feed(stats, [beat], now)
    assert (await stats.traffic(60.0)).totals().requests == pytest.approx(40)


async def test_a_restart_counts_from_zero_and_a_decrease_is_a_reset(store: Store) -> None:
    stats, metrics = stats_at(store), Metrics()
    record(metrics, EDGE, 200, 0.003, 10)
    feed(stats, [heartbeat(metrics, 100.0, started=50.0)], 100.0)
    record(metrics, EDGE, 200, 0.003, 30)
    feed(stats, [heartbeat(metrics, 110.0, started=50.0)], 110.0)
    restarted = Metrics()  # the new process counts from 0: 12 is fewer than the 40 before, but all new
    record(restarted, EDGE, 200, 0.003, 12)
    feed(stats, [heartbeat(restarted, 120.0, started=115.0)], 120.0)
    assert (await stats.traffic(25.0)).totals().requests == pytest.approx(42)
    # Its 12 lie between its start and the heartbeat, none before.
    assert (await stats.traffic(5.0)).totals().requests == pytest.approx(12)
    # Without a new `started` (one worker of several restarted), a series that went down is a reset too.
    fewer = Metrics()
    record(fewer, EDGE, 200, 0.003, 5)
    feed(stats, [heartbeat(fewer, 130.0, started=115.0)], 130.0)
    assert (await stats.traffic(35.0)).totals().requests == pytest.approx(47)


async def test_a_gateway_started_while_watched_counts_from_its_first_heartbeat(store: Store) -> None:
    stats, metrics = stats_at(store, origin=95.0), Metrics()
    record(metrics, EDGE, 200, 0.003, 9)
    feed(stats, [heartbeat(metrics, 100.0, started=97.0)], 100.0)
    totals = (await stats.traffic(60.0)).totals()
    assert totals.requests == pytest.approx(9)
    assert totals.rps == pytest.approx(9 / 5)  # the history covers 95..100
    # Inside a frame the counts are taken as even: 2 s of the 5 s frame 95..100 hold 2/5 of them.
    assert (await stats.traffic(2.0)).totals().requests == pytest.approx(9 * 2 / 5)


async def test_errors_client_errors_and_denied_calls(store: Store) -> None:
    stats, metrics = stats_at(store), Metrics()
    feed(stats, [heartbeat(metrics, 100.0)], 100.0)
    record(metrics, EDGE, 200, 0.003, 88)
    record(metrics, EDGE, 503, 0.003, 2)
    record(metrics, EDGE, 404, 0.003, 3)
    record(metrics, EDGE, 403, 0.003, 4)  # the upstream said 403: a client error, not a denied call
    denied = ("destination", "web", "catalog", "", "")  # refused by authorization before routing: no subset
    record(metrics, denied, 403, 0.0001, 3)
    feed(stats, [heartbeat(metrics, 105.0)], 105.0)
    traffic = await stats.traffic(10.0)
    catalog = traffic.totals(lambda key: key[1] == "catalog").summary()
    assert catalog["requests"] == 100 and catalog["errors"] == 2 and catalog["error_rate"] == 0.02
    assert catalog["client_errors"] == 10 and catalog["denied"] == 3
    by_source = traffic.grouped(lambda key: key[0])
    assert by_source["web"].summary()["denied"] == 3 and by_source["shop"].summary()["denied"] == 0


async def test_each_call_is_counted_once_from_the_side_that_saw_it_all(store: Store) -> None:
    stats = stats_at(store)
    shop, catalog = Metrics(), Metrics()

    def beats(seen: float) -> list[GatewayRecord]:
        return [
            heartbeat(shop, seen, instance="gw-shop", group="shop"),
            heartbeat(catalog, seen, instance="gw-catalog", group="catalog"),
        ]

    feed(stats, beats(100.0), 100.0)
    # shop's app calls catalog (owned by catalog): the caller's hop says "source", the owner's "destination".
    record(shop, ("source", "shop", "catalog", "catalog", "catalog"), 200, 0.004, 20)
    record(catalog, ("destination", "shop", "catalog", "v1", "default"), 200, 0.003, 20)
    # shop's app calls storefront, which shop owns: its own gateway serves it, reporting only "source".
    record(shop, ("source", "shop", "storefront", "v1", "default"), 200, 0.002, 7)
    feed(stats, beats(105.0), 105.0)
    traffic = await stats.traffic(10.0)
    edges = {key: round(totals.requests, 6) for key, totals in traffic.grouped(lambda key: key[:2]).items()}
    assert edges == {("shop", "catalog"): 20, ("shop", "storefront"): 7}
    assert traffic.totals(lambda key: key[2] == "catalog").requests == 0  # the caller's synthetic subset: not counted


async def test_replicas_of_a_group_add_up(store: Store) -> None:
    stats = stats_at(store)
    first, second = Metrics(), Metrics()

    def beats(seen: float) -> list[GatewayRecord]:
        return [heartbeat(first, seen, instance="a"), heartbeat(second, seen + 0.5, instance="b")]

    feed(stats, beats(100.0), 101.0)
    record(first, EDGE, 200, 0.003, 10)
    record(second, EDGE, 200, 0.003, 15)
    feed(stats, beats(105.0), 106.0)
    assert (await stats.traffic(10.0)).totals().requests == pytest.approx(25)


# Points for charts, tiers and bounds


async def test_points_cover_the_window_and_add_up_to_its_totals(store: Store) -> None:
    stats, metrics = stats_at(store, origin=1000.0), Metrics()
    feed(stats, [heartbeat(metrics, 1000.0)], 1000.0)
    for second in range(1002, 1062, 2):
        record(metrics, EDGE, 200, 0.003, 4)  # 2 requests a second
        feed(stats, [heartbeat(metrics, float(second))], float(second))
    points = await stats.points(300.0, "catalog")
    assert len(points) == 60  # 300 s at 5 s frames
    assert [point.seconds for point in points[:48]] == [0.0] * 48  # before the history began: no data
    assert all(point.totals().rps is None for point in points[:48])
    with_data = points[-12:]
    assert sum(point.seconds for point in with_data) == pytest.approx(60.0)
    assert [point.totals().rps for point in with_data] == pytest.approx([2.0] * 12)
    assert sum(point.totals().requests for point in points) == pytest.approx(
        (await stats.traffic(300.0)).totals().requests
    )
    assert all(b.time - a.time == pytest.approx(5.0) for a, b in zip(points, points[1:], strict=False))
    assert points[-1].time == 1060.0
    assert await stats.points(300.0, "nothing-here") != [] and all(
        not point.counts for point in await stats.points(300.0, "nothing-here")
    )


async def test_a_late_heartbeat_is_spread_not_a_spike(store: Store) -> None:
    stats, metrics = stats_at(store, origin=0.0), Metrics()
    feed(stats, [heartbeat(metrics, 100.0)], 100.0)
    record(metrics, EDGE, 200, 0.003, 300)  # 30 s of traffic arrive in one heartbeat (the dashboard was away)
    feed(stats, [heartbeat(metrics, 130.0)], 130.0)
    rates = [point.totals().rps for point in await stats.points(30.0, "catalog")]
    assert rates == pytest.approx([10.0] * 6)


async def test_long_windows_use_minute_frames_and_agree_with_short_ones(store: Store) -> None:
    stats, metrics = stats_at(store, origin=6000.0, step=1.0), Metrics()
    feed(stats, [heartbeat(metrics, 6000.0)], 6000.0)
    for second in range(6010, 6910, 10):  # 15 minutes, 3 requests a second
        record(metrics, EDGE, 200, 0.003, 30)
        feed(stats, [heartbeat(metrics, float(second))], float(second))
    assert stats._tier(300.0) is stats.fine and stats._tier(3600.0) is stats.coarse
    hour = await stats.traffic(3600.0)
    assert hour.totals().requests == pytest.approx(900 * 3) and hour.totals().rps == pytest.approx(3.0)
    five = (await stats.traffic(300.0)).totals()
    assert five.rps == pytest.approx(3.0)
    points = await stats.points(3600.0, "catalog")
    assert len(points) == 60 and points[-1].totals().rps == pytest.approx(3.0)
    assert len(await stats.points(6 * 3600.0, "catalog")) <= MAX_POINTS


async def test_memory_is_bounded_by_frames_instances_and_series(store: Store) -> None:
    stats, metrics = stats_at(store, origin=0.0, step=1.0), Metrics()
    now = 0.0
    for second in range(1, 3 * FINE_FRAMES):
        record(metrics, EDGE, 200, 0.003, 1)
        now = float(second)
        feed(stats, [heartbeat(metrics, now)], now)
    assert len(stats.fine.frames) <= FINE_FRAMES
    assert min(stats.fine.frames) > now - FINE_FRAMES
    # A gateway silent for longer than the retention is forgotten, and its frames age out.
    feed(stats, [], now + RETENTION + 120)
    assert stats._instances == {}
    assert stats.fine.frames == {} and stats.coarse.frames == {}
    with pytest.raises(ValueError, match="keeps up to"):
        await stats.traffic(RETENTION + 1)


async def test_malformed_stats_are_left_out_not_fatal(store: Store) -> None:
    stats, metrics = stats_at(store), Metrics()
    feed(stats, [heartbeat(metrics, 100.0)], 100.0)
    record(metrics, EDGE, 200, 0.003, 5)
    good = heartbeat(metrics, 105.0)
    series: list[Any] = good.data["stats"]["series"]
    buckets = [0] * len(BOUNDS)
    series += [
        {"labels": ["destination", "x", "catalog", "v1", "r"], "codes": {"200": True}, "buckets": buckets},
        {"labels": ["destination", "x", "catalog", "v1", "r"], "codes": {"200": -4}, "buckets": buckets},
        {"labels": ["destination", "x", "catalog", "v1", "r"], "codes": {"200": 1}, "buckets": [1]},
        {"labels": ["destination", "x" * 300, "catalog", "v1", "r"], "codes": {"200": 1}, "buckets": buckets},
        {"labels": ["destination", "x", "catalog"], "codes": {"200": 1}, "buckets": buckets},
        {"labels": ["destination", "x", "catalog", "v1", "r"], "codes": {"2xx": 1}, "buckets": buckets},
        {"labels": ["destination", "x", "catalog", "v1", "r"], "codes": {"200": float("nan")}, "buckets": buckets},
        "not a series",
    ]
    good.data["stats"]["gauges"] = [["meshgate_inflight_requests", ["catalog"], "many"], "junk"]
    broken = GatewayRecord("other", "catalog", {"stats": "nope", "started": 0}, 105.0)
    feed(stats, [good, broken], 105.0)
    traffic = await stats.traffic(10.0)
    assert set(traffic.counts) == {("shop", "catalog", "v1")}
    assert traffic.totals().requests == pytest.approx(5)


# Gateways' own signals


async def test_gateway_saturation_traffic_and_cpu(store: Store) -> None:
    stats, metrics = stats_at(store), Metrics()
    gauges: dict[tuple[str, tuple[str, ...]], float] = {
        ("meshgate_inflight_requests", ("catalog",)): 3.0,
        ("meshgate_inflight_requests", ("search",)): 2.0,
        ("meshgate_pending_requests", ("catalog",)): 1.0,
        ("meshgate_upstream_connections_active", ("catalog",)): 4.0,
        ("meshgate_upstream_connections_idle", ("catalog",)): 6.0,
        ("meshgate_open_connections", ("inbound",)): 9.0,
    }
    feed(stats, [heartbeat(metrics, 100.0, cpu=10.0, rss=50_000_000, gauges=gauges)], 100.0)
    record(metrics, EDGE, 200, 0.003, 20)
    record(metrics, ("source", "catalog", "payments", "payments", "payments"), 200, 0.003, 5)
    feed(stats, [heartbeat(metrics, 110.0, cpu=15.0, rss=60_000_000, loop_lag=0.004, gauges=gauges)], 110.0)
    record_ = GatewayRecord("gw-catalog", "catalog", {}, 110.0)
    signals = await stats.gateway(record_, 30.0)
    assert signals.served.requests == pytest.approx(20) and signals.sent.requests == pytest.approx(5)
    latest = next(point for point in reversed(signals.points) if point.seconds > 0).summary()
    assert latest["inflight"] == 5 and latest["pending"] == 1
    assert latest["pool_active"] == 4 and latest["pool_idle"] == 6 and latest["connections"] == 9
    assert latest["loop_lag_ms"] == 4.0 and latest["rss"] == 60_000_000
    assert latest["cpu"] == pytest.approx(0.5)  # 5 s of CPU over 10 s: half a core
    unknown = await stats.gateway(GatewayRecord("nobody", "x", {}, 0.0), 30.0)
    assert unknown.served.requests == 0 and all(point.seconds == 0 for point in unknown.points)


async def test_the_sampler_reads_heartbeats_from_the_store(store: Store) -> None:
    clock = [1000.0]
    stats, metrics = Stats(store, step=0.2, clock=lambda: clock[0]), Metrics()
    mesh = {"groups": {"catalog": ["catalog"]}, "services": {"catalog": {"subsets": {"v1": {"endpoints": []}}}}}
    await store.commit(mesh, author="test", reason="seed", action="config.seed", target="mesh")
    await store.put_gateway(heartbeat(metrics, 1000.1, started=1000.0))
    clock[0] = 1000.2
    await stats.sample()
    record(metrics, EDGE, 200, 0.003, 12)
    await store.put_gateway(heartbeat(metrics, 1000.5, started=1000.0))
    clock[0] = 1000.6
    await stats.sample()
    traffic = await stats.traffic(60.0)
    assert traffic.totals(lambda key: key == ("shop", "catalog", "v1")).requests == pytest.approx(12)
    assert stats.version == 2
