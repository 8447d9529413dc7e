"""Issue 14's proof of the canary judge, healthy canaries: rarely rolled back, at 5, 50 and 500 requests per second
and with twice its share of a slow, failing route. 100 seeded rollouts per case through the real `Increments` and
`Judge`; the method and the assertion (`Requirement.consistent`) are test_canary_judge.py's, which holds the harmful
cases (the two files split the ~70 s of CPU so that xdist runs them in parallel)."""

from __future__ import annotations

import pytest

from tests.canary_sim import judged


@pytest.mark.parametrize("rps", [5, 50, 500])
def test_a_healthy_canary_is_rarely_rolled_back(rps: int) -> None:
    case, _ = judged(f"healthy_{rps}")
    scenario = case.scenario
    assert scenario.total_rps == rps and scenario.weight == 0.10
    assert scenario.errors[0] == scenario.errors[1] and scenario.medians_ms[0] == scenario.medians_ms[1]


def test_twice_the_share_of_a_slow_failing_route_is_not_a_rollback() -> None:
    case, _ = judged("slow_route")
    assert any(route.canary_bias == 2.0 for route in case.scenario.routes)
