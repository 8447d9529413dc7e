"""The canary judge: is the canary worse than the primary, by how much, and is there evidence enough to go on?

Its input is a sequence of `Tick`s, each what the service's owner gateways counted over one interval (between two of a
gateway's heartbeats), per stratum (the calling group and the route) and arm (primary, canary): requests, failures,
first-attempt failures and the latency buckets. `Judge.update(tick)` folds one in and returns a `Verdict`. It does no
I/O and keeps no clock, so the same ticks give the same verdicts: a rollout is replayed from its stored ticks.

The test. Each stratum of each tick is a table of two arms. Given how many "bad" events it holds in all (`m`:
failures, or requests slower than a boundary) and the canary's share `π` of its requests, the canary's count `x` of
them is, if the canary is no worse than the primary in that stratum (H0), hypergeometric. The binomial likelihood
ratio of an odds ratio ψ against 1, with `q(ψ) = πψ / (πψ + 1 - π)`,

    LR(ψ) = (q(ψ) / π)^x ((1 - q(ψ)) / (1 - π))^(m - x),

has expectation at most 1 under H0, because the hypergeometric is below the binomial in the convex order (Hoeffding
1963). So the product of the tables' ratios over strata and ticks is a nonnegative supermartingale under H0, whatever
the traffic mix, the weights, the heartbeat timing or how often it is looked at; a mixture over the ψ of `HARM`, and
the mean over the judged components, stay one. Ville's inequality bounds the chance that it ever reaches 1/α by α:
a canary as good as the primary is rolled back with probability at most `alpha` (1 %) over the whole rollout,
however long. Comparing inside each stratum means a canary that gets more of a slow or failing route (a header
match) is compared with the primary on that route only. Retries hide faults, so first attempts are a component.

Latency is judged the same way on "slower than a boundary": the smallest bucket bound at or above the primary's
median (`latency_p50`), and its 99th percentile (`latency_p99`), each plus a tolerated slowdown (`LATENCY_SLACK`,
20 %, and at least `LATENCY_MARGIN`, 1 ms). They are fixed once the primary has served `MIN_BOUNDARY_REQUESTS`,
chosen from the past only (which keeps the test valid). So a canary 0.1 ms slower on a sub-millisecond service, or
10 % slower on any, is not harm; one whose median or tail moved by more puts requests past the bound.

Evidence enough to go on. For each component, the likelihood ratio of ψ = 1 against the design harm ψ = `tolerance`
(2: twice the odds of a failure, or of a slow request) is a supermartingale if the canary is that bad or worse
(monotone likelihood ratio), so when it reaches 1/β' the canary is, with error at most β', not that bad. A service
with no failures at all gives the relative test nothing to go on; a share of bad events provably below an absolute
floor then also counts, by the same argument on the canary's own requests: 1 % failing, and for latency twice the
primary's share past the bound (at least 5 % past the median's, 2 % past the tail's). β' is β/8: four components
with two ways each, so a canary that is that bad on any component is let through with probability at most `beta`
(5 %). A component that lacks evidence holds the rollout, and the
verdict says how many more canary requests it needs if the canary is like the primary (the expected growth of the log
likelihood ratio per canary request at the observed rates).

Optional absolute limits (`max_error_rate`, `max_p99_ms`, as Flagger has them) are one-sided tests of the canary's own
share against the limit (a mixture over 1.5, 2 and 4 times it), joining the mean: a canary over a limit is rolled back,
one within it never is for lack of data.

The estimate shown with each component is the Mantel-Haenszel odds ratio over its strata, with its Robins-Breslow-
Greenland 95 % interval (a fixed-sample interval, for reading; the decision is the sequential test).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dashboard.signals.history import histogram_quantile
from gateway.telemetry import BUCKETS

BOUNDS: tuple[float, ...] = tuple(float(bound) for bound in BUCKETS)  # finite bucket bounds, in seconds
REQUESTS, FAILURES, FIRST_FAILURES, FIRST_BUCKET = 0, 1, 2, 3
ARM = FIRST_BUCKET + len(BOUNDS) + 1  # numbers per arm: the three counts, then per-bucket counts ending in +Inf
# The odds ratios the harm mixture weighs, and their weights: most on the harms a rollout meets (2 to 5 times the
# primary's odds), enough on the extremes that a canary failing half its requests is caught in seconds.
HARM = (1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0)
HARM_WEIGHTS = (0.1, 0.2, 0.2, 0.2, 0.15, 0.1, 0.05)
MIN_BOUNDARY_REQUESTS = 100  # primary requests before the latency boundaries are chosen
LATENCY_SLACK = 0.2  # a canary this much slower than the primary's median or p99 is not a regression
LATENCY_MARGIN = 0.001  # nor one slower by less than this many seconds
LATENCY_FLOORS = {"latency_p50": 0.05, "latency_p99": 0.02}  # the least absolute floor of each latency judge
RATE_WINDOW = 60.0  # seconds of ticks behind "the current rate"
COMPONENTS = ("errors", "first_attempts", "latency_p50", "latency_p99")
WEIGHTS = {"errors": 1.0, "first_attempts": 1.0, "latency_p50": 0.25, "latency_p99": 0.25, "limit": 0.5}
WAYS = 2 * len(COMPONENTS)  # each component can show it is safe two ways (relative, absolute)
LIMIT_ALTERNATIVES = (1.5, 2.0, 4.0)
Z95 = 1.959964


@dataclass(frozen=True, slots=True)
class Criteria:
    """What the judge tests, from a rollout's spec. `alpha`: the chance of rolling back a canary as good as the
    primary; `beta`: of promoting one `tolerance` times worse (in odds) on a component."""

    errors: bool = True
    first_attempts: bool = True
    latency: bool = True
    max_error_rate: float | None = None
    max_p99_ms: float | None = None
    alpha: float = 0.01
    beta: float = 0.05
    tolerance: float = 2.0
    error_floor: float = 0.01

    def enabled(self) -> tuple[str, ...]:
        wanted = {
            "errors": self.errors,
            "first_attempts": self.first_attempts,
            "latency_p50": self.latency,
            "latency_p99": self.latency,
        }
        return tuple(name for name in COMPONENTS if wanted[name])


@dataclass(frozen=True, slots=True)
class Stratum:
    """One (calling group, route) of one tick: `primary` and `canary` are `ARM` counts each."""

    source: str
    route: str
    primary: tuple[int, ...]
    canary: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Tick:
    """What the owner gateways counted over `seconds` ending at `time`. `fresh`: signals arrived in time (a stale
    tick holds the rollout, whatever its counts)."""

    time: float
    seconds: float
    strata: tuple[Stratum, ...]
    fresh: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.time,
            "s": self.seconds,
            "fresh": self.fresh,
            "strata": [[s.source, s.route, list(s.primary), list(s.canary)] for s in self.strata],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tick:
        strata = tuple(
            Stratum(str(source), str(route), tuple(int(n) for n in primary), tuple(int(n) for n in canary))
            for source, route, primary, canary in data["strata"]
        )
        return cls(float(data["t"]), float(data["s"]), strata, bool(data.get("fresh", True)))


def _kl(p: float, q: float) -> float:
    """Kullback-Leibler divergence of Bernoulli(p) from Bernoulli(q)."""
    total = 0.0
    if p > 0:
        total += p * math.log(p / q)
    if p < 1:
        total += (1 - p) * math.log((1 - p) / (1 - q))
    return total


def _odds_q(pi: float, psi: float) -> float:
    return pi * psi / (pi * psi + 1 - pi)


@dataclass(slots=True)
class Relative:
    """One component's comparison of canary and primary: the log likelihood at each odds ratio of `1, *HARM` (and
    the design tolerance), the Mantel-Haenszel sums, and the counts."""

    grid: tuple[float, ...]
    ll: list[float]
    canary: list[int] = field(default_factory=lambda: [0, 0])  # requests, bad
    primary: list[int] = field(default_factory=lambda: [0, 0])
    mh: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0, 0.0])  # R, S, P*R, (P*S + Q*R), Q*S
    last_share: float = 0.0  # the canary's share of requests in the latest table

    @classmethod
    def new(cls, tolerance: float) -> Relative:
        grid = (1.0, *HARM, tolerance)
        return cls(grid, [0.0] * len(grid))

    def add(self, x: int, m: int, n_canary: int, n_primary: int) -> None:
        self.canary[0] += n_canary
        self.canary[1] += x
        self.primary[0] += n_primary
        self.primary[1] += m - x
        if n_canary <= 0 or n_primary <= 0:
            return
        n = n_canary + n_primary
        pi = n_canary / n
        self.last_share = pi
        if m > 0:
            for i, psi in enumerate(self.grid):
                q = _odds_q(pi, psi)
                self.ll[i] += x * math.log(q) + (m - x) * math.log(1 - q)
        # Mantel-Haenszel odds ratio with the Robins-Breslow-Greenland variance, per 2x2 table.
        a, b = x, n_canary - x  # canary bad, good
        c, d = m - x, n_primary - (m - x)  # primary bad, good
        r, s = a * d / n, b * c / n
        p, q_ = (a + d) / n, (b + c) / n
        mh = self.mh
        mh[0] += r
        mh[1] += s
        mh[2] += p * r
        mh[3] += p * s + q_ * r
        mh[4] += q_ * s

    def harm(self) -> float:
        """The mixture likelihood ratio of harm (ψ in HARM) against ψ = 1."""
        base = self.ll[0]
        lls = self.ll[1 : 1 + len(HARM)]
        return sum(weight * math.exp(min(700.0, ll - base)) for weight, ll in zip(HARM_WEIGHTS, lls, strict=True))

    def log_safe(self) -> float:
        """log of the likelihood ratio of ψ = 1 against the design tolerance."""
        return self.ll[0] - self.ll[-1]

    def estimate(self) -> tuple[float, float, float] | None:
        """Mantel-Haenszel odds ratio and its 95 % interval; None when it is undefined."""
        r, s, pr, mixed, qs = self.mh
        if r <= 0 or s <= 0:
            return None
        ratio = r / s
        variance = pr / (2 * r * r) + mixed / (2 * r * s) + qs / (2 * s * s)
        half = Z95 * math.sqrt(max(variance, 0.0))
        return ratio, ratio * math.exp(-half), ratio * math.exp(half)

    def safe_rate(self, tolerance: float) -> float | None:
        """Expected growth of `log_safe` per canary request if the canary were like the primary, at the pooled
        rate of bad events and the latest share; None when nothing grows it."""
        requests = self.canary[0] + self.primary[0]
        pi = self.last_share
        if requests <= 0 or not 0 < pi < 1:
            return None
        rate = (self.canary[1] + self.primary[1]) / requests
        if rate <= 0:
            return None
        per_canary_request = rate / pi  # bad events in the stratum per canary request
        return per_canary_request * _kl(pi, _odds_q(pi, tolerance))


@dataclass(slots=True)
class Absolute:
    """The canary's own share of bad events against a floor: the log likelihood ratio of floor/4 against the floor."""

    floor: float
    n: int = 0
    bad: int = 0

    def add(self, bad: int, n: int) -> None:
        self.n += n
        self.bad += bad

    def log_safe(self) -> float:
        low = self.floor / 4
        return self.bad * math.log(low / self.floor) + (self.n - self.bad) * math.log((1 - low) / (1 - self.floor))

    def safe_rate(self, assumed: float) -> float | None:
        low = self.floor / 4
        growth = assumed * math.log(low / self.floor) + (1 - assumed) * math.log((1 - low) / (1 - self.floor))
        return growth if growth > 0 else None


@dataclass(slots=True)
class Limit:
    """An absolute limit on the canary's share of bad events: the mixture likelihood ratio of shares above it."""

    limit: float
    n: int = 0
    bad: int = 0

    def add(self, bad: int, n: int) -> None:
        self.n += n
        self.bad += bad

    def harm(self) -> float:
        total = 0.0
        for factor in LIMIT_ALTERNATIVES:
            high = min(0.999, self.limit * factor)
            log_lr = self.bad * math.log(high / self.limit) + (self.n - self.bad) * math.log(
                (1 - high) / (1 - self.limit)
            )
            total += math.exp(min(700.0, log_lr))
        return total / len(LIMIT_ALTERNATIVES)


@dataclass(frozen=True, slots=True)
class Finding:
    """One component's state, for the decision log and the page."""

    name: str
    what: str  # "failures", "first-attempt failures", "requests slower than 5 ms", ...
    canary: tuple[int, int]  # requests, bad
    primary: tuple[int, int]
    estimate: tuple[float, float, float] | None  # odds ratio, 95 % interval
    harm: float  # the component's harm e-value
    safe: bool
    needs: int | None  # canary requests still needed to be safe, if the canary is like the primary

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "what": self.what,
            "canary": list(self.canary),
            "primary": list(self.primary),
            "odds_ratio": None if self.estimate is None else [round(value, 4) for value in self.estimate],
            "evidence": round(self.harm, 4),
            "safe": self.safe,
            "needs": self.needs,
        }

    def sentence(self) -> str:
        canary = _share(*self.canary)
        primary = _share(*self.primary)
        text = f"{self.what}: canary {canary}, primary {primary}"
        if self.estimate is not None:
            ratio, low, high = self.estimate
            text += f", odds ratio {ratio:.2f} (95 % {low:.2f} to {high:.2f})"
        return text


def _share(requests: int, bad: int) -> str:
    if requests <= 0:
        return "no requests"
    return f"{bad:,} of {requests:,} ({100 * bad / requests:.2f} %)"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The judge's answer after a tick. `outcome` is "harm" (roll back now), "pass" (no harm, and evidence enough
    that the canary is not worse) or "hold" (no harm found, not enough evidence yet: never a failure)."""

    outcome: str
    evidence: float  # the harm e-value: the mean over components
    threshold: float  # 1 / alpha
    findings: tuple[Finding, ...]
    needs: int | None  # canary requests still needed (hold only)
    canary_rate: float | None  # canary requests per second over the last RATE_WINDOW
    stale: bool
    sentence: str

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "evidence": round(self.evidence, 4),
            "threshold": self.threshold,
            "needs": self.needs,
            "canary_rate": None if self.canary_rate is None else round(self.canary_rate, 4),
            "stale": self.stale,
            "sentence": self.sentence,
            "findings": [finding.to_json() for finding in self.findings],
        }


class Judge:
    """Folds ticks into the evidence for and against the canary; see the module docstring for the test.

    >>> judge = Judge(Criteria())
    >>> verdict = judge.update(tick)
    >>> verdict.outcome, verdict.sentence
    ('hold', 'no sign of harm yet; needs ≈ 340 more canary requests (≈ 6 min at the current rate) to tell ...')
    """

    def __init__(self, criteria: Criteria) -> None:
        self.criteria = criteria
        self.names = criteria.enabled()
        self.relative = {name: Relative.new(criteria.tolerance) for name in self.names}
        floors = {"errors": criteria.error_floor, "first_attempts": criteria.error_floor}
        self.absolute = {name: Absolute(floors[name]) for name in self.names if name in floors}  # latency: later
        self.limits: dict[str, Limit] = {}
        self.limit_bound: int | None = None
        if criteria.max_error_rate is not None:
            self.limits["max_error_rate"] = Limit(criteria.max_error_rate)
        if criteria.max_p99_ms is not None:
            self.limits["max_p99_ms"] = Limit(0.01)
            self.limit_bound = bound_index(criteria.max_p99_ms / 1000)
        self.primary_buckets = [0] * (len(BOUNDS) + 1)
        self.boundaries: dict[str, int] = {}  # latency component -> bound index, once chosen
        self.recent: deque[tuple[float, int]] = deque()  # (seconds, canary requests) of the latest ticks
        self.ticks = 0

    def update(self, tick: Tick) -> Verdict:
        self.ticks += 1
        self._choose_boundaries()
        for stratum in sorted(tick.strata, key=lambda s: (s.source, s.route)):
            self._add(stratum)
        canary_requests = sum(stratum.canary[REQUESTS] for stratum in tick.strata)
        self.recent.append((tick.seconds, canary_requests))
        while len(self.recent) > 1 and sum(seconds for seconds, _ in self.recent) - self.recent[0][0] >= RATE_WINDOW:
            self.recent.popleft()
        return self.verdict(stale=not tick.fresh)

    def _choose_boundaries(self) -> None:
        """Latency boundaries and their floors, from the primary's requests before this tick only (so the test stays
        valid): `latency_boundary` above the primary's median and 99th percentile, and as floor twice the primary's
        share above it (at least `LATENCY_FLOORS`)."""
        if "latency_p50" not in self.relative or self.boundaries:
            return
        buckets = self.primary_buckets
        total = sum(buckets)
        if total < MIN_BOUNDARY_REQUESTS:
            return
        for name, quantile in (("latency_p50", 0.5), ("latency_p99", 0.99)):
            bound = latency_boundary(buckets, quantile)
            above = sum(buckets[bound + 1 :]) / total
            self.boundaries[name] = bound
            self.absolute[name] = Absolute(min(0.5, max(LATENCY_FLOORS[name], 2 * above)))

    def _add(self, stratum: Stratum) -> None:
        primary, canary = stratum.primary, stratum.canary
        n_p, n_c = primary[REQUESTS], canary[REQUESTS]
        for i in range(len(BOUNDS) + 1):
            self.primary_buckets[i] += primary[FIRST_BUCKET + i]
        for name, relative in self.relative.items():
            if name == "errors":
                bad_c, bad_p = canary[FAILURES], primary[FAILURES]
            elif name == "first_attempts":
                bad_c, bad_p = canary[FIRST_FAILURES], primary[FIRST_FAILURES]
            elif name in self.boundaries:
                bound = self.boundaries[name]
                bad_c, bad_p = slower(canary, bound), slower(primary, bound)
            else:
                continue  # latency before its boundary is chosen
            bad_c, bad_p = min(bad_c, n_c), min(bad_p, n_p)
            relative.add(bad_c, bad_c + bad_p, n_c, n_p)
            if name in self.absolute:
                self.absolute[name].add(bad_c, n_c)
        if "max_error_rate" in self.limits:
            self.limits["max_error_rate"].add(min(canary[FAILURES], n_c), n_c)
        if self.limit_bound is not None:
            self.limits["max_p99_ms"].add(min(slower(canary, self.limit_bound), n_c), n_c)

    def verdict(self, stale: bool = False) -> Verdict:
        criteria = self.criteria
        threshold = 1 / criteria.alpha
        need_log = math.log(WAYS / criteria.beta)
        findings = []
        harms = []  # (weight, e-value)
        for name in self.names:
            relative = self.relative[name]
            absolute = self.absolute.get(name)
            harm = relative.harm()
            harms.append((WEIGHTS[name], harm))
            safe = relative.log_safe() >= need_log or (absolute is not None and absolute.log_safe() >= need_log)
            if name.startswith("latency") and name not in self.boundaries:
                safe = False
            needs = None if safe else self._needs(name, need_log)
            findings.append(
                Finding(
                    name,
                    self._what(name),
                    (relative.canary[0], relative.canary[1]),
                    (relative.primary[0], relative.primary[1]),
                    relative.estimate(),
                    harm,
                    safe,
                    needs,
                )
            )
        for name, limit in self.limits.items():
            harm = limit.harm()
            harms.append((WEIGHTS["limit"], harm))
            what = (
                f"failures (limit {100 * limit.limit:g} %)"
                if name == "max_error_rate"
                else f"requests slower than {_ms(BOUNDS[self.limit_bound or 0])} (p99 limit {criteria.max_p99_ms:g} ms)"
            )
            findings.append(Finding(name, what, (limit.n, limit.bad), (0, 0), None, harm, True, None))
        weights = sum(weight for weight, _ in harms)
        evidence = sum(weight * harm for weight, harm in harms) / weights if harms else 1.0
        rate = self.canary_rate()
        if evidence >= threshold:
            worst = max(findings, key=lambda finding: finding.harm)
            sentence = (
                f"roll back: the canary is worse on {worst.sentence()}; evidence {evidence:,.0f} "
                f"against a threshold of {threshold:,.0f}"
            )
            return Verdict("harm", evidence, threshold, tuple(findings), None, rate, stale, sentence)
        missing = [finding for finding in findings if not finding.safe]
        if stale:
            sentence = "hold: no fresh signals from the owner gateways; never promoted blind"
            return Verdict("hold", evidence, threshold, tuple(findings), None, rate, True, sentence)
        if not missing:
            sentence = (
                f"pass: no sign of harm (evidence {evidence:.2f}, threshold {threshold:,.0f}) and evidence enough"
            )
            sentence += " that the canary is not worse: " + "; ".join(f.sentence() for f in findings[:2])
            return Verdict("pass", evidence, threshold, tuple(findings), None, rate, stale, sentence)
        known = [finding.needs for finding in missing if finding.needs is not None]
        needs = max(known) if len(known) == len(missing) else None
        names = ", ".join(finding.what for finding in missing)
        if needs is None:
            wait = "more canary traffic"
        else:
            wait = f"≈ {needs:,} more canary requests"
            if rate:
                wait += f" (≈ {_duration(needs / rate)} at the current rate)"
        sentence = f"hold: no sign of harm (evidence {evidence:.2f}); needs {wait} to tell {names} apart"
        return Verdict("hold", evidence, threshold, tuple(findings), needs, rate, stale, sentence)

    def _needs(self, name: str, need_log: float) -> int | None:
        relative = self.relative[name]
        options = []
        growth = relative.safe_rate(self.criteria.tolerance)
        if growth:
            options.append((need_log - relative.log_safe()) / growth)
        absolute = self.absolute.get(name)
        if absolute is not None:
            requests = relative.canary[0] + relative.primary[0]
            assumed = (relative.canary[1] + relative.primary[1]) / requests if requests else 0.0
            growth = absolute.safe_rate(assumed)
            if growth:
                options.append((need_log - absolute.log_safe()) / growth)
        if not options:
            return None
        return max(1, math.ceil(min(options)))

    def _what(self, name: str) -> str:
        if name == "errors":
            return "failures"
        if name == "first_attempts":
            return "first-attempt failures"
        bound = self.boundaries.get(name)
        quantile = "median" if name == "latency_p50" else "p99"
        if bound is None:
            return f"latency ({quantile})"
        return f"requests slower than {_ms(BOUNDS[bound])} (the primary's {quantile})"

    def canary_rate(self) -> float | None:
        seconds = sum(seconds for seconds, _ in self.recent)
        return sum(requests for _, requests in self.recent) / seconds if seconds > 0 else None


def slower(counts: Sequence[int], bound: int) -> int:
    """Requests in the buckets above bound index `bound`."""
    return sum(counts[FIRST_BUCKET + bound + 1 : FIRST_BUCKET + len(BOUNDS) + 1])


def latency_boundary(buckets: Sequence[int], quantile: float) -> int:
    """The bucket bound a latency judge counts "slower" against: the smallest at or above the primary's `quantile`
    plus the tolerated slowdown (`LATENCY_SLACK` of it, and at least `LATENCY_MARGIN`), so a canary a little slower
    (0.1 ms on a sub-millisecond service, 10 % on any) is never harm, and a real regression moves requests past it."""
    seconds = histogram_quantile(quantile, buckets) or 0.0
    return bound_index(max(seconds * (1 + LATENCY_SLACK), seconds + LATENCY_MARGIN))


def bound_index(seconds: float) -> int:
    """The smallest finite bucket bound at or above `seconds` (the largest when none is)."""
    for index, bound in enumerate(BOUNDS):
        if bound >= seconds - 1e-12:
            return index
    return len(BOUNDS) - 1


def replay(criteria: Criteria, ticks: Iterable[Tick]) -> list[Verdict]:
    """The verdicts a judge gives on `ticks`, in order: what a stored rollout's decisions were made from."""
    judge = Judge(criteria)
    return [judge.update(tick) for tick in ticks]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
