"""Unit tests of the canary judge (`dashboard.rollout.judge`) on hand-made ticks, and of `signals.Increments`, which
turns heartbeat records into the judge's strata (friendly and hostile records)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest

from dashboard.rollout.judge import (
    ARM,
    BOUNDS,
    FAILURES,
    FIRST_BUCKET,
    FIRST_FAILURES,
    HARM,
    HARM_WEIGHTS,
    REQUESTS,
    Criteria,
    Judge,
    Stratum,
    Tick,
    Verdict,
    replay,
)
from dashboard.rollout.signals import MAX_SERIES, MAX_STRATA, OTHER, Increments
from dashboard.store.model import GatewayRecord
from gateway import rpc

FIVE_MS = BOUNDS.index(0.005)


def arm(requests: int, failures: int = 0, first: int | None = None, slow: int = 0) -> tuple[int, ...]:
    """ARM counts: `slow` requests in the 10 ms bucket, the rest in the 2.5 ms one."""
    counts = [0] * ARM
    counts[REQUESTS], counts[FAILURES] = requests, failures
    counts[FIRST_FAILURES] = failures if first is None else first
    counts[FIRST_BUCKET + FIVE_MS - 1] = requests - slow
    counts[FIRST_BUCKET + FIVE_MS + 1] = slow
    return tuple(counts)


def tick(index: int, *strata: Stratum, fresh: bool = True) -> Tick:
    return Tick(2.0 * (index + 1), 2.0, strata, fresh)


def healthy(index: int) -> Tick:
    """Two calling groups, the canary at 10 %, half the requests slower than 5 ms, 1 % failing, in both arms."""
    return tick(
        index,
        Stratum("web", "default", arm(900, 9, 12, slow=450), arm(100, 1, 1, slow=50)),
        Stratum("api", "default", arm(450, 4, 4, slow=225), arm(50, 0, 1, slow=25)),
    )


# The judge.


def test_the_same_ticks_give_the_same_verdicts_and_replay_equals_updates() -> None:
    ticks = [healthy(i) for i in range(30)]
    first, second = Judge(Criteria()), Judge(Criteria())
    step_by_step = [first.update(t) for t in ticks]
    again = [second.update(t) for t in ticks]
    replayed = replay(Criteria(), ticks)
    dumps = [json.dumps(v.to_json(), sort_keys=True) for v in step_by_step]
    assert dumps == [json.dumps(v.to_json(), sort_keys=True) for v in again]
    assert dumps == [json.dumps(v.to_json(), sort_keys=True) for v in replayed]
    assert step_by_step == replayed
    assert len(set(dumps)) > 1  # the verdicts do change as evidence grows


def test_a_tick_survives_its_json_round_trip() -> None:
    original = tick(3, *healthy(0).strata, fresh=False)
    copy = Tick.from_json(json.loads(json.dumps(original.to_json())))
    assert copy == original
    assert replay(Criteria(), [copy]) == replay(Criteria(), [original])
    assert Tick.from_json({k: v for k, v in original.to_json().items() if k != "fresh"}).fresh is True


def _mixed(index: int) -> list[Stratum]:
    """Route "search" fails 10 % of requests and "home" none, in both arms; the canary gets mostly "search"."""
    return [
        Stratum("web", "search", arm(100, 10), arm(80, 8)),
        Stratum("web", "home", arm(900, 0), arm(20, 0)),
    ]


def test_a_canary_with_more_of_a_failing_route_is_compared_route_by_route() -> None:
    criteria = Criteria(latency=False)
    stratified = replay(criteria, [tick(i, *_mixed(i)) for i in range(50)])
    assert all(verdict.outcome != "harm" for verdict in stratified)
    assert stratified[-1].findings[0].estimate is not None
    assert stratified[-1].findings[0].estimate[0] == 1.0  # the same odds in each route
    pooled = []
    for i in range(50):
        strata = _mixed(i)
        total_p = tuple(sum(s.primary[k] for s in strata) for k in range(ARM))
        total_c = tuple(sum(s.canary[k] for s in strata) for k in range(ARM))
        pooled.append(tick(i, Stratum("web", "all", total_p, total_c)))
    # Pooled, the canary fails 8 % against the primary's 1 %: the same requests would roll it back.
    assert any(verdict.outcome == "harm" for verdict in replay(criteria, pooled))


def test_a_stale_tick_holds_a_canary_that_would_pass() -> None:
    judge = Judge(Criteria())
    verdicts = [judge.update(healthy(i)) for i in range(200)]
    assert verdicts[-1].outcome == "pass", verdicts[-1].sentence
    stale = judge.update(tick(200, *healthy(200).strata, fresh=False))
    assert (stale.outcome, stale.stale) == ("hold", True)
    assert "no fresh signals" in stale.sentence
    assert judge.update(healthy(201)).outcome == "pass"


def test_a_hold_says_how_many_requests_and_how_long() -> None:
    judge = Judge(Criteria())
    verdict = judge.update(healthy(0))
    verdict = judge.update(healthy(1))
    assert verdict.outcome == "hold"
    assert verdict.needs is not None and verdict.canary_rate == 75.0  # 150 canary requests every 2 s
    found = re.search(
        r"needs ≈ ([\d,]+) more canary requests \(≈ (\d+) (s|min) at the current rate\)", verdict.sentence
    )
    assert found is not None, verdict.sentence
    assert int(found[1].replace(",", "")) == verdict.needs
    seconds = int(found[2]) * (60 if found[3] == "min" else 1)
    assert abs(seconds - verdict.needs / 75.0) <= (30 if found[3] == "min" else 1)


def test_a_hold_without_a_rate_asks_for_more_traffic() -> None:
    verdict = Judge(Criteria()).update(tick(0))
    assert verdict.outcome == "hold" and verdict.needs is None
    assert "needs more canary traffic" in verdict.sentence


def _both(index: int, failures: int, slow: int) -> Tick:
    """The canary just like the primary: `failures` and `slow` of every 100 requests, in both arms."""
    return tick(index, Stratum("web", "default", arm(900, 9 * failures, slow=9 * slow), arm(100, failures, slow=slow)))


def _limit_finding(verdict: Verdict, name: str) -> str:
    return next(finding.what for finding in verdict.findings if finding.name == name)


def test_a_canary_over_the_error_limit_is_rolled_back_even_like_the_primary() -> None:
    criteria = Criteria(max_error_rate=0.01)
    verdicts = replay(criteria, [_both(i, 5, 50) for i in range(100)])
    assert verdicts[-1].outcome == "harm"
    assert "limit 1 %" in verdicts[-1].sentence
    assert "failures" in _limit_finding(verdicts[-1], "max_error_rate")
    within = replay(criteria, [_both(i, 0, 50) for i in range(100)])
    assert all(verdict.outcome != "harm" for verdict in within)
    assert within[-1].outcome == "pass"  # a limit never holds a canary for lack of data


def test_a_canary_over_the_p99_limit_is_rolled_back_even_like_the_primary() -> None:
    criteria = Criteria(max_p99_ms=4)  # 4 ms rounds up to the 5 ms bucket bound; `slow` is the 10 ms bucket
    assert all(verdict.outcome != "harm" for verdict in replay(criteria, [_both(i, 0, 0) for i in range(100)]))
    verdicts = replay(criteria, [_both(i, 0, 5) for i in range(100)])
    assert verdicts[-1].outcome == "harm"
    what = _limit_finding(verdicts[-1], "max_p99_ms")
    assert "slower than 5 ms" in what and "4 ms" in what, what


def test_the_estimate_and_the_evidence_match_a_hand_computation_for_one_table() -> None:
    a, b, c, d = 10, 90, 20, 880  # canary bad, good; primary bad, good
    verdict = Judge(Criteria(latency=False)).update(tick(0, Stratum("web", "default", arm(c + d, c), arm(a + b, a))))
    errors = verdict.findings[0]
    assert errors.name == "errors" and errors.estimate is not None
    ratio = a * d / (b * c)  # 4.888...
    half = 1.959964 * math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)  # Woolf's interval, which RBG equals for one table
    assert errors.estimate == pytest.approx((ratio, ratio * math.exp(-half), ratio * math.exp(half)), rel=1e-9)
    pi, m = (a + b) / (a + b + c + d), a + c
    by_hand = 0.0
    for weight, psi in zip(HARM_WEIGHTS, HARM, strict=True):
        q = pi * psi / (pi * psi + 1 - pi)
        by_hand += weight * (q / pi) ** a * ((1 - q) / (1 - pi)) ** (m - a)
    assert math.isclose(errors.harm, by_hand, rel_tol=1e-9)
    assert math.isclose(verdict.evidence, by_hand, rel_tol=1e-9)  # errors and first attempts, equal weights


# signals.Increments.

SERVICE, OWNER = "catalog", "shop"


def item(
    source: str = "web", subset: str = "v1", route: str = "default", ok: int = 0, failed: int = 0, **extra: object
) -> dict[str, object]:
    buckets = [0] * (len(BOUNDS) + 1)
    buckets[2] = ok + failed
    return {
        "labels": ["destination", source, SERVICE, subset, route],
        "codes": {"200": ok, "503": failed},
        "buckets": buckets,
        **extra,
    }


def record(series: object, seen: float, started: float = 1.0, instance: str = "a", group: str = OWNER) -> GatewayRecord:
    return GatewayRecord(instance, group, {"started": started, "stats": {"series": series}}, seen)


def increments() -> Increments:
    return Increments(SERVICE, OWNER, ("v1", "v2"), rpc.DEFAULT_FAILURE_CODES)


def counts(stratum: Stratum, arm_name: str) -> tuple[int, int, int]:
    values = stratum.canary if arm_name == "canary" else stratum.primary
    return values[REQUESTS], values[FAILURES], values[FIRST_FAILURES]


def test_the_first_heartbeat_is_a_baseline_and_later_ones_are_differenced() -> None:
    reader = increments()
    assert reader.take([record([item(ok=100, failed=5), item(subset="v2", ok=10)], seen=10)]) == []
    assert reader.take([record([item(ok=100, failed=5), item(subset="v2", ok=10)], seen=10)]) == []  # not newer
    strata = reader.take([record([item(ok=150, failed=6), item(subset="v2", ok=14, failed=2)], seen=12)])
    assert [(s.source, s.route) for s in strata] == [("web", "default")]
    assert counts(strata[0], "primary") == (51, 1, 1)
    assert counts(strata[0], "canary") == (6, 2, 2)
    assert strata[0].canary[FIRST_BUCKET + 2] == 6
    assert reader.newest == 12


def test_a_counter_reset_counts_the_new_value() -> None:
    reader = increments()
    reader.take([record([item(ok=100), item(subset="v2", ok=10)], seen=10)])
    went_down = reader.take([record([item(ok=30), item(subset="v2", ok=12)], seen=12)])
    assert counts(went_down[0], "primary") == (30, 0, 0)  # restarted without a new `started`
    assert counts(went_down[0], "canary") == (2, 0, 0)
    restarted = reader.take([record([item(ok=40), item(subset="v2", ok=20)], seen=14, started=13.5)])
    assert counts(restarted[0], "primary") == (40, 0, 0)  # higher than before, but a new `started`
    assert counts(restarted[0], "canary") == (20, 0, 0)


def test_first_attempts_and_grpc_codes_are_read() -> None:
    reader = increments()
    before = [
        item(ok=0, first={"200": 0}),
        item(route="rpc", ok=0, grpc={}, first_grpc={}),
        item(subset="v2", ok=0, first={"200": 0}),
    ]
    reader.take([record(before, seen=10)])
    grpc = {"0": 90, "14": 3, "5": 7}  # UNAVAILABLE fails; NOT_FOUND is an answer
    after = [
        item(ok=97, failed=3, first={"200": 90, "503": 10}),
        item(route="rpc", ok=100, grpc=grpc, first_grpc={"0": 80, "14": 13, "4": 7}),
        item(subset="v2", ok=50, first={"200": 45, "502": 5}),
    ]
    strata = {s.route: s for s in reader.take([record(after, seen=12)])}
    assert counts(strata["default"], "primary") == (100, 3, 10)
    assert counts(strata["default"], "canary") == (50, 0, 5)
    assert counts(strata["rpc"], "primary") == (100, 3, 20)  # DEADLINE_EXCEEDED (4) is a failure code too
    assert 5 not in rpc.DEFAULT_FAILURE_CODES and {4, 14} <= rpc.DEFAULT_FAILURE_CODES


HOSTILE: dict[str, dict[str, object]] = {
    "string count": {"codes": {"200": "12"}},
    "negative count": {"codes": {"200": -5}},
    "NaN count": {"codes": {"200": math.nan}},
    "infinite count": {"codes": {"200": math.inf}},
    "huge count": {"codes": {"200": 1e300}},
    "boolean count": {"codes": {"200": True}},
    "non-digit code": {"codes": {"2xx": 3}},
    "long code": {"codes": {"2000": 3}},
    "many codes": {"codes": {str(code): 1 for code in range(100, 200)}},
    "codes a list": {"codes": [200, 3]},
    "short buckets": {"buckets": [0] * len(BOUNDS)},
    "long buckets": {"buckets": [0] * (len(BOUNDS) + 2)},
    "huge buckets": {"buckets": [1] * 100_000},
    "string bucket": {"buckets": ["1"] * (len(BOUNDS) + 1)},
    "negative bucket": {"buckets": [-1] * (len(BOUNDS) + 1)},
    "bad first": {"first": {"200": "many"}},
    "bad grpc": {"grpc": {"14": -1}},
    "grpc code too long": {"grpc": {"140": 1}},
    "bad first_grpc": {"first_grpc": None},
    "labels short": {"labels": ["destination", "web", SERVICE, "v1"]},
    "labels not strings": {"labels": ["destination", 1, SERVICE, "v1", "x"]},
    "label too long": {"labels": ["destination", "w" * 300, SERVICE, "v1", "x"]},
}


def test_malformed_series_items_are_left_out() -> None:
    reader = increments()

    def series(scale: int) -> list[object]:
        good = [item(ok=10 * scale), item(subset="v2", ok=scale)]
        hostile: list[object] = ["not a dict", None, 7, [1, 2]]
        for index, override in enumerate(HOSTILE.values()):
            hostile.append({**item(route=f"bad{index}", ok=10 * scale), **override})
        return [*hostile, *good]

    assert reader.take([record(series(1), seen=10)]) == []
    strata = reader.take([record(series(2), seen=12)])
    assert [(s.source, s.route) for s in strata] == [("web", "default")]
    assert counts(strata[0], "primary") == (10, 0, 0)
    assert counts(strata[0], "canary") == (1, 0, 0)


NOT_SERIES: list[dict[str, Any]] = [{}, {"stats": []}, {"stats": {"series": {"a": 1}}}, {"stats": {"series": "x"}}]


@pytest.mark.parametrize("data", NOT_SERIES, ids=["no stats", "stats a list", "series a dict", "series a string"])
def test_a_heartbeat_without_a_series_list_counts_nothing(data: dict[str, Any]) -> None:
    reader = increments()
    reader.take([GatewayRecord("a", OWNER, {"started": 1.0, **data}, 10.0)])
    assert reader.take([GatewayRecord("a", OWNER, {"started": 1.0, **data}, 11.0)]) == []
    assert reader.take([record([item(ok=10), item(subset="v2", ok=1)], seen=12)]) != []  # the first real counts


# A heartbeat whose series are missing or malformed must not leave `Increments` without their counts: the next good
# heartbeat would then count their whole cumulative totals again.


@pytest.mark.parametrize("gap", [{"started": 1.0}, {"started": 1.0, "stats": {"series": "x"}}], ids=["no stats", "bad"])
def test_a_heartbeat_without_series_does_not_make_the_next_one_count_twice(gap: dict[str, Any]) -> None:
    reader = increments()
    reader.take([record([item(ok=100), item(subset="v2", ok=10)], seen=10)])
    reader.take([GatewayRecord("a", OWNER, gap, 11.0)])
    strata = reader.take([record([item(ok=110), item(subset="v2", ok=11)], seen=12)])
    assert [(counts(s, "primary"), counts(s, "canary")) for s in strata] == [((10, 0, 0), (1, 0, 0))]


def test_one_malformed_series_does_not_make_the_next_heartbeat_count_it_twice() -> None:
    reader = increments()
    reader.take([record([item(ok=100), item(subset="v2", ok=10)], seen=10)])
    reader.take([record([{**item(ok=105), "codes": {"200": "x"}}, item(subset="v2", ok=10)], seen=11)])
    strata = reader.take([record([item(ok=110), item(subset="v2", ok=11)], seen=12)])
    assert [(counts(s, "primary"), counts(s, "canary")) for s in strata] == [((10, 0, 0), (1, 0, 0))]


def test_only_the_first_max_series_items_are_read_into_at_most_max_strata() -> None:
    reader = increments()

    def series(scale: int) -> list[object]:
        filler: list[object] = [item(route=f"r{i:04d}", ok=scale) for i in range(MAX_SERIES)]
        return [*filler, item(route="late", ok=1000 * scale)]

    reader.take([record(series(1), seen=10)])
    strata = reader.take([record(series(2), seen=12)])
    assert len(strata) == MAX_STRATA
    assert sum(s.primary[REQUESTS] for s in strata) == MAX_SERIES  # one request more on each; "late" is not read
    assert (strata[-1].source, strata[-1].route) == OTHER
    assert strata[-1].primary[REQUESTS] == MAX_SERIES - (MAX_STRATA - 1)


def test_other_groups_reporters_services_and_subsets_are_ignored() -> None:
    reader = increments()

    def series(scale: int) -> list[object]:
        return [
            item(ok=scale),
            {**item(route="source-side", ok=scale), "labels": ["source", "web", SERVICE, "v1", "x"]},
            {**item(route="other", ok=scale), "labels": ["destination", "web", "cart", "v1", "other"]},
            item(subset="v3", route="third", ok=scale),
        ]

    reader.take([record(series(1), seen=10), record(series(1), seen=10, instance="b", group="admin")])
    strata = reader.take([record(series(3), seen=12), record(series(5), seen=12, instance="b", group="admin")])
    assert [(s.source, s.route, counts(s, "primary")) for s in strata] == [("web", "default", (2, 0, 0))]


def test_each_gateway_is_its_own_stratum() -> None:
    reader = increments()
    first = [record([item(ok=1), item(subset="v2", ok=1)], seen=10, instance=name) for name in "ab"]
    reader.take(first)
    later = [record([item(ok=5), item(subset="v2", ok=2)], seen=12, instance="a")]
    later.append(record([item(ok=9), item(subset="v2", ok=4)], seen=11, instance="b"))
    strata = reader.take(later)
    assert [counts(s, "primary") for s in strata] == [(4, 0, 0), (8, 0, 0)]
    assert [counts(s, "canary") for s in strata] == [(1, 0, 0), (3, 0, 0)]
