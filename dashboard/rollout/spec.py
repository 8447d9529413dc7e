"""What a rollout is asked to do (`RolloutSpec`), and its state as the store keeps it (`Rollout`).

A spec names the service's primary and canary subsets, the canary's weights step by step (`steps`, or Flagger's
`step_weight` and `max_weight`), the least time between two decisions (`interval`), how long a step may hold for
evidence before the rollout pauses and alerts (`max_hold`), the judges (`dashboard.rollout.judge.Criteria`), and the
optional gates: a manual approval before promotion and a webhook that must answer 2xx before each step. Events go
to the `events` webhook. Promotion (100 %) follows the last step.

`Rollout` is the stored document: the spec, the phase, the step and the canary's weight, who started it, what it
last said and why (`message`), the latest verdict, and what it needs to find manual changes (`expected`, the split it
set last). Its `to_json`/`from_json` are the store's form; `data` keeps whatever a newer dashboard added.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from dashboard.rollout.judge import Criteria
from gateway.units import format_duration

ACTIVE = ("progressing", "holding", "awaiting_approval", "paused")
ENDED = ("promoted", "rolled_back", "aborted")
PHASES = (*ACTIVE, *ENDED)
DEFAULT_STEPS = (5, 10, 25, 50)
DEFAULT_INTERVAL = 60.0
DEFAULT_MAX_HOLD = 1800.0
MIN_INTERVAL = 2.0  # a heartbeat's period: no decision is made on less
MAX_STEPS = 20
MAX_DURATION = 7 * 86400.0
MAX_URL = 2048
_ID = re.compile(r"[a-z0-9-]{1,64}")


class SpecError(ValueError):
    """A spec that cannot be run: `str(err)` is one line naming the field and the value."""


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    primary: str
    canary: str
    steps: tuple[int, ...] = DEFAULT_STEPS
    interval: float = DEFAULT_INTERVAL
    max_hold: float = DEFAULT_MAX_HOLD
    criteria: Criteria = field(default_factory=Criteria)
    approval: bool = False
    gate: str | None = None
    events: str | None = None

    def __post_init__(self) -> None:
        if self.primary == self.canary:
            raise SpecError(f"canary: must differ from the primary, both are {self.primary!r}")
        steps = self.steps
        if not steps or len(steps) > MAX_STEPS:
            raise SpecError(f"steps: expected 1 to {MAX_STEPS} canary weights, got {len(steps)}")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 99 for s in steps):
            raise SpecError(f"steps: expected whole percents from 1 to 99 (100 is the promotion), got {list(steps)}")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise SpecError(f"steps: expected rising weights, got {list(steps)}")
        for name in ("interval", "max_hold"):
            value = getattr(self, name)
            if not (math.isfinite(value) and MIN_INTERVAL <= value <= MAX_DURATION):
                bounds = f"{format_duration(MIN_INTERVAL)} to {format_duration(MAX_DURATION)}"
                raise SpecError(f"{name}: expected {bounds}, got {value!r}")
        for name in ("gate", "events"):
            url = getattr(self, name)
            if url is not None:
                check_url(name, url)
        criteria = self.criteria
        if not criteria.enabled() and criteria.max_error_rate is None and criteria.max_p99_ms is None:
            raise SpecError("judges: at least one judge must be on")
        if criteria.max_error_rate is not None and not 0 < criteria.max_error_rate < 1:
            raise SpecError(f"judges.max_error_rate: expected a share between 0 and 1, got {criteria.max_error_rate}")
        if criteria.max_p99_ms is not None and not 0 < criteria.max_p99_ms <= 10_000:
            raise SpecError(f"judges.max_p99_ms: expected milliseconds from 0 to 10000, got {criteria.max_p99_ms}")

    @classmethod
    def stepped(cls, step_weight: int, max_weight: int) -> tuple[int, ...]:
        """Flagger's stepWeight and maxWeight as steps: 10 and 50 are 10, 20, 30, 40, 50."""
        if not 1 <= step_weight <= 99 or not step_weight <= max_weight <= 99:
            raise SpecError(
                f"step_weight, max_weight: expected 1 <= step <= max <= 99, got {step_weight}, {max_weight}"
            )
        return tuple(range(step_weight, max_weight + 1, step_weight))

    def to_json(self) -> dict[str, Any]:
        c = self.criteria
        return {
            "primary": self.primary,
            "canary": self.canary,
            "steps": list(self.steps),
            "interval": self.interval,
            "max_hold": self.max_hold,
            "judges": {
                "errors": c.errors,
                "first_attempts": c.first_attempts,
                "latency": c.latency,
                "max_error_rate": c.max_error_rate,
                "max_p99_ms": c.max_p99_ms,
            },
            "approval": self.approval,
            "gate": self.gate,
            "events": self.events,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutSpec:
        judges = data.get("judges") or {}
        criteria = Criteria(
            errors=bool(judges.get("errors", True)),
            first_attempts=bool(judges.get("first_attempts", True)),
            latency=bool(judges.get("latency", True)),
            max_error_rate=judges.get("max_error_rate"),
            max_p99_ms=judges.get("max_p99_ms"),
        )
        return cls(
            primary=data["primary"],
            canary=data["canary"],
            steps=tuple(data.get("steps", DEFAULT_STEPS)),
            interval=float(data.get("interval", DEFAULT_INTERVAL)),
            max_hold=float(data.get("max_hold", DEFAULT_MAX_HOLD)),
            criteria=criteria,
            approval=bool(data.get("approval", False)),
            gate=data.get("gate"),
            events=data.get("events"),
        )

    def weight(self, step: int) -> int:
        """The canary's weight at step `step`; the step after the last is the promotion."""
        return self.steps[step] if step < len(self.steps) else 100

    def split(self, canary_weight: int) -> dict[str, int]:
        return {self.primary: 100 - canary_weight, self.canary: canary_weight}


def check_url(name: str, url: str) -> None:
    if len(url) > MAX_URL:
        raise SpecError(f"{name}: expected a URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (it raises for a bad port)
    except ValueError as err:
        raise SpecError(f"{name}: not a URL ({err}): {url[:200]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(f"{name}: expected an http:// or https:// URL with a host, got {url[:200]!r}")
    if parts.username or parts.password:
        raise SpecError(f"{name}: credentials in the URL are not kept secret here; use the webhook secret instead")


@dataclass(frozen=True, slots=True)
class Rollout:
    """A rollout as stored. `step` indexes `spec.steps` (len(steps) is the promotion); `expected` is the split the
    rollout set last, so a different one is an operator's change."""

    id: str
    service: str
    spec: RolloutSpec
    phase: str
    step: int
    weight: int
    by: str
    started: float
    step_started: float
    updated: float
    message: str
    expected: dict[str, int]
    reason: str = ""
    ended: float | None = None
    held_since: float | None = None
    approved: bool = False
    alerted: bool = False  # the max-hold alert went out for this hold
    paused_from: str | None = None  # the phase a pause interrupted
    new_primary: str | None = None
    verdict: dict[str, Any] | None = None
    ticks: int = 0  # log entries so far (ticks and decisions): the next entry's number
    routing: str = ""  # the service's routing when the rollout started or resumed (driver.routing_of)
    revision: int = 0  # the store's, not part of the document

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.id):
            raise ValueError(f"rollout id: expected [a-z0-9-]{{1,64}}, got {self.id!r}")
        if self.phase not in PHASES:
            raise ValueError(f"phase: expected one of {', '.join(PHASES)}, got {self.phase!r}")

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "service": self.service,
            "spec": self.spec.to_json(),
            "phase": self.phase,
            "step": self.step,
            "steps": len(self.spec.steps),
            "weight": self.weight,
            "by": self.by,
            "reason": self.reason,
            "started": self.started,
            "step_started": self.step_started,
            "updated": self.updated,
            "ended": self.ended,
            "held_since": self.held_since,
            "approved": self.approved,
            "alerted": self.alerted,
            "paused_from": self.paused_from,
            "message": self.message,
            "expected": dict(self.expected),
            "new_primary": self.new_primary,
            "verdict": self.verdict,
            "ticks": self.ticks,
            "routing": self.routing,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], revision: int = 0) -> Rollout:
        return cls(
            id=data["id"],
            service=data["service"],
            spec=RolloutSpec.from_json(data["spec"]),
            phase=data["phase"],
            step=int(data["step"]),
            weight=int(data["weight"]),
            by=str(data.get("by", "")),
            reason=str(data.get("reason", "")),
            started=float(data["started"]),
            step_started=float(data["step_started"]),
            updated=float(data["updated"]),
            ended=data.get("ended"),
            held_since=data.get("held_since"),
            approved=bool(data.get("approved", False)),
            alerted=bool(data.get("alerted", False)),
            paused_from=data.get("paused_from"),
            message=str(data.get("message", "")),
            expected={str(k): int(v) for k, v in (data.get("expected") or {}).items()},
            new_primary=data.get("new_primary"),
            verdict=data.get("verdict"),
            ticks=int(data.get("ticks", 0)),
            routing=str(data.get("routing", "")),
            revision=revision,
        )

    def but(self, **changes: Any) -> Rollout:
        return replace(self, **changes)


def weights_text(split: Mapping[str, int], order: Sequence[str] = ()) -> str:
    """`v1 90 %, v2 10 %`, in `order` first."""
    names = [name for name in order if name in split] + sorted(name for name in split if name not in order)
    return ", ".join(f"{name} {split[name]} %" for name in names)
