"""A seeded simulator of canary traffic that drives the real judge through the real heartbeat path.

Gateways of the owner group count requests to a service's primary and canary and send cumulative heartbeats every
2 s with jitter, restarting now and then (their counters start again at 0, `started` changes). The dashboard side
is the product's own code: `dashboard.rollout.signals.Increments` turns the heartbeat records into strata and
`dashboard.rollout.judge.Judge` judges them, every `TICK` seconds. Only the traffic is synthetic: Poisson arrivals,
log-normal latencies (bucketed as a gateway buckets them), binomial failures, and first attempts that fail more
often than final outcomes when retries hide faults.

`run(scenario, seed)` returns when the judge first says "harm" (a rollback) or at the scenario's horizon, with the
times of the first harm and the first pass. `CASES` pairs each scenario of issue 14's proof with its requirement;
`rollouts(case, seeds)` drives it. The default test run drives 100 rollouts per case on `TEST_SEEDS`
(tests/dashboard/test_canary_judge.py and test_canary_judge_healthy.py); bench/canary.py drives 1,000 on other
seeds and prints the rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dashboard.rollout.judge import BOUNDS, Criteria, Judge, Tick, Verdict
from dashboard.rollout.signals import Increments
from dashboard.store.model import GatewayRecord
from gateway import rpc

SERVICE, OWNER = "catalog", "shop"
TICK = 2.0  # seconds between judge runs (the dashboard's heartbeat-driven loop)
HEARTBEAT = 2.0


@dataclass(frozen=True)
class Route:
    """A route's share of the primary's traffic, and how its requests behave (latency factor, extra failures)."""

    name: str
    share: float
    slow: float = 1.0
    error: float = 0.0
    canary_bias: float = 1.0  # how many times its share of the canary's traffic, against the primary's


@dataclass(frozen=True)
class Scenario:
    name: str
    total_rps: float
    weight: float = 0.10  # the canary's share of the traffic
    errors: tuple[float, float] = (0.005, 0.005)  # failure probability: primary, canary
    first_errors: tuple[float, float] | None = None  # first attempts, when retries hide failures
    medians_ms: tuple[float, float] = (5.0, 5.0)
    sigma: float = 0.5
    routes: tuple[Route, ...] = (Route("default", 1.0),)
    sources: tuple[str, ...] = ("web", "api")
    gateways: int = 2
    horizon: float = 600.0
    restart_every: float = 600.0  # mean seconds between a gateway's restarts
    jitter: float = 0.15  # heartbeat intervals vary by up to this share


@dataclass
class Outcome:
    harm_at: float | None = None  # seconds from the start to the first "harm" verdict
    pass_at: float | None = None
    last: Verdict | None = None
    verdicts: list[Verdict] = field(default_factory=list)


def _bucket_probabilities(median_ms: float, sigma: float) -> np.ndarray:
    """P(latency in each gateway bucket) for a log-normal latency: bisect_left buckets, the last one +Inf."""
    mu = math.log(median_ms / 1000)
    cdf = [0.5 * (1 + math.erf((math.log(bound) - mu) / (sigma * math.sqrt(2)))) for bound in BOUNDS]
    edges = np.array([0.0, *cdf, 1.0])
    probabilities = np.diff(edges)
    normalised: np.ndarray = np.clip(probabilities, 0.0, 1.0) / probabilities.sum()
    return normalised


class _Gateway:
    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.started = 0.0
        self.series: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.next_beat = 0.0
        self.last_beat = 0.0
        self.record: GatewayRecord | None = None


class Simulation:
    def __init__(self, scenario: Scenario, seed: int, criteria: Criteria | None = None) -> None:
        self.scenario = scenario
        self.rng = np.random.default_rng(seed)
        self.criteria = criteria or Criteria()
        self.judge = Judge(self.criteria)
        self.increments = Increments(SERVICE, OWNER, ("v1", "v2"), rpc.DEFAULT_FAILURE_CODES)
        self.gateways = [_Gateway(f"00000000-0000-4000-8000-{i:012d}") for i in range(scenario.gateways)]
        for gateway in self.gateways:
            gateway.next_beat = float(self.rng.uniform(0, HEARTBEAT))
        route_factors = {route.name: route.slow for route in scenario.routes}
        self.probabilities = {
            (arm, name): _bucket_probabilities(median * factor, scenario.sigma)
            for arm, median in zip(("v1", "v2"), scenario.medians_ms, strict=True)
            for name, factor in route_factors.items()
        }
        self.shares = self._shares()

    def _shares(self) -> dict[tuple[str, str], float]:
        """Each arm's share of each route (the canary's biased, then normalised)."""
        routes = self.scenario.routes
        canary = [route.share * route.canary_bias for route in routes]
        total = sum(canary)
        shares = {}
        for route, weight in zip(routes, canary, strict=True):
            shares[("v1", route.name)] = route.share
            shares[("v2", route.name)] = weight / total
        return shares

    def _traffic(self, gateway: _Gateway, seconds: float) -> None:
        """What one gateway counts over `seconds`, added to its cumulative series."""
        scenario, rng = self.scenario, self.rng
        per_gateway = scenario.total_rps * seconds / scenario.gateways / len(scenario.sources)
        for arm, arm_share in (("v1", 1 - scenario.weight), ("v2", scenario.weight)):
            index = 0 if arm == "v1" else 1
            for route in scenario.routes:
                mean = per_gateway * arm_share * self.shares[(arm, route.name)]
                for source in scenario.sources:
                    n = int(rng.poisson(mean))
                    if n == 0:
                        continue
                    error = min(1.0, scenario.errors[index] + route.error)
                    if scenario.first_errors is not None:
                        first_error = max(error, scenario.first_errors[index] + route.error)
                        first_failed = int(rng.binomial(n, first_error))
                        failed = int(rng.binomial(first_failed, error / first_error)) if first_error else 0
                    else:
                        failed = first_failed = int(rng.binomial(n, error))
                    buckets = rng.multinomial(n, self.probabilities[(arm, route.name)])
                    self._count(gateway, (source, arm, route.name), n, failed, first_failed, buckets)

    def _count(
        self, gateway: _Gateway, key: tuple[str, str, str], n: int, failed: int, first: int, buckets: np.ndarray
    ) -> None:
        item = gateway.series.get(key)
        if item is None:
            source, subset, route = key
            item = gateway.series[key] = {
                "labels": ["destination", source, SERVICE, subset, route],
                "codes": {},
                "buckets": [0] * (len(BOUNDS) + 1),
                "first": {},
            }
        codes, firsts = item["codes"], item["first"]
        codes["200"] = codes.get("200", 0) + n - failed
        codes["503"] = codes.get("503", 0) + failed
        firsts["200"] = firsts.get("200", 0) + n - first
        firsts["503"] = firsts.get("503", 0) + first
        item["buckets"] = [a + int(b) for a, b in zip(item["buckets"], buckets, strict=True)]

    def _beat(self, gateway: _Gateway, now: float) -> None:
        scenario, rng = self.scenario, self.rng
        self._traffic(gateway, now - gateway.last_beat)
        if rng.random() < (now - gateway.last_beat) / scenario.restart_every:
            # A restart somewhere in the interval: what it counted before is lost, the counters begin again.
            gateway.started = float(now - rng.uniform(0, now - gateway.last_beat))
            gateway.series = {}
            self._traffic(gateway, now - gateway.started)
        gateway.last_beat = now
        series = [
            {**item, "codes": dict(item["codes"]), "first": dict(item["first"]), "buckets": list(item["buckets"])}
            for item in gateway.series.values()
        ]
        data = {"started": gateway.started, "stats": {"series": series}}
        gateway.record = GatewayRecord(gateway.instance, OWNER, data, now)
        gateway.next_beat = now + HEARTBEAT * float(rng.uniform(1 - scenario.jitter, 1 + scenario.jitter))

    def run(self) -> Outcome:
        outcome = Outcome()
        now = 0.0
        while now < self.scenario.horizon:
            now += TICK
            for gateway in self.gateways:
                while gateway.next_beat <= now:
                    self._beat(gateway, gateway.next_beat)
            records = [gateway.record for gateway in self.gateways if gateway.record is not None]
            strata = self.increments.take(records)
            verdict = self.judge.update(Tick(now, TICK, tuple(strata)))
            outcome.verdicts.append(verdict)
            outcome.last = verdict
            if verdict.outcome == "pass" and outcome.pass_at is None:
                outcome.pass_at = now
            if verdict.outcome == "harm":
                outcome.harm_at = now
                break
        return outcome


def run(scenario: Scenario, seed: int, criteria: Criteria | None = None) -> Outcome:
    return Simulation(scenario, seed, criteria).run()


def rollbacks(scenario: Scenario, runs: int, first_seed: int = 0, within: float | None = None) -> float:
    """The share of `runs` rollouts rolled back (within `within` seconds when given)."""
    count = 0
    for seed in range(first_seed, first_seed + runs):
        harm_at = run(scenario, seed).harm_at
        if harm_at is not None and (within is None or harm_at <= within):
            count += 1
    return count / runs


# The scenarios of issue 14's proof, at the canary's 10 % weight.
HEALTHY = {rps: Scenario(f"healthy at {rps} rps", rps) for rps in (5, 50, 500)}
ERRORS_500 = Scenario("errors 0.5 % -> 2 % at 50 canary rps", 500, errors=(0.005, 0.02), horizon=60)
ERRORS_50 = Scenario("errors 0.5 % -> 2 % at 5 canary rps", 50, errors=(0.005, 0.02), horizon=300)
HALF_FAILING = Scenario("50 % failures at 5 canary rps", 50, errors=(0.005, 0.5), horizon=10)
SLOWER = Scenario("median 5 -> 7 ms at 50 canary rps", 500, medians_ms=(5.0, 7.0), horizon=60)
QUIET = Scenario("0.2 canary rps", 2, horizon=1800)
SLOW_ROUTE = Scenario(
    "twice the share of a slow, failing route",
    50,
    routes=(Route("default", 0.8), Route("search", 0.2, slow=3.0, error=0.02, canary_bias=2.0)),
)
HIDDEN = Scenario("first attempts fail 0.5 % -> 5 %, retries hide it", 500, first_errors=(0.005, 0.05), horizon=60)


@dataclass(frozen=True)
class Requirement:
    """What the issue asks of a case: rolled back (`rollback`) in at least `share` of runs within `within` seconds,
    or, for a canary that must not be rolled back, in at most `share` of runs."""

    rollback: bool
    share: float
    within: float | None = None

    def met(self, rolled_back: float) -> bool:
        return rolled_back >= self.share if self.rollback else rolled_back <= self.share

    def consistent(self, count: int, runs: int, significance: float = 0.05) -> bool:
        """Whether `count` of `runs` rolled back is consistent with the requirement: an exact one-sided binomial test
        at `significance` with the requirement's share as the rate. A few runs cannot tell 1 % from 2 % (one run
        in 100 either way); this fails only when they show that the requirement is not met."""
        if self.rollback:
            return _binomial_cdf(count, runs, self.share) >= significance  # P(this few | the share)
        return 1 - _binomial_cdf(count - 1, runs, self.share) >= significance  # P(this many | the share)

    def text(self) -> str:
        if not self.rollback:
            return f"<= {100 * self.share:g} %" if self.share else "none"
        return f">= {100 * self.share:g} % within {self.within:g} s"


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, min(k, n) + 1))


@dataclass(frozen=True)
class Case:
    key: str
    scenario: Scenario
    requirement: Requirement
    criteria: Criteria = field(default_factory=Criteria)

    def counted(self, outcome: Outcome) -> bool:
        """Whether a run counts as rolled back for the requirement (within its time limit when it has one)."""
        within = self.requirement.within
        return outcome.harm_at is not None and (within is None or outcome.harm_at <= within)


def rollback_times(outcomes: list[Outcome]) -> list[float]:
    return sorted(outcome.harm_at for outcome in outcomes if outcome.harm_at is not None)


def judged(key: str, seeds: range | None = None) -> tuple[Case, list[Outcome]]:
    """A case of `CASES` and its outcomes on `seeds` (`TEST_SEEDS`), asserting that the count rolled back (within
    the time limit) is consistent with the case's requirement."""
    case = next(case for case in CASES if case.key == key)
    outcomes = rollouts(case, TEST_SEEDS if seeds is None else seeds)
    count = sum(case.counted(outcome) for outcome in outcomes)
    assert case.requirement.consistent(count, len(outcomes)), (
        f"{key}: {count} of {len(outcomes)} rolled back, requirement {case.requirement.text()}; "
        f"rollbacks at {rollback_times(outcomes)} s"
    )
    return case, outcomes


def rollouts(case: Case, seeds: range) -> list[Outcome]:
    outcomes = []
    for seed in seeds:
        outcome = run(case.scenario, seed, case.criteria)
        outcome.verdicts = []  # the last verdict is kept; the rest would hold 900 per run
        outcomes.append(outcome)
    return outcomes


NO_FALSE_ROLLBACK = Requirement(rollback=False, share=0.01)
TEST_SEEDS = range(100)  # bench/canary.py draws from BENCH_FIRST_SEED on, so the tests are not tuned on its seeds
BENCH_FIRST_SEED = 1_000_000
CASES: tuple[Case, ...] = (
    *(Case(f"healthy_{rps}", scenario, NO_FALSE_ROLLBACK) for rps, scenario in HEALTHY.items()),
    Case("errors_50cps", ERRORS_500, Requirement(rollback=True, share=0.95, within=60)),
    Case("errors_5cps", ERRORS_50, Requirement(rollback=True, share=0.95, within=300)),
    Case("half_failing", HALF_FAILING, Requirement(rollback=True, share=0.99, within=10)),
    Case("slower_median", SLOWER, Requirement(rollback=True, share=0.90, within=60)),
    Case("quiet", QUIET, Requirement(rollback=False, share=0.0)),
    Case("slow_route", SLOW_ROUTE, NO_FALSE_ROLLBACK),
    Case("hidden_by_retries", HIDDEN, Requirement(rollback=True, share=0.95, within=60)),
    # The control: the same canary judged without first attempts must not be caught, or they are not what catches it.
    Case("hidden_first_attempts_off", HIDDEN, NO_FALSE_ROLLBACK, Criteria(first_attempts=False)),
)
