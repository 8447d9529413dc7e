"""Issue 14's proof of the canary judge, harmful and quiet canaries (healthy ones: test_canary_judge_healthy.py, a
file of its own so that xdist runs the two in parallel), in the default test run: 100 seeded rollouts per case of
`tests.canary_sim.CASES` (the simulator drives the real `Increments` and `Judge`), each case its own test, against
the issue's numbers. 100 runs cannot tell a 1 % false-rollback rate from 2 %, so each test asks that its count be
consistent with the requirement (`Requirement.consistent`: an exact binomial test at 5 %, e.g. at most 3 of 100
for "<= 1 %", at least 91 for ">= 95 %"; "zero rollbacks" is zero); bench/canary.py checks the figures themselves
on 1,000 runs per case. The seeds are `TEST_SEEDS`; the bench's are others."""

from __future__ import annotations

import pytest

from tests.canary_sim import judged


def test_errors_rising_to_2_percent_are_rolled_back_within_60_s_at_50_canary_rps() -> None:
    case, _ = judged("errors_50cps")
    assert case.scenario.total_rps * case.scenario.weight == 50


def test_errors_rising_to_2_percent_are_rolled_back_within_5_min_at_5_canary_rps() -> None:
    case, _ = judged("errors_5cps")
    assert case.scenario.total_rps * case.scenario.weight == 5


def test_half_the_requests_failing_is_rolled_back_within_10_s() -> None:
    case, outcomes = judged("half_failing")
    assert case.scenario.total_rps * case.scenario.weight >= 5
    rolled_back = [outcome for outcome in outcomes if outcome.harm_at is not None]
    assert all("failures" in outcome.last.sentence for outcome in rolled_back if outcome.last is not None)


def test_a_slower_median_is_detected_within_60_s_at_50_canary_rps() -> None:
    case, outcomes = judged("slower_median")
    assert case.scenario.medians_ms == (5.0, 7.0)
    sentences = [outcome.last.sentence for outcome in outcomes if outcome.harm_at is not None and outcome.last]
    assert sum("slower than" in sentence for sentence in sentences) >= 0.9 * len(sentences)


def test_a_quiet_canary_is_never_rolled_back_and_the_verdict_says_what_it_needs() -> None:
    case, outcomes = judged("quiet")
    assert case.scenario.total_rps * case.scenario.weight == pytest.approx(0.2)
    assert not any(outcome.harm_at is not None for outcome in outcomes)
    for outcome in outcomes:
        verdict = outcome.last
        assert verdict is not None and verdict.outcome == "hold", verdict
        assert verdict.needs is not None and verdict.needs > 0
        assert f"needs ≈ {verdict.needs:,} more canary requests" in verdict.sentence


def test_failures_hidden_by_retries_are_caught_through_first_attempts() -> None:
    case, outcomes = judged("hidden_by_retries")
    worst = [outcome.last.sentence for outcome in outcomes if outcome.harm_at is not None and outcome.last]
    assert all("first-attempt failures" in sentence for sentence in worst)
    # The control: the same canary, judged without first attempts, is not caught: they are what catches it.
    control, _ = judged("hidden_first_attempts_off")
    assert control.scenario is case.scenario and not control.criteria.first_attempts
