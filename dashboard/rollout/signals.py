"""What the judge reads: one service's primary and canary, counted by its owner gateways, per interval.

A gateway's heartbeat carries its cumulative `stats` series (`gateway.control.stats_json`). `Increments.take(records)`
reads the `reporter="destination"` series of the service's two subsets from every gateway of the owner group that
sent a heartbeat since the last call, differences them against that gateway's previous heartbeat, and returns one
`Stratum` per (gateway, calling group, route) that saw requests. A counter that went down, or a new `started`, is a
restart: the new value is the increase, as in Prometheus's rate(). A gateway's first heartbeat is only a baseline
(what it counted before the rollout began is not the rollout's).

Per arm: requests, failures (5xx, and gRPC calls whose code is in the service's `grpc.failure_codes`), first-attempt
failures (from the series' `first`/`first_grpc`, which a gateway sends only when they differ from the final
outcomes) and the latency buckets. Anything malformed in a series (it came from the network) leaves that series out.
Each gateway's table stays its own stratum: both arms of it cover the same seconds. A gateway's heartbeat holds at
most `MAX_STRATA` of them; beyond that the rest are summed into one (a coarser stratum is still a valid one), which
bounds what each tick stores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dashboard.rollout.judge import ARM, FAILURES, FIRST_BUCKET, FIRST_FAILURES, REQUESTS, Stratum
from dashboard.store.model import GatewayRecord

MAX_LABEL = 253
MAX_SERIES = 4096  # per heartbeat, as the golden-signal history reads them
GRPC_CODES = 17
MAX_STRATA = 64  # (calling group, route) tables per gateway and heartbeat; the rest are judged as one
OTHER = ("(other)", "(other)")


@dataclass(slots=True)
class _Gateway:
    seen: float
    started: object
    counts: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)  # (source, route, subset) -> ARM


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0 or value > 1e15:
        return None
    return int(value)


def _codes(raw: object, width: int) -> dict[int, int] | None:
    """{code: count} from a heartbeat's {"503": 2}; None when malformed. `width`: digits of an HTTP status (3) or a
    gRPC code (1 or 2)."""
    if not isinstance(raw, dict) or len(raw) > 64:
        return None
    found = {}
    for key, value in raw.items():
        count = _count(value)
        if count is None or not isinstance(key, str) or not key.isdigit() or len(key) > width:
            return None
        found[int(key)] = count
    return found


def arm_counts(item: Mapping[str, Any], failures: frozenset[int]) -> list[int] | None:
    """One series item's ARM numbers, or None when it is malformed."""
    codes = _codes(item.get("codes"), 3)
    grpc = _codes(item.get("grpc", {}), 2)
    buckets = item.get("buckets")
    if codes is None or grpc is None or not isinstance(buckets, list) or len(buckets) != ARM - FIRST_BUCKET:
        return None
    first = _codes(item["first"], 3) if "first" in item else codes
    first_grpc = _codes(item["first_grpc"], 2) if "first_grpc" in item else grpc
    if first is None or first_grpc is None:
        return None
    counts = [0] * ARM
    counts[REQUESTS] = sum(codes.values())
    counts[FAILURES] = _failed(codes, grpc, failures, counts[REQUESTS])
    counts[FIRST_FAILURES] = _failed(first, first_grpc, failures, counts[REQUESTS])
    for i, value in enumerate(buckets):
        count = _count(value)
        if count is None:
            return None
        counts[FIRST_BUCKET + i] = count
    return counts


def _failed(codes: Mapping[int, int], grpc: Mapping[int, int], failures: frozenset[int], requests: int) -> int:
    """5xx answers and failing gRPC codes (a call is counted once even if it had both)."""
    failed = sum(count for code, count in codes.items() if 500 <= code <= 599)
    failed += sum(count for code, count in grpc.items() if code in failures)
    return min(failed, requests)


class Increments:
    """Per-interval counts of one service's primary and canary from its owner gateways' heartbeats.

    >>> increments = Increments("catalog", "shop", ("v1", "v2"), failures)
    >>> strata = increments.take(await store.gateways(stats=True))
    """

    def __init__(self, service: str, owner: str, subsets: tuple[str, str], failures: frozenset[int]) -> None:
        self.service = service
        self.owner = owner
        self.subsets = subsets  # primary, canary
        self.failures = failures
        self.gateways: dict[str, _Gateway] = {}
        self.newest = 0.0  # the latest heartbeat read, seconds since the epoch

    def take(self, records: Iterable[GatewayRecord]) -> list[Stratum]:
        strata = []
        for record in sorted(records, key=lambda record: record.key):
            if record.group != self.owner:
                continue
            strata += self._take(record)
        return strata

    def _take(self, record: GatewayRecord) -> list[Stratum]:
        state = self.gateways.get(record.key)
        if state is not None and record.seen <= state.seen:
            return []  # no heartbeat since the last call
        self.newest = max(self.newest, record.seen)
        read = self._read(record.data)
        started = record.data.get("started")
        if state is None:
            self.gateways[record.key] = _Gateway(record.seen, started, read or {})
            return []  # a baseline: what it counted before we watched is not ours
        if read is None:  # no stats in this heartbeat: the next one is differenced against the last that had them
            state.seen = record.seen
            return []
        counts = read
        previous = state.counts if started == state.started else {}
        # A series this heartbeat leaves out (malformed, or over MAX_SERIES) keeps its last counts, so when it comes
        # back only its increase is counted, not its whole total again.
        state.seen, state.started, state.counts = record.seen, started, {**previous, **counts}
        tables: dict[tuple[str, str], list[list[int]]] = {}
        for (source, route, subset), now in counts.items():
            before = previous.get((source, route, subset))
            if before is None or any(b > n for b, n in zip(before, now, strict=True)):
                delta = now  # new, or counted again from 0 since the last heartbeat
            else:
                delta = [n - b for n, b in zip(now, before, strict=True)]
            if not delta[REQUESTS]:
                continue
            arms = tables.setdefault((source, route), [[0] * ARM, [0] * ARM])
            arms[self.subsets.index(subset)] = delta
        kept = sorted(tables.items())
        if len(kept) > MAX_STRATA:  # labels come from the config, but a gateway's heartbeat is not to be trusted
            rest = [[0] * ARM, [0] * ARM]
            for _, arms in kept[MAX_STRATA - 1 :]:
                for total, arm in zip(rest, arms, strict=True):
                    total[:] = [a + b for a, b in zip(total, arm, strict=True)]
            kept = [*kept[: MAX_STRATA - 1], (OTHER, rest)]
        return [Stratum(source, route, tuple(primary), tuple(canary)) for (source, route), (primary, canary) in kept]

    def _read(self, data: Mapping[str, Any]) -> dict[tuple[str, str, str], list[int]] | None:
        """The service's series in a heartbeat; None when it carries no readable stats at all."""
        stats = data.get("stats")
        series = stats.get("series") if isinstance(stats, dict) else None
        if not isinstance(series, list):
            return None
        found: dict[tuple[str, str, str], list[int]] = {}
        for item in series[:MAX_SERIES]:
            if not isinstance(item, dict):
                continue
            labels = item.get("labels")
            if not (isinstance(labels, list) and len(labels) == 5 and all(isinstance(x, str) for x in labels)):
                continue
            reporter, source, destination, subset, route = labels
            if reporter != "destination" or destination != self.service or subset not in self.subsets:
                continue
            if len(source) > MAX_LABEL or len(route) > MAX_LABEL:
                continue
            counts = arm_counts(item, self.failures)
            if counts is not None:
                have = found.get((source, route, subset))
                found[(source, route, subset)] = (
                    counts if have is None else [a + b for a, b in zip(have, counts, strict=True)]
                )
        return found
