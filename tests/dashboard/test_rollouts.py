"""The automated canary rollout driver (`dashboard.rollout.driver.Rollouts`) and its API, on a real store.

Driver tests build `Rollouts` over a real SQLite store (and etcd for the restart), with the operator API's own
commit path and a fake clock, write synthetic owner-gateway heartbeats with `put_gateway` (cumulative
`stats.series` items, as gateways send them), and call `step()` one tick at a time. Webhooks go to real HTTP servers
on 127.0.0.1 that check the HMAC signature. The API tests go through a real uvicorn-served dashboard (`dash`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from dashboard.api.auth import Auth
from dashboard.api.bodies import MAX_OPERATOR_REASON
from dashboard.api.operator import OperatorApi
from dashboard.errors import ApiError
from dashboard.rollout import driver, signals
from dashboard.rollout.driver import LEASE, Rollouts, split_of
from dashboard.rollout.judge import ARM, FIRST_BUCKET, Tick
from dashboard.rollout.signals import Increments
from dashboard.rollout.spec import Rollout, RolloutSpec
from dashboard.rollout.webhooks import MAX_QUEUED, SIGNATURE, Webhooks
from dashboard.store import open_store
from dashboard.store.model import GatewayRecord, Store
from tests.dashboard.dashboards import Dashboard, mesh

pytestmark = pytest.mark.anyio

SECRET = b"rollout-webhook-secret"
SERVICE = "catalog"
SOURCES = ("web", "api")
PER_BEAT = 20_000  # requests per heartbeat to the service: counts are numbers in JSON, not real requests
BUCKETS = ARM - FIRST_BUCKET
LATENCY = {6: 0.5, 7: 0.5}  # bucket index -> share: half the requests in each of two buckets


class Clock:
    """The driver's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Gateway:
    """One gateway of the owner group `shop`: cumulative destination series for catalog's subsets, as its heartbeats
    carry them. `failures` is each subset's share of 503 answers."""

    def __init__(self, store: Store, instance: str = "gw-1") -> None:
        self.store = store
        self.instance = instance
        self.items: dict[tuple[str, str], dict[str, Any]] = {}
        self.failures: dict[str, float] = {}

    def count(self, subset: str, requests: int) -> None:
        for source in SOURCES:
            n = requests // len(SOURCES)
            item = self.items.setdefault(
                (source, subset),
                {"labels": ["destination", source, SERVICE, subset, "default"], "codes": {}, "buckets": [0] * BUCKETS},
            )
            failed = round(n * self.failures.get(subset, 0.0))
            codes = item["codes"]
            codes["200"] = codes.get("200", 0) + n - failed
            if failed:
                codes["503"] = codes.get("503", 0) + failed
            counted = 0
            for index, share in LATENCY.items():
                part = round(n * share)
                item["buckets"][index] += part
                counted += part
            item["buckets"][min(LATENCY)] += n - counted

    async def beat(self, now: float, split: dict[str, int] | None) -> None:
        """Count one heartbeat's traffic, shared by `split`, and store the heartbeat seen at `now`."""
        for subset, weight in (split or {}).items():
            self.count(subset, PER_BEAT * weight // 100)
        series = [json.loads(json.dumps(item)) for item in self.items.values()]
        data = {"started": 1.0, "stats": {"series": series}}
        await self.store.put_gateway(GatewayRecord(self.instance, "shop", data, now))


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1: answers `status`, keeps each request's body and whether its signature held."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.status = 200
        self.received: list[tuple[dict[str, Any], bool]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def events(self) -> list[str]:
        return [body.get("event", "") for body, _ in self.received]


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        signed = hmac.compare_digest(self.headers.get(SIGNATURE, ""), expected)
        self.server.received.append((json.loads(body), signed))
        self.send_response(self.server.status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()  # bound and listening once constructed: ready before the thread starts
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(str(tmp_path / "data"))
    await opened.commit(mesh(), author="test", reason="seed", action="config.seed", target="mesh")
    yield opened
    await opened.close()


class Harness:
    """A driver over `store`, the operator API that commits for it, a fake clock and the owner gateway."""

    def __init__(self, store: Store, webhooks: Webhooks | None = None) -> None:
        self.store = store
        self.clock = Clock()
        self.operator = OperatorApi(store, Auth([]))
        self.webhooks = webhooks or Webhooks(SECRET, allow=["127.0.0.1"])
        self.rollouts = self.driver()
        self.gateway = Gateway(store)

    def driver(self) -> Rollouts:
        return Rollouts(self.store, commit=self.operator.commit_split, clock=self.clock, webhooks=self.webhooks)

    async def split(self) -> dict[str, int]:
        found = split_of((await self.store.current()).mesh, SERVICE)
        assert found is not None
        return found

    async def start(self, **spec: Any) -> Rollout:
        await self.gateway.beat(self.clock.now, await self.split())
        settings: dict[str, Any] = {"primary": "v1", "canary": "v2", "steps": (5, 10, 25, 50), "interval": 2.0}
        return await self.rollouts.start(SERVICE, RolloutSpec(**{**settings, **spec}), "alice", "v2 canary")

    async def tick(self, traffic: bool = True, rollouts: Rollouts | None = None) -> Rollout:
        """Two seconds on: a heartbeat with the live split's traffic (unless `traffic` is off), then a tick."""
        self.clock.now += 2.0
        if traffic:
            await self.gateway.beat(self.clock.now, await self.split())
        await (rollouts or self.rollouts).step()
        found = await self.rollouts.get(SERVICE)
        assert found is not None
        return found

    async def decisions(self, rollout: Rollout) -> list[dict[str, Any]]:
        return [entry for _, entry in await self.rollouts.decisions(rollout.id, limit=500)]


@pytest.fixture
async def harness(sqlite: Store) -> AsyncIterator[Harness]:
    made = Harness(sqlite)
    yield made
    await made.webhooks.close()


async def until_received(receiver: Receiver, event: str, deadline: float = 5.0) -> dict[str, Any]:
    """Poll the receiver until `event` arrived (the events queue is sent by `Webhooks.run`)."""
    with anyio.fail_after(deadline):
        while True:
            for body, signed in receiver.received:
                if body.get("event") == event:
                    assert signed, "the event's signature does not verify"
                    return body
            await anyio.sleep(0.02)


# 1. A healthy canary


async def test_a_healthy_canary_steps_up_through_every_step_and_is_promoted(harness: Harness) -> None:
    rollout = await harness.start()
    assert await harness.split() == {"v1": 95, "v2": 5}
    weights = [5]
    for _ in range(30):
        rollout = await harness.tick()
        split = await harness.split()
        assert split["v2"] == rollout.expected["v2"] == rollout.weight or rollout.phase == "promoted"
        if split["v2"] != weights[-1]:
            weights.append(split["v2"])
        if not rollout.active:
            break
    assert rollout.phase == "promoted", rollout.message
    assert weights == [5, 10, 25, 50, 100]
    assert rollout.new_primary == "v2" and rollout.weight == 100 and rollout.ended is not None
    current = await harness.store.current()
    assert current.mesh["services"][SERVICE]["subsets"].keys() == {"v1", "v2"}, "the old primary stays defined"
    assert await harness.split() == {"v1": 0, "v2": 100}
    authors = [revision.author for revision in await harness.store.history(50) if revision.author != "test"]
    assert authors and set(authors) == {f"rollout:{rollout.id}"}
    assert len(authors) == 5  # the start, three steps, the promotion
    audit = await harness.store.audit(100)
    started = [(entry.who, entry.target) for entry in audit if entry.action == "rollout.start"]
    assert started == [("alice", "services/catalog/rollout")]
    by_rollout = [(entry.who, entry.target) for entry in audit if entry.action == "rollout.start.weights"]
    assert by_rollout == [(f"rollout:{rollout.id}", "services/catalog/routes")]
    actions = [entry["action"] for entry in await harness.decisions(rollout)]
    assert actions[0] == "start" and actions.count("step") == 3 and actions[-1] == "promote"


# 2. A harmful canary


async def test_a_harmful_canary_is_rolled_back_at_once(harness: Harness) -> None:
    harness.gateway.failures["v2"] = 0.30
    rollout = await harness.start(interval=600.0)
    for _ in range(3):
        rollout = await harness.tick()
        if not rollout.active:
            break
    assert rollout.phase == "rolled_back", rollout.message
    assert harness.clock.now - rollout.started < 600.0, "before the interval"
    assert await harness.split() == {"v1": 100, "v2": 0}
    decision = (await harness.decisions(rollout))[-1]
    assert decision["action"] == "rollback"
    verdict = decision["verdict"]
    assert verdict["outcome"] == "harm" and verdict["evidence"] >= verdict["threshold"] == 100
    errors = next(finding for finding in verdict["findings"] if finding["name"] == "errors")
    canary_requests, canary_failed = errors["canary"]
    assert canary_requests > 0 and canary_failed / canary_requests == pytest.approx(0.30, abs=0.01)
    assert errors["primary"][1] == 0
    message = decision["message"]
    assert message.startswith("rolled back at 5 %: roll back: the canary is worse on failures")
    assert "\n" not in message and message.count(". ") == 0


# 3. A manual weight change


async def test_a_manual_weight_change_pauses_and_resume_puts_the_step_back(harness: Harness) -> None:
    rollout = await harness.start()
    while rollout.weight < 10:
        rollout = await harness.tick()
    rollout = await harness.tick()  # a tick after the step: the manual change comes later
    version = await harness.operator.commit_split("bob", SERVICE, {"v1": 70, "v2": 30}, "weights.set", "hot fix")
    rollout = await harness.tick()
    assert rollout.phase == "paused"
    assert f"by bob (hot fix) at config version {version}" in rollout.message, rollout.message
    assert await harness.split() == {"v1": 70, "v2": 30}, "a pause leaves the operator's weights alone"
    rollout = await harness.tick()
    assert rollout.phase == "paused" and await harness.split() == {"v1": 70, "v2": 30}
    weight = rollout.weight
    assert f"step {rollout.step + 1} at {weight} %" in rollout.message
    rollout = await harness.rollouts.act(SERVICE, "resume", "bob", "fixed")
    assert await harness.split() == {"v1": 100 - weight, "v2": weight}
    rollout = await harness.tick()
    assert rollout.phase == "progressing" and rollout.weight >= weight, rollout.message
    assert await harness.split() == {"v1": 100 - rollout.weight, "v2": rollout.weight}


async def test_a_route_edit_during_a_rollout_pauses_it_and_its_own_steps_do_not(harness: Harness) -> None:
    """The judge compares like with like: retries, timeouts or route matches edited under a rollout pause it (and
    say who), as a weight change does; the rollout's own weight steps never do."""
    rollout = await harness.start(interval=2.0, steps=(5, 10, 25, 50, 60, 70, 80, 90))
    for _ in range(3):
        rollout = await harness.tick()
    assert rollout.active and rollout.phase != "paused" and rollout.weight > 5, rollout.message  # it stepped
    document = copy.deepcopy((await harness.store.current()).mesh)
    document["services"][SERVICE]["retries"] = {"attempts": 3}
    await harness.store.commit(document, author="carol", reason="more retries", action="config.put", target="mesh")
    rollout = await harness.tick()
    assert rollout.phase == "paused", rollout.message
    assert "routes of catalog" in rollout.message and "by carol (more retries)" in rollout.message
    weight = rollout.weight
    rollout = await harness.rollouts.act(SERVICE, "resume", "carol", "retries are as meant")
    for _ in range(3):
        rollout = await harness.tick()
        assert rollout.phase != "paused", rollout.message
    assert rollout.weight >= weight


# 4. A restart


async def test_a_restarted_driver_replays_the_log_and_goes_on(store: Store) -> None:
    await store.commit(mesh(), author="test", reason="seed", action="config.seed", target="mesh")
    harness = Harness(store)
    try:
        rollout = await harness.start(steps=(5, 10, 25, 50, 60, 70, 80))
        for _ in range(4):
            rollout = await harness.tick()
        assert rollout.active and rollout.weight > 5, rollout.message
        first = harness.rollouts.running[rollout.id].judge
        await store.resign(LEASE, harness.rollouts.holder)  # as the first one's run() does when it stops

        second = harness.driver()  # a fresh process: nothing in memory
        rollout = await harness.tick(rollouts=second)
        log = await store.rollout_log(rollout.id, -1, 1000)
        last_tick = Tick.from_json([entry for _, entry in log if entry["kind"] == "tick"][-1]["tick"])
        expected = first.update(last_tick)  # the first judge, given the tick the second one just judged
        replayed = second.verdict(rollout.id)
        assert replayed is not None
        assert replayed.to_json() == expected.to_json()
        assert replayed.evidence == expected.evidence

        for _ in range(30):
            rollout = await harness.tick(rollouts=second)
            if not rollout.active:
                break
        assert rollout.phase == "promoted", rollout.message
        rows = await second.replay(rollout)
        ticks = [seq for seq, entry in await store.rollout_log(rollout.id, -1, 1000) if entry["kind"] == "tick"]
        assert [row["seq"] for row in rows] == ticks and len(ticks) >= 8
        assert all(row["stored"] == row["replayed"] for row in rows), rows
        assert {row["stored"] for row in rows} >= {"hold", "pass"}
    finally:
        await harness.webhooks.close()


async def test_of_two_replicas_one_drives_and_the_other_takes_over_when_it_stops(store: Store) -> None:
    """Two dashboards on one store: only the lease holder ticks the rollout (its log grows by one entry a tick, not
    two); when it resigns (its run() does on the way out) the other takes the lease and goes on from the log."""
    await store.commit(mesh(), author="test", reason="seed", action="config.seed", target="mesh")
    harness = Harness(store)
    try:
        rollout = await harness.start(interval=3600.0)
        other = harness.driver()
        for _ in range(3):
            harness.clock.now += 2.0
            await harness.gateway.beat(harness.clock.now, await harness.split())
            await harness.rollouts.step()
            await other.step()
        assert harness.rollouts.leading and not other.leading
        ticks = [entry for _, entry in await store.rollout_log(rollout.id, -1, 1000) if entry["kind"] == "tick"]
        assert len(ticks) == 3, "both replicas ticked"
        await store.resign(LEASE, harness.rollouts.holder)
        await harness.tick(rollouts=other)
        assert other.leading
        ticks = [entry for _, entry in await store.rollout_log(rollout.id, -1, 1000) if entry["kind"] == "tick"]
        assert len(ticks) == 4
    finally:
        await harness.webhooks.close()


async def test_a_rollout_of_a_deleted_service_is_aborted(harness: Harness) -> None:
    rollout = await harness.start()
    document = copy.deepcopy((await harness.store.current()).mesh)
    del document["services"][SERVICE]
    document["groups"] = {group: [s for s in names if s != SERVICE] for group, names in document["groups"].items()}
    await harness.store.commit(document, author="bob", reason="retire", action="config.put", target="mesh")
    rollout = await harness.tick(traffic=False)
    assert rollout.phase == "aborted" and "no longer in the config" in rollout.message, rollout.message
    assert (await harness.decisions(rollout))[-1]["action"] == "abort"


# 5. Stale signals


async def test_stale_signals_hold_then_pause_with_an_alert(harness: Harness, receiver: Receiver) -> None:
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(harness.webhooks.run)
        rollout = await harness.start(max_hold=10.0, events=receiver.url)
        await until_received(receiver, "started")
        while rollout.weight < 10:
            rollout = await harness.tick()
        weight = rollout.weight
        stale_messages = []
        for _ in range(20):
            rollout = await harness.tick(traffic=False)
            assert rollout.weight == weight, f"stepped without signals: {rollout.message}"
            assert await harness.split() == {"v1": 100 - weight, "v2": weight}
            if "no fresh signals" in rollout.message:
                stale_messages.append(rollout.message)
            if rollout.phase == "paused":
                break
        assert stale_messages, rollout.message
        assert rollout.phase == "paused" and "(max_hold 10s)" in rollout.message, rollout.message
        held = await until_received(receiver, "held")
        assert held["phase"] == "paused" and held["rollout"] == rollout.id
        rollout = await harness.tick(traffic=False)
        assert rollout.phase == "paused" and rollout.weight == weight
        tasks.cancel_scope.cancel()


# 6. The approval gate and the operator's actions


async def test_promotion_waits_for_approval(harness: Harness) -> None:
    rollout = await harness.start(steps=(50,), approval=True)
    for _ in range(10):
        rollout = await harness.tick()
        if rollout.phase == "awaiting_approval":
            break
    assert rollout.phase == "awaiting_approval", rollout.message
    assert "awaiting approval" in rollout.message
    rollout = await harness.tick()
    assert rollout.phase == "awaiting_approval" and await harness.split() == {"v1": 50, "v2": 50}
    rollout = await harness.rollouts.act(SERVICE, "approve", "carol", "looks fine")
    assert rollout.approved and rollout.phase == "awaiting_approval"
    rollout = await harness.tick()
    assert rollout.phase == "promoted" and await harness.split() == {"v1": 0, "v2": 100}


async def test_promote_is_at_once_and_abort_puts_the_primary_back(harness: Harness) -> None:
    await harness.start()
    rollout = await harness.rollouts.act(SERVICE, "promote", "carol", "")
    assert rollout.phase == "promoted" and rollout.new_primary == "v2"
    assert await harness.split() == {"v1": 0, "v2": 100}
    rollout = await harness.start(primary="v2", canary="v1")
    assert await harness.split() == {"v1": 5, "v2": 95}
    rollout = await harness.tick()
    rollout = await harness.rollouts.act(SERVICE, "abort", "carol", "enough")
    assert rollout.phase == "aborted" and not rollout.active
    assert await harness.split() == {"v1": 0, "v2": 100}
    audit = [entry.action for entry in await harness.store.audit(100)]
    assert {"rollout.promote", "rollout.abort"} <= set(audit)


# 7. The gate webhook


async def test_a_gate_answering_503_holds_until_it_answers_2xx(harness: Harness, receiver: Receiver) -> None:
    receiver.status = 503
    rollout = await harness.start(gate=receiver.url)
    for _ in range(6):
        rollout = await harness.tick()
    assert rollout.phase == "holding" and rollout.weight == 5, rollout.message
    assert "the gate webhook answered 503" in rollout.message
    gate = [body for body, _ in receiver.received if body["event"] == "gate"]
    assert gate and all(signed for _, signed in receiver.received)
    receiver.status = 200
    rollout = await harness.tick()
    assert rollout.phase == "progressing" and rollout.weight == 10, rollout.message
    assert await harness.split() == {"v1": 90, "v2": 10}


# 8. Webhooks


async def test_a_rollout_whose_log_fills_up_pauses_for_good(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log is bounded (`MAX_ENTRIES`): at the bound the rollout pauses, writes nothing more, and cannot resume."""
    monkeypatch.setattr(driver, "MAX_ENTRIES", 12)
    await harness.start(interval=3600.0)
    for _ in range(20):
        rollout = await harness.tick()
    assert rollout.phase == "paused" and "log is full" in rollout.message, rollout.message
    written = len(await harness.store.rollout_log(rollout.id))
    assert written <= 12
    await harness.tick()
    assert len(await harness.store.rollout_log(rollout.id)) == written, "a full log grew"
    with pytest.raises(ApiError) as refused:
        await harness.rollouts.act(SERVICE, "resume", "alice", "")
    assert refused.value.status == 409 and "log is full" in str(refused.value)
    aborted = await harness.rollouts.act(SERVICE, "abort", "alice", "done")
    assert aborted.phase == "aborted" and await harness.split() == {"v1": 100, "v2": 0}


def test_a_heartbeat_with_too_many_strata_is_judged_in_at_most_max_strata() -> None:
    """A gateway that sends thousands of (source, route) series (forged labels) makes at most MAX_STRATA tables a
    tick, the rest summed into one, so nothing is lost and a tick's stored size stays bounded."""
    increments = Increments(SERVICE, "shop", ("v1", "v2"), frozenset({14}))

    def beat(seen: float, n: int) -> GatewayRecord:
        series = [
            {
                "labels": ["destination", f"group-{i}", SERVICE, subset, f"route-{i}"],
                "codes": {"200": n, "503": n // 10},
                "buckets": [n + n // 10] + [0] * (BUCKETS - 1),
            }
            for i in range(1000)
            for subset in ("v1", "v2")
        ]
        return GatewayRecord("gw-1", "shop", {"started": 1.0, "stats": {"series": series}}, seen)

    assert increments.take([beat(1.0, 10)]) == []  # the baseline
    strata = increments.take([beat(2.0, 30)])
    assert len(strata) == signals.MAX_STRATA
    assert (strata[-1].source, strata[-1].route) == signals.OTHER
    total = sum(stratum.canary[0] + stratum.primary[0] for stratum in strata)
    assert total == 1000 * 2 * (20 + 2), "requests went missing"
    assert sum(stratum.canary[1] for stratum in strata) == 1000 * 2


async def test_webhooks_are_signed_and_refuse_internal_addresses(receiver: Receiver) -> None:
    closed = Webhooks(SECRET)
    try:
        answer = await closed.post(receiver.url, {"event": "x"})
        assert not answer.ok and answer.text.startswith("refused: ") and "loopback" in answer.text
        answer = await closed.post("http://169.254.169.254/latest/meta-data", {"event": "x"})
        assert not answer.ok and "cloud metadata" in answer.text
        assert receiver.received == []
    finally:
        await closed.close()
    allowed = Webhooks(SECRET, allow=["127.0.0.1"])
    try:
        answer = await allowed.post(receiver.url, {"event": "signed", "n": 1})
        assert answer.ok and answer.text == "answered 200"
        assert receiver.received == [({"event": "signed", "n": 1}, True)]
        answer = await allowed.post("http://169.254.169.254/", {"event": "x"})
        assert not answer.ok and answer.text.startswith("refused: ")
    finally:
        await allowed.close()
    forged = Webhooks(b"another secret", allow=["127.0.0.1"])
    try:
        assert (await forged.post(receiver.url, {"event": "forged"})).ok
        assert receiver.received[-1] == ({"event": "forged"}, False), "the receiver tells a wrong signature"
    finally:
        await forged.close()


async def test_a_webhook_that_never_answers_times_out() -> None:
    with socket.socket() as silent:  # listens, never accepts or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        webhooks = Webhooks(SECRET, allow=["127.0.0.1"], timeout=0.3)
        try:
            started = time.monotonic()
            answer = await webhooks.post(f"http://127.0.0.1:{silent.getsockname()[1]}/", {"event": "x"})
            elapsed = time.monotonic() - started
        finally:
            await webhooks.close()
    assert not answer.ok and answer.text == "timed out after 0.3 s"
    assert 0.25 <= elapsed < 2.0


@contextlib.asynccontextmanager
async def serve_raw(answer: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> AsyncIterator[str]:
    """The URL of a server on 127.0.0.1 that reads a request head and then answers with `answer(writer)`; at the
    end its connections are closed and their handlers finished."""
    handlers: set[asyncio.Task[None]] = set()

    async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await answer(writer)
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(answering(reader, writer))
        handlers.add(task)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            await task

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_a_gate_answering_a_huge_body_is_read_only_up_to_the_limit() -> None:
    """50 MiB of answer, sent as fast as it goes: the gate's answer is read up to MAX_ANSWER bytes, never held whole."""
    sent = 0

    async def huge(writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (50 << 20))
        chunk = b"x" * (1 << 16)
        while sent < 50 << 20:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)

    webhooks = Webhooks(SECRET, allow=["127.0.0.1"], timeout=5.0)
    async with serve_raw(huge) as url:
        try:
            answer = await webhooks.post(url, {"event": "x"})
        finally:
            await webhooks.close()
    assert answer.ok and answer.text.startswith("answered 200: xxx") and len(answer.text) < 300
    assert sent < 10 << 20, f"{sent} bytes were sent before the gate's answer was cut"


async def test_a_gate_that_drips_its_answer_is_cut_at_the_timeout() -> None:
    """A byte every 0.1 s keeps each read within httpx's per-read timeout; the whole call still ends at `timeout`."""

    async def drip(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
        for _ in range(100_000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.1)  # the hostile server's pace, not synchronisation

    webhooks = Webhooks(SECRET, allow=["127.0.0.1"], timeout=0.5)
    async with serve_raw(drip) as url:
        try:
            started = time.monotonic()
            answer = await webhooks.post(url, {"event": "x"})
            elapsed = time.monotonic() - started
        finally:
            await webhooks.close()
    assert not answer.ok and answer.text == "timed out after 0.5 s"
    assert elapsed < 2.0


async def test_events_are_counted_by_outcome_and_a_full_queue_drops_the_oldest(receiver: Receiver) -> None:
    events = Counter("events", "", ["outcome"], registry=CollectorRegistry())
    webhooks = Webhooks(SECRET, allow=["127.0.0.1"], events=events)
    for i in range(MAX_QUEUED + 2):
        webhooks.event(receiver.url, {"event": "step", "n": i})
    assert events.labels("dropped")._value.get() == 2
    webhooks.event("http://169.254.169.254/latest", {"event": "step"})  # refused: a failed delivery
    sender = asyncio.ensure_future(webhooks.run())
    try:
        with anyio.fail_after(10):
            while events.labels("sent")._value.get() + events.labels("failed")._value.get() < MAX_QUEUED:
                await anyio.sleep(0.02)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        await webhooks.close()
    assert events.labels("sent")._value.get() == MAX_QUEUED - 1 and events.labels("failed")._value.get() == 1
    assert events.labels("dropped")._value.get() == 3  # the queue was full again when the refused one came
    assert [body["n"] for body, _ in receiver.received][:2] == [3, 4]  # the oldest went: 0, 1, then 2


# 9. The API, through a real dashboard

ROLLOUT = "/api/v1/services/catalog/rollout"


@pytest.fixture
def operator(dash: Dashboard) -> Iterator[httpx.Client]:
    with dash.client(dash.token("operator", name="alice")) as client:
        yield client


@pytest.fixture
def viewer(dash: Dashboard) -> Iterator[httpx.Client]:
    with dash.client(dash.token("viewer", name="victor")) as client:
        yield client


def error_of(answer: httpx.Response, status: int) -> str:
    assert answer.status_code == status, answer.text
    reason = answer.json()["error"]
    assert isinstance(reason, str) and "\n" not in reason
    return reason


def test_the_rollout_api(dash: Dashboard, operator: httpx.Client, viewer: httpx.Client) -> None:
    body = {"canary": "v2", "steps": [10, 50], "interval": 30, "reason": "v2 canary"}
    error_of(viewer.post(ROLLOUT, json=body), 403)
    assert operator.get(ROLLOUT).status_code == 404, "the viewer started nothing"
    answer = operator.post(ROLLOUT, json=body)
    assert answer.status_code == 201, answer.text
    started = answer.json()
    assert started["phase"] == "progressing" and started["weight"] == 10 and started["active"] is True
    assert started["spec"]["primary"] == "v1" and started["by"].startswith("alice")
    assert "already has a running rollout" in error_of(operator.post(ROLLOUT, json=body), 409)

    for client in (operator, viewer):
        got = client.get(ROLLOUT)
        assert got.status_code == 200 and got.json()["id"] == started["id"]
        listed = client.get("/api/v1/rollouts")
        assert listed.status_code == 200 and [r["id"] for r in listed.json()["rollouts"]] == [started["id"]]
        decisions = client.get(f"{ROLLOUT}/decisions")
        assert decisions.status_code == 200
        assert [d["action"] for d in decisions.json()["decisions"]] == ["start"]
        replay = client.get(f"{ROLLOUT}/replay")
        assert replay.status_code == 200
        assert replay.json() == {"id": started["id"], "ticks": 0, "same": True, "rows": []}
    for action in ("pause", "resume", "promote", "abort", "approve"):
        error_of(viewer.post(f"{ROLLOUT}/{action}", json={"reason": "no"}), 403)
    assert viewer.get(ROLLOUT).json()["phase"] == "progressing", "the viewer changed nothing"

    paused = operator.post(f"{ROLLOUT}/pause", json={"reason": "lunch"})
    assert paused.status_code == 200 and paused.json()["phase"] == "paused"
    assert "lunch" in paused.json()["message"]
    assert "no rollout action" in error_of(operator.post(f"{ROLLOUT}/explode"), 404)
    aborted = operator.post(f"{ROLLOUT}/abort")
    assert aborted.status_code == 200 and aborted.json()["phase"] == "aborted"
    assert operator.get("/api/v1/services/catalog").json()["weights"] == {"v1": 100, "v2": 0}
    assert "no running rollout" in error_of(operator.post(f"{ROLLOUT}/resume"), 409)

    document = operator.get("/api/v1/openapi.json").json()
    paths = document["paths"]
    for path in (
        "/api/v1/rollouts",
        "/api/v1/services/{name}/rollout",
        "/api/v1/services/{name}/rollout/decisions",
        "/api/v1/services/{name}/rollout/replay",
        "/api/v1/services/{name}/rollout/{action}",
    ):
        assert path in paths, sorted(paths)
    assert "post" in paths["/api/v1/services/{name}/rollout"]
    assert "RolloutBody" in document["components"]["schemas"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param({"canary": "v9"}, "v9", id="unknown-subset"),
        pytest.param({"canary": "v2", "steps": [10, 5]}, "rising", id="steps-not-rising"),
        pytest.param({"canary": "v2", "steps": [10], "step_weight": 10, "max_weight": 50}, "not both", id="both"),
        pytest.param({"canary": "v2", "reason": "x" * (MAX_OPERATOR_REASON + 1)}, "reason", id="huge-reason"),
        pytest.param({"canary": "v2", "gate": "https://user:pw@hooks.example/"}, "credentials", id="url-credentials"),
        pytest.param({"canary": "v2", "events": "ftp://hooks.example/"}, "http", id="not-http"),
        pytest.param({"canary": "v2", "interval": 0}, "interval", id="interval-0"),
        pytest.param({"canary": "v2", "gate": "http://hooks.example/\nx"}, "gate", id="url-newline"),
        pytest.param({"canary": "v2", "steps": [10, 100]}, "steps", id="step-100"),
    ],
)
def test_a_bad_rollout_is_refused_with_the_field(
    dash: Dashboard, operator: httpx.Client, body: dict[str, Any], fragment: str
) -> None:
    before = dash.current().version
    assert fragment in error_of(operator.post(ROLLOUT, json=body), 422)
    assert operator.get(ROLLOUT).status_code == 404, "nothing was started"
    assert dash.current().version == before
