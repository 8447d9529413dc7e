"""Unit tests of endpoint state and the balancing policies: peak-EWMA, P2C, outlier ejection, Maglev. No I/O."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from gateway.balancer import DEFAULT_RTT, MAX_EJECTION, Balancer, Endpoint, maglev_table
from gateway.config import Outlier
from gateway.units import Address
from gateway.upstream import Pool

NOW = 1000.0  # a loop.time()-like clock value; any monotonic origin works


def endpoint(n: int, host: str = "10.0.0.1") -> Endpoint:
    address = Address(host, 9000 + n)
    return Endpoint(address, Pool(address))


def endpoints(count: int) -> list[Endpoint]:
    return [endpoint(i) for i in range(count)]


def balancer(
    eps: list[Endpoint],
    policy: str = "ewma",
    consecutive_5xx: int = 5,
    base_ejection: float = 30.0,
    max_ejected: float = 0.10,
    hash_header: str | None = None,
) -> Balancer:
    outlier = Outlier(consecutive_5xx=consecutive_5xx, base_ejection=base_ejection, max_ejected=max_ejected)
    return Balancer(eps, policy, outlier, hash_header)


def pick(b: Balancer, now: float = NOW, avoid: Endpoint | None = None, key: bytes | None = None) -> Endpoint:
    chosen = b.pick(now, avoid, key)
    assert chosen is not None
    return chosen


def counts(b: Balancer, n: int, now: float = NOW) -> Counter[Endpoint]:
    return Counter(pick(b, now) for _ in range(n))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(20240601)


# peak-EWMA


def test_new_endpoint_starts_at_default_cost() -> None:
    assert endpoint(0).cost == DEFAULT_RTT


def test_observe_takes_a_peak_at_once() -> None:
    ep = endpoint(0)
    ep.observe(0.010, NOW)
    assert ep.cost == pytest.approx(0.010, rel=1e-3)  # long since the (zero) stamp: the old cost has decayed away
    ep.observe(0.500, NOW + 0.001)
    assert ep.cost == 0.500  # a higher RTT replaces the estimate immediately, however little time has passed


def test_observe_decays_toward_lower_rtts_over_time() -> None:
    ep = endpoint(0)
    ep.observe(0.500, NOW)
    ep.observe(0.010, NOW + 1.0)
    after_one_second = ep.cost
    # one second into a 10 s decay window: mostly the old peak still, but lower
    weight = math.exp(-1.0 / 10.0)
    assert after_one_second == pytest.approx(0.500 * weight + 0.010 * (1 - weight))
    assert 0.010 < after_one_second < 0.500
    # further low observations keep lowering it, monotonically, toward the new RTT
    previous = after_one_second
    for second in range(2, 60):
        ep.observe(0.010, NOW + second)
        assert 0.010 < ep.cost < previous
        previous = ep.cost
    assert ep.cost < 0.012


def test_observe_decays_more_after_a_longer_gap() -> None:
    soon, late = endpoint(0), endpoint(1)
    for ep in (soon, late):
        ep.observe(0.400, NOW)
    soon.observe(0.010, NOW + 0.1)
    late.observe(0.010, NOW + 30.0)
    assert late.cost < soon.cost < 0.400
    assert soon.cost > 0.39  # 100 ms is 1 % of the window: a single fast reply barely moves a peak


def test_ewma_prefers_the_cheaper_of_two_always() -> None:
    fast, slow = endpoints(2)
    fast.observe(0.001, NOW)
    slow.observe(0.050, NOW)
    b = balancer([slow, fast])
    assert counts(b, 500) == {fast: 500}  # with two endpoints both are always sampled: no randomness left


def test_ewma_one_slow_response_does_not_starve_an_endpoint_forever() -> None:
    """A peak must decay with time even while the endpoint gets no traffic, as in linkerd2-proxy (tower's
    PeakEwma decays the estimate whenever the cost is read). Otherwise the endpoint with the highest cost
    loses every P2C comparison, is never picked, never observed again, and keeps its peak for ever.

    Simulated: three endpoints; `slow` answered one request in 10 ms, the others answer in 1 ms. From then on
    every endpoint answers in 1 ms. Within 12 decay windows (120 s) `slow` must be picked again, and once it
    is, it must get a real share again (a third when the costs are equal).
    """
    slow, fast1, fast2 = endpoints(3)
    slow.observe(0.010, NOW)
    fast1.observe(0.001, NOW)
    fast2.observe(0.001, NOW)
    b = balancer([slow, fast1, fast2])
    picks: list[tuple[float, Endpoint]] = []
    for step in range(1, 1201):
        now = NOW + step * 0.1
        chosen = pick(b, now)
        chosen.active += 1
        chosen.observe(0.001, now + 0.001)
        chosen.active -= 1
        picks.append((now, chosen))
    first = next((now for now, ep in picks if ep is slow), None)
    assert first is not None, "the endpoint with one slow response was never picked again in 120 s"
    late = Counter(ep for now, ep in picks if now >= first + 10.0)
    assert late[slow] / sum(late.values()) > 0.1


def test_ewma_p2c_prefers_lower_cost_statistically() -> None:
    cheap, middle, dear = endpoints(3)
    cheap.observe(0.001, NOW)
    middle.observe(0.010, NOW)
    dear.observe(0.100, NOW)
    b = balancer([dear, middle, cheap])
    seen = counts(b, 6000)
    # P2C over 3: the cheapest wins both pairs it is in (2/3), the middle one wins 1 pair (1/3), the dearest none
    assert seen[dear] == 0
    assert abs(seen[cheap] / 6000 - 2 / 3) < 0.03
    assert abs(seen[middle] / 6000 - 1 / 3) < 0.03


def test_ewma_cost_accounts_for_requests_in_flight() -> None:
    a, b_ = endpoints(2)
    a.observe(0.010, NOW)
    b_.observe(0.010, NOW)
    a.active = 5  # same latency, but a is busy: cost * (active + 1)
    b = balancer([a, b_])
    assert counts(b, 200) == {b_: 200}
    # latency can outweigh load: a is 5x busier but 20x faster
    a.cost, b_.cost = 0.001, 0.020
    assert counts(b, 200) == {a: 200}


# least_request, round_robin


def test_least_request_prefers_fewer_active() -> None:
    idle, some, busy = endpoints(3)
    idle.active, some.active, busy.active = 0, 3, 10
    b = balancer([busy, some, idle], policy="least_request")
    seen = counts(b, 6000)
    assert seen[busy] == 0
    assert seen[idle] > seen[some] > 0
    assert abs(seen[idle] / 6000 - 2 / 3) < 0.03


def test_least_request_two_endpoints_is_deterministic() -> None:
    a, c = endpoints(2)
    a.active = 2
    b = balancer([a, c], policy="least_request")
    assert counts(b, 100) == {c: 100}


def test_round_robin_cycles() -> None:
    eps = endpoints(4)
    b = balancer(eps, policy="round_robin")
    picks = [pick(b) for _ in range(40)]
    for i in range(0, 40, 4):
        assert set(picks[i : i + 4]) == set(eps)  # every endpoint once per cycle
    assert picks[:4] == picks[4:8]  # in a fixed order
    assert Counter(picks) == dict.fromkeys(eps, 10)


# avoid


@pytest.mark.parametrize("policy", ["ewma", "least_request", "round_robin", "hash"])
def test_pick_avoids_the_previous_endpoint(policy: str) -> None:
    eps = endpoints(3)
    b = balancer(eps, policy=policy, hash_header="x-user" if policy == "hash" else None)
    for i in range(300):
        avoid = eps[i % 3]
        key = b"user-%d" % i if policy == "hash" else None
        assert pick(b, avoid=avoid, key=key) is not avoid


def test_pick_avoid_when_it_is_the_cheapest() -> None:
    fast, slow = endpoints(2)
    fast.observe(0.001, NOW)
    slow.observe(0.500, NOW)
    b = balancer([fast, slow])
    assert pick(b) is fast
    assert all(pick(b, avoid=fast) is slow for _ in range(50))


def test_pick_avoid_with_one_endpoint_returns_it() -> None:
    only = endpoint(0)
    for policy in ("ewma", "least_request", "round_robin"):
        assert pick(balancer([only], policy=policy), avoid=only) is only


def test_pick_with_no_endpoints_is_none() -> None:
    for policy in ("ewma", "least_request", "round_robin"):
        assert balancer([], policy=policy).pick(NOW) is None


# passive outlier ejection


def fail(b: Balancer, ep: Endpoint, times: int, now: float = NOW) -> None:
    for _ in range(times):
        b.record(ep, True, now)


def test_ejected_after_consecutive_failures() -> None:
    bad, good, other = endpoints(3)
    b = balancer([bad, good, other], consecutive_5xx=5, base_ejection=30.0)
    fail(b, bad, 4)
    assert bad.available(NOW)
    assert bad in counts(b, 300)
    fail(b, bad, 1)
    assert not bad.available(NOW)
    assert bad.ejected_until == NOW + 30.0
    assert bad not in counts(b, 300, NOW + 1)
    assert bad not in counts(b, 300, NOW + 29.9)
    # back once the ejection is over, without any explicit refresh
    assert bad.available(NOW + 30.0)
    assert bad in counts(b, 300, NOW + 30.0)


def test_success_resets_the_failure_count() -> None:
    bad, good = endpoints(2)
    b = balancer([bad, good], consecutive_5xx=5)
    for _ in range(10):
        fail(b, bad, 4)
        b.record(bad, False, NOW)
    assert bad.available(NOW)
    assert bad.ejections == 0


@pytest.mark.parametrize(
    ("consecutive_5xx", "base_ejection", "durations"),
    [
        pytest.param(5, 10.0, [10.0, 20.0, 30.0, 40.0], id="grows-with-repeats"),
        pytest.param(1, 100.0, [100.0, 200.0] + [MAX_EJECTION] * 4, id="is-capped"),
    ],
)
def test_ejection_time(consecutive_5xx: int, base_ejection: float, durations: list[float]) -> None:
    bad, good, other = endpoints(3)
    b = balancer([bad, good, other], consecutive_5xx=consecutive_5xx, base_ejection=base_ejection)
    now = NOW
    seen = []
    for _ in durations:
        fail(b, bad, consecutive_5xx, now)
        assert not bad.available(now)
        seen.append(bad.ejected_until - now)
        now = bad.ejected_until  # ejection over; it fails again at once
        assert bad.available(now)
    assert seen == durations


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    bad, good, other = endpoints(3)
    b = balancer([bad, good, other], consecutive_5xx=5, base_ejection=10.0)
    fail(b, bad, 5)
    until = bad.ejected_until
    fail(b, bad, 20, NOW + 1)  # in-flight requests finishing badly during the ejection
    assert bad.ejected_until == until
    assert bad.ejections == 1


def test_at_least_one_may_be_ejected_whatever_max_ejected_says() -> None:
    first, second, third = endpoints(3)
    b = balancer([first, second, third], consecutive_5xx=5, max_ejected=0.10)  # 10 % of 3 rounds to 0
    fail(b, first, 5)
    fail(b, second, 5)
    assert not first.available(NOW)
    assert second.available(NOW)  # the share is used up by `first`
    assert {ep for ep in counts(b, 300)} == {second, third}


def test_max_ejected_share_is_honoured() -> None:
    eps = endpoints(10)
    b = balancer(eps, consecutive_5xx=3, max_ejected=0.30)
    for ep in eps:
        fail(b, ep, 3)
    ejected = [ep for ep in eps if not ep.available(NOW)]
    assert len(ejected) == 3
    assert ejected == eps[:3]
    # once the first ejections end, others may be ejected
    later = eps[0].ejected_until
    fail(b, eps[5], 3, later)
    assert not eps[5].available(later)


def test_eject_one_of_two() -> None:
    bad, good = endpoints(2)
    b = balancer([bad, good], consecutive_5xx=5)
    fail(b, bad, 5)
    assert not bad.available(NOW)
    # 1 of 2 left is not below the 50 % panic threshold: all traffic goes to the good one
    assert counts(b, 200, NOW + 1) == {good: 200}


# panic mode


def test_panic_mode_when_too_few_are_available() -> None:
    eps = endpoints(4)
    b = balancer(eps, policy="round_robin")
    eps[0].healthy = eps[1].healthy = False
    b.invalidate()
    # 2 of 4 available: exactly the threshold, no panic
    assert set(counts(b, 100)) == {eps[2], eps[3]}
    eps[2].healthy = False
    b.invalidate()
    # 1 of 4 available: below half, so balance over everyone rather than crush the last one
    assert counts(b, 100) == dict.fromkeys(eps, 25)
    for ep in eps:
        ep.healthy = False
    b.invalidate()
    assert set(counts(b, 100)) == set(eps)


def test_unhealthy_endpoint_is_skipped() -> None:
    eps = endpoints(3)
    b = balancer(eps, policy="least_request")
    eps[1].healthy = False
    b.invalidate()
    assert set(counts(b, 300)) == {eps[0], eps[2]}
    eps[1].healthy = True
    b.invalidate()
    assert set(counts(b, 300)) == set(eps)


# Maglev consistent hashing


def test_maglev_table_spreads_evenly() -> None:
    for n in (1, 2, 3, 5, 7, 10, 20):
        table = maglev_table(endpoints(n))
        assert len(table) == 5003
        shares = Counter(table)
        assert set(shares) == set(range(n))
        assert max(shares.values()) - min(shares.values()) <= 1  # Maglev fills one slot per endpoint per round


def test_maglev_minimal_disruption_when_one_endpoint_is_removed() -> None:
    eps = [endpoint(i, host=f"10.1.0.{i}") for i in range(10)]
    removed = eps[4]
    rest = eps[:4] + eps[5:]
    before = [eps[i].address for i in maglev_table(eps)]
    after = [rest[i].address for i in maglev_table(rest)]
    stayed = [a == b for a, b in zip(before, after, strict=True) if a != removed.address]
    assert sum(stayed) / len(stayed) > 0.95  # keys of the other endpoints (nearly) all stay where they were
    moved_to = Counter(b for a, b in zip(before, after, strict=True) if a == removed.address)
    assert len(moved_to) >= 5  # the removed endpoint's keys spread over the others, not onto one


def test_maglev_table_depends_on_addresses_not_objects() -> None:
    a = [endpoint(i) for i in range(5)]
    b = [endpoint(i) for i in range(5)]
    assert maglev_table(a) == maglev_table(b)


def test_hashed_pick_is_stable_for_the_same_key() -> None:
    eps = endpoints(5)
    b = balancer(eps, policy="hash", hash_header="x-user")
    homes = {}
    for user in range(200):
        key = b"user-%d" % user
        home = pick(b, key=key)
        assert all(pick(b, key=key) is home for _ in range(10))
        homes[key] = home
    spread = Counter(homes.values())
    assert set(spread) == set(eps)
    assert min(spread.values()) >= 20  # 200 keys over 5 endpoints: 40 each on average
    # a new balancer for the same endpoints (a config reload) keeps every key at home
    again = balancer(endpoints(5), policy="hash", hash_header="x-user")
    assert all(pick(again, key=key).address == home.address for key, home in homes.items())


def test_hashed_keys_move_off_an_ejected_endpoint_and_come_back() -> None:
    eps = endpoints(4)
    b = balancer(eps, policy="hash", hash_header="x-user", consecutive_5xx=1, max_ejected=0.5)
    homes = {b"user-%d" % u: pick(b, key=b"user-%d" % u) for u in range(100)}
    victim = eps[0]
    fail(b, victim, 1)
    assert not victim.available(NOW)
    for key, home in homes.items():
        chosen = pick(b, NOW + 1, key=key)
        assert chosen is not victim
        if home is not victim:
            assert chosen is home  # only the ejected endpoint's keys move
    back = victim.ejected_until
    assert all(pick(b, back, key=key) is home for key, home in homes.items())


def test_hash_policy_without_a_key_still_balances() -> None:
    eps = endpoints(3)
    b = balancer(eps, policy="hash", hash_header="x-user")
    assert set(counts(b, 30)) == set(eps)
