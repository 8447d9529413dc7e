"""Unit tests of the retry decision (`routing.RetryPolicy`) and the retry budget it consults (`ServiceLoad`). No I/O.

The exchange asks the policy after every failed try; these are the rules it applies, one at a time: which statuses
satisfy which `retries.on` condition, how many tries, which requests may be sent twice, the deadline, and the
Linkerd-style budget over a sliding window.
"""

from __future__ import annotations

import pytest

from gateway.config import Retries
from gateway.routing import (
    BUDGET_EXHAUSTED,
    MIN_RETRIES_PER_SECOND,
    NO_RETRY,
    RETRY,
    RETRY_WINDOW,
    RetryPolicy,
    ServiceLoad,
)

TICK = 0.5  # the sweep's interval: the window holds RETRY_WINDOW / TICK ticks


def policy(
    on: frozenset[str] = frozenset({"connect-failure", "reset", "gateway-error"}),
    attempts: int = 2,
    statuses: frozenset[int] = frozenset(),
    budget: float = 0.2,
    load: ServiceLoad | None = None,
) -> RetryPolicy:
    return RetryPolicy(Retries(attempts=attempts, on=on, statuses=statuses, budget=budget), load or ServiceLoad(TICK))


def decide(p: RetryPolicy, condition: str = "gateway-error", **overrides: object) -> str:
    arguments: dict[str, object] = {
        "tries": 1,
        "method": b"GET",
        "replayable": True,
        "nothing_sent": False,
        "time_left": 1.0,
    }
    arguments.update(overrides)
    return p.decide(condition, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("on", "status", "condition"),
    [
        ({"gateway-error"}, 502, "gateway-error"),
        ({"gateway-error"}, 503, "gateway-error"),
        ({"gateway-error"}, 504, "gateway-error"),
        ({"gateway-error"}, 500, ""),  # not a gateway error
        ({"5xx"}, 500, "5xx"),
        ({"5xx", "gateway-error"}, 503, "5xx"),  # the broader condition is named first
        ({"5xx"}, 404, ""),
        ({"connect-failure", "reset"}, 503, ""),  # conditions of failures, not of statuses
    ],
)
def test_a_status_satisfies_the_conditions_listed_in_retries_on(on: set[str], status: int, condition: str) -> None:
    assert policy(on=frozenset(on)).condition(status) == condition


def test_retriable_status_names_exact_statuses() -> None:
    p = policy(on=frozenset({"retriable-status"}), statuses=frozenset({409, 429}))
    assert [p.condition(status) for status in (409, 429, 430, 503)] == ["retriable-status", "retriable-status", "", ""]


def test_a_failure_is_retried_until_the_attempts_are_used() -> None:
    p = policy(attempts=2)
    assert [decide(p, tries=tries) for tries in (1, 2, 3)] == [RETRY, RETRY, NO_RETRY]
    assert decide(policy(attempts=0), tries=1) == NO_RETRY


def test_a_condition_not_listed_or_empty_is_not_retried() -> None:
    p = policy(on=frozenset({"connect-failure"}))
    assert decide(p, "reset") == NO_RETRY
    assert decide(p, "") == NO_RETRY
    assert decide(p, "connect-failure") == RETRY


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"])
def test_an_idempotent_request_that_reached_the_upstream_is_retried(method: bytes) -> None:
    assert decide(policy(), method=method) == RETRY


@pytest.mark.parametrize("method", [b"POST", b"PATCH", b"CONNECT"])
def test_a_non_idempotent_request_is_retried_only_when_nothing_was_sent(method: bytes) -> None:
    p = policy(on=frozenset({"gateway-error", "connect-failure"}))
    assert decide(p, method=method, nothing_sent=False) == NO_RETRY
    assert decide(p, "connect-failure", method=method, nothing_sent=True) == RETRY


def test_a_body_no_longer_held_cannot_be_sent_again() -> None:
    assert decide(policy(), method=b"PUT", replayable=False) == NO_RETRY
    assert decide(policy(), method=b"PUT", replayable=False, nothing_sent=True) == RETRY


def test_no_retry_once_the_request_deadline_has_passed() -> None:
    assert decide(policy(), time_left=0.0) == NO_RETRY
    assert decide(policy(), time_left=-0.5) == NO_RETRY
    assert decide(policy(), time_left=0.001) == RETRY


def test_the_budget_allows_its_ratio_of_the_windows_requests_plus_a_floor() -> None:
    load = ServiceLoad(TICK)
    p = policy(budget=0.2, load=load)
    floor = int(MIN_RETRIES_PER_SECOND * RETRY_WINDOW)
    load.requests = 1000
    allowed = 0
    while decide(p) == RETRY:
        load.retries += 1  # what the exchange counts when it retries
        allowed += 1
        assert allowed <= 10_000, "the budget never ran out"
    assert allowed == 0.2 * 1000 + floor
    assert decide(p) == BUDGET_EXHAUSTED
    assert decide(p, tries=5) == NO_RETRY  # the rules refuse first: not counted as the budget's refusal


def test_the_budget_forgets_what_left_the_window() -> None:
    load = ServiceLoad(TICK)
    p = policy(budget=0.0, load=load)
    floor = int(MIN_RETRIES_PER_SECOND * RETRY_WINDOW)
    load.retries = floor
    assert decide(p) == BUDGET_EXHAUSTED
    for _ in range(round(RETRY_WINDOW / TICK) - 1):
        load.tick()
    assert decide(p) == BUDGET_EXHAUSTED, "the retries are still inside the window"
    load.tick()
    assert decide(p) == RETRY, "a whole window later they no longer count"


def test_backoff_is_full_jitter_over_a_doubling_step_capped_at_250_ms() -> None:
    top = [RetryPolicy.backoff(tries, rand=lambda: 1.0) for tries in (1, 2, 3, 4, 5, 10)]
    assert top == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.25, 0.25])
    assert RetryPolicy.backoff(3, rand=lambda: 0.0) == 0.0
    assert RetryPolicy.backoff(2, rand=lambda: 0.5) == pytest.approx(0.025)
