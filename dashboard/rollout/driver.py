"""Runs rollouts: each tick, judge every running one on the gateways' latest counts and act on the verdict.

One dashboard replica drives (`Store.lead`: an etcd lease, trivially the only one on SQLite); the others serve the
API, whose actions (start, pause, resume, promote, abort, approve) are writes to the stored rollout that the driver
reads on its next tick. Every `TICK` seconds the driver, for each running rollout:

1. reads the owner gateways' heartbeats (`signals.Increments`) into a `judge.Tick` and folds it into the judge;
2. pauses the rollout if someone else changed the service's weights since the rollout's own last write, or its
   routes, retries or timeouts since it started or resumed (the config history says who), and puts back the
   rollout's weights if its own write did not land;
3. decides (`decide`): roll back at once on harm; when the step's `interval` has passed, step up (or promote) on
   a pass, once the gates agree; hold on lack of evidence or stale signals, and pause with an alert after `max_hold`;
4. writes the tick and any decision to the rollout's log (each decision keeps its verdict, its counts and example
   request IDs from the canary, errors and slow ones first), then the rollout (compare-and-set), then the weights.

The judge holds no state the log does not: after a restart, or when another replica takes over, the driver replays
the rollout's logged ticks into a new judge and goes on where it was. A rollout that another writer changed in
between (a conflict) is dropped from memory and replayed on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dashboard.errors import ApiError, DashboardError
from dashboard.mesh import Mesh
from dashboard.rollout.judge import Judge, Tick, Verdict, replay
from dashboard.rollout.signals import Increments
from dashboard.rollout.spec import Rollout, RolloutSpec, weights_text
from dashboard.rollout.webhooks import Webhooks
from dashboard.signals.history import MeshRules
from dashboard.store.model import MAX_LOG_BATCH, Revision, RolloutConflict, RolloutRecord, Store, StoreError
from gateway.config import ConfigError
from gateway.units import format_duration

log = logging.getLogger("meshgate.rollouts")

TICK = 2.0  # seconds between ticks: a gateway's heartbeat interval
STALE = 10.0  # seconds without an owner gateway's heartbeat before the signals count as stale
LEASE = "rollouts"
LEASE_TTL = 10.0
AUTHOR = "rollout:"  # config commits made by a rollout are authored "rollout:<id>"
ACTIONS = ("pause", "resume", "promote", "abort", "approve")  # what an operator may do to a running rollout
LOG_PAGE = 1000  # log entries read at a time
MAX_ENTRIES = 100_000  # log entries a rollout may write (about 55 hours of ticks); then it pauses, for good
EVENTS = {  # decision -> the event the events webhook gets
    "start": "started",
    "step": "step",
    "hold": "holding",
    "alert": "held",
    "awaiting_approval": "awaiting_approval",
    "pause": "paused",
    "resume": "resumed",
    "approve": "approved",
    "promote": "promoted",
    "rollback": "rolled_back",
    "abort": "aborted",
}

# commit(who, service, split, action, reason) -> the config version it made (or that was already live)
Commit = Callable[[str, str, Mapping[str, int], str, str], Awaitable[int]]
# examples(service, subset, since) -> a few request IDs of the canary since `since`, errors and slow requests first
Examples = Callable[[str, str, float], Awaitable[list[dict[str, Any]]]]


def routing_of(mesh: Mapping[str, Any], service: str) -> str | None:
    """A digest of how `service` routes, but for its catch-all split (a rollout's own to set): its routes' matches
    and splits, retries, timeouts, limits and the rest of its spec, not its subsets' endpoints. A rollout pauses
    when it changes under it."""
    try:
        found = Mesh.parse(mesh, source="mesh").service(service)
    except ConfigError:
        return None
    if found is None:
        return None
    spec: dict[str, Any] = {key: value for key, value in found.to_dict().items() if key != "subsets"}
    routes = [route.to_dict() for route in found.routes]
    spec["routes"] = [*routes[:-1], {**routes[-1], "split": None}]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_of(mesh: Mapping[str, Any], service: str) -> dict[str, int] | None:
    """The catch-all route's split of `service` in a stored mesh document, with every subset named (0 if absent)."""
    try:
        parsed = Mesh.parse(mesh, source="mesh")
    except ConfigError:
        return None
    found = parsed.service(service)
    if found is None:
        return None
    split = dict.fromkeys((subset.name for subset in found.subsets), 0)
    split.update(found.routes[-1].split)
    return split


@dataclass(slots=True)
class _Running:
    """What the driver keeps in memory for a rollout: rebuilt from the log after a restart."""

    judge: Judge
    increments: Increments
    last: float
    verdict: Verdict | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What a tick decided: the new rollout, the log entry explaining it, the split to commit, the event to send."""

    rollout: Rollout
    action: str | None = None  # step | promote | rollback | hold | alert | awaiting_approval; None: nothing new
    split: dict[str, int] | None = None


class Rollouts:
    """The rollout driver and the actions the API calls.

    >>> rollouts = Rollouts(store, commit=operator.commit_split, webhooks=Webhooks(secret))
    >>> spawn(rollouts.run())                                          # serve.py, beside the signals sampler
    >>> await rollouts.start("catalog", spec, who="alice", reason="v2 canary")
    """

    def __init__(
        self,
        store: Store,
        commit: Commit,
        webhooks: Webhooks | None = None,
        examples: Examples | None = None,
        clock: Callable[[], float] = time.time,
        tick: float = TICK,
        holder: str | None = None,
    ) -> None:
        self.store = store
        self.commit = commit
        self.webhooks = webhooks or Webhooks()
        self.examples = examples
        self.clock = clock
        self.tick = tick
        self.holder = holder or uuid.uuid4().hex
        self.leading = False
        self.running: dict[str, _Running] = {}
        self.lock = asyncio.Lock()  # one tick or action at a time in this process

    # The loop

    async def run(self) -> None:
        sender = asyncio.ensure_future(self.webhooks.run())
        loop = asyncio.get_running_loop()
        try:
            while True:
                due = loop.time() + self.tick
                try:
                    await self.step()
                except StoreError as err:
                    log.warning("rollouts: cannot reach the store: %s", err)
                    self.running.clear()  # replayed from the log when it answers again
                except Exception:  # a bug in one rollout must not stop the others' next tick
                    log.exception("rollouts: a tick failed")
                    self.running.clear()
                await asyncio.sleep(max(0.0, due - loop.time()))
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            if self.leading:
                with contextlib.suppress(StoreError):
                    await self.store.resign(LEASE, self.holder)
            await self.webhooks.close()

    async def step(self) -> None:
        """One tick over every running rollout (when this replica leads)."""
        self.leading = await self.store.lead(LEASE, self.holder, LEASE_TTL)
        if not self.leading:
            self.running.clear()
            return
        async with self.lock:
            records = await self.store.rollouts()
            active = [Rollout.from_json(record.data, record.revision) for record in records]
            active = [rollout for rollout in active if rollout.active]
            for rollout_id in set(self.running) - {rollout.id for rollout in active}:
                del self.running[rollout_id]
            if not active:
                return
            revision = await self.store.current()
            gateways = await self.store.gateways(stats=True)
            for rollout in active:
                try:
                    await self._tick(rollout, revision, gateways)
                except RolloutConflict:
                    self.running.pop(rollout.id, None)  # changed by an action meanwhile: replay next tick

    async def _running(self, rollout: Rollout, revision: Revision) -> _Running:
        found = self.running.get(rollout.id)
        if found is not None:
            return found
        rules = MeshRules.of(revision)  # which group owns the service, and its failing gRPC codes
        owner, failures = rules.owners.get(rollout.service, ""), rules.failures(rollout.service)
        spec = rollout.spec
        judge = Judge(spec.criteria)
        async for _, entry in self.log(rollout.id, "tick"):
            judge.update(Tick.from_json(entry["tick"]))
        increments = Increments(rollout.service, owner, (spec.primary, spec.canary), failures)
        running = self.running[rollout.id] = _Running(judge, increments, self.clock())
        return running

    async def _tick(self, rollout: Rollout, revision: Revision, gateways: list[Any]) -> None:
        if rollout.ticks + 2 > MAX_ENTRIES:
            return  # paused for good when its log filled up
        running = await self._running(rollout, revision)
        now = self.clock()
        strata = running.increments.take(gateways)
        # Fresh: a heartbeat within STALE, and one since the current step began, so that no step (or promotion)
        # follows another on the evidence of the weights before it alone.
        newest = running.increments.newest
        fresh = now - newest <= STALE and newest > rollout.step_started
        tick = Tick(round(now, 3), round(max(0.0, now - running.last), 3), tuple(strata), fresh)
        running.last = now
        verdict = running.verdict = running.judge.update(tick)
        entries: list[tuple[int, dict[str, Any]]] = [
            (rollout.ticks, {"kind": "tick", "tick": tick.to_json(), "outcome": verdict.outcome})
        ]
        rollout = rollout.but(ticks=rollout.ticks + 1, updated=now, verdict=brief(verdict))
        split = split_of(revision.mesh, rollout.service)
        spec = rollout.spec
        decision = None
        if split is None or spec.primary not in split or spec.canary not in split:
            gone = f"the service {rollout.service}" if split is None else f"subset {spec.primary} or {spec.canary}"
            message = f"aborted: {gone} is no longer in the config (version {revision.version})"
            decision = Decision(rollout.but(phase="aborted", ended=now, message=message), "abort")
        if decision is None:
            decision = await self._manual_change(rollout, split, revision)
        if decision is None and rollout.ticks + 2 >= MAX_ENTRIES:
            message = (
                f"paused for good: {MAX_ENTRIES:,} log entries written (its log is full) at {rollout.weight} %; "
                "promote or abort it, or start a new rollout"
            )
            full = rollout.but(phase="paused", paused_from=rollout.phase, alerted=True, message=message)
            decision = Decision(full, "alert")
        if decision is None:
            decision = await self.decide(rollout, verdict, now)
        rollout = decision.rollout
        if decision.action is not None:
            entry = await self._explain(rollout, decision.action, verdict, now)
            entries.append((rollout.ticks, entry))
            rollout = rollout.but(ticks=rollout.ticks + 1)
        for start in range(0, len(entries), MAX_LOG_BATCH):
            await self.store.append_rollout_log(rollout.id, entries[start : start + MAX_LOG_BATCH])
        stored = await self.store.put_rollout(rollout.service, rollout.to_json(), rollout.revision)
        rollout = Rollout.from_json(stored.data, stored.revision)
        wanted = decision.split or (rollout.expected if rollout.phase != "paused" else None)
        if wanted is not None and split is not None and wanted != {k: split.get(k, 0) for k in wanted}:
            await self._commit(rollout, wanted, decision.action or "restore", rollout.message)
        if decision.action is not None:
            self._event(rollout, decision.action)

    async def _commit(self, rollout: Rollout, split: Mapping[str, int], action: str, reason: str) -> None:
        try:
            await self.commit(AUTHOR + rollout.id, rollout.service, split, f"rollout.{action}.weights", reason)
        except (DashboardError, ConfigError) as err:
            log.warning("rollout %s: cannot set %s: %s", rollout.id, weights_text(split), err)

    async def _manual_change(
        self, rollout: Rollout, split: dict[str, int] | None, revision: Revision
    ) -> Decision | None:
        """Someone other than the rollout changed the weights since its last write: pause, saying who."""
        if rollout.phase == "paused" or split is None:
            return None
        routing = routing_of(revision.mesh, rollout.service)
        if rollout.routing and routing != rollout.routing:
            return await self._route_change(rollout)
        if {name: split.get(name, 0) for name in rollout.expected} == rollout.expected:
            return None
        for newer in await self.store.history(50):
            older = await self.store.get(newer.version - 1)
            if older is None or split_of(newer.mesh, rollout.service) == split_of(older.mesh, rollout.service):
                continue
            # The newest change of these weights decides. Its order in the history, not its time, says whether it
            # came after the rollout's own last write: commit times are other replicas' clocks.
            if newer.author.startswith(AUTHOR) or newer.time < rollout.started:
                return None  # the rollout's own write (or one before it began): put the rollout's weights back
            by = f" by {newer.author}" + (f" ({newer.reason})" if newer.reason else "")
            message = (
                f"paused: the weights were changed{by} at config version {newer.version} "
                f"to {weights_text(split, (rollout.spec.primary, rollout.spec.canary))}; resume to go on from "
                f"step {rollout.step + 1} at {rollout.weight} %"
            )
            paused = rollout.but(phase="paused", paused_from=rollout.phase, message=message)
            return Decision(paused, "pause")
        return None

    async def _route_change(self, rollout: Rollout) -> Decision:
        """The service's routes, retries or timeouts were edited under the rollout: pause, saying who (the newest
        config version that changed them)."""
        by = ""
        for newer in await self.store.history(50):
            older = await self.store.get(newer.version - 1)
            if older is not None and routing_of(newer.mesh, rollout.service) != routing_of(older.mesh, rollout.service):
                by = (
                    f" by {newer.author}"
                    + (f" ({newer.reason})" if newer.reason else "")
                    + f" at config version {newer.version}"
                )
                break
        message = (
            f"paused: the routes of {rollout.service} (matches, retries or timeouts) were changed{by}; the judge "
            f"compares like with like, so resume once they are as meant, to go on from step {rollout.step + 1} at "
            f"{rollout.weight} %"
        )
        return Decision(rollout.but(phase="paused", paused_from=rollout.phase, message=message), "pause")

    async def decide(self, rollout: Rollout, verdict: Verdict, now: float) -> Decision:
        """What the rollout does after `verdict` (gates are called here)."""
        spec = rollout.spec
        if rollout.phase == "paused":
            return Decision(rollout.but(message=rollout.message))
        if verdict.outcome == "harm":
            message = f"rolled back at {rollout.weight} %: {verdict.sentence}"
            ended = rollout.but(phase="rolled_back", weight=0, ended=now, message=message, expected=spec.split(0))
            return Decision(ended, "rollback", spec.split(0))
        waited = now - rollout.step_started
        if waited < spec.interval:
            left = format_duration(max(1.0, spec.interval - waited))
            message = f"step {rollout.step + 1} of {len(spec.steps)} at {rollout.weight} %, next decision in {left}: "
            return Decision(rollout.but(phase="progressing", message=message + verdict.sentence))
        if verdict.outcome == "hold":
            return self._hold(rollout, verdict.sentence, now)
        promoting = rollout.step + 1 >= len(spec.steps)
        if promoting and spec.approval and not rollout.approved:
            message = f"awaiting approval to promote {spec.canary} to 100 %: {verdict.sentence}"
            action = None if rollout.phase == "awaiting_approval" else "awaiting_approval"
            return Decision(rollout.but(phase="awaiting_approval", message=message), action)
        if spec.gate is not None:
            answer = await self.webhooks.post(spec.gate, self._payload(rollout, "gate"))
            if not answer.ok:
                return self._hold(rollout, f"hold: the gate webhook {answer.text}", now)
        return self.advance(rollout, now, verdict.sentence)

    def advance(self, rollout: Rollout, now: float, why: str) -> Decision:
        spec = rollout.spec
        step = rollout.step + 1
        weight = spec.weight(step)
        fields = {"step": step, "weight": weight, "step_started": now, "held_since": None, "alerted": False}
        if weight == 100:
            message = f"promoted {spec.canary} to 100 %, the new primary ({spec.primary} stays defined at 0 %): {why}"
            done = rollout.but(
                phase="promoted",
                ended=now,
                message=message,
                expected=spec.split(100),
                new_primary=spec.canary,
                **fields,
            )
            return Decision(done, "promote", spec.split(100))
        message = f"step {step + 1} of {len(spec.steps)}: {spec.canary} to {weight} %: {why}"
        return Decision(
            rollout.but(phase="progressing", message=message, expected=spec.split(weight), **fields),
            "step",
            spec.split(weight),
        )

    def _hold(self, rollout: Rollout, sentence: str, now: float) -> Decision:
        held_since = rollout.held_since if rollout.held_since is not None else now
        spec = rollout.spec
        if now - held_since >= spec.max_hold and not rollout.alerted:
            message = (
                f"paused: held for {format_duration(now - held_since)} at {rollout.weight} % without evidence enough "
                f"(max_hold {format_duration(spec.max_hold)}); {sentence}"
            )
            paused = rollout.but(
                phase="paused", paused_from="holding", alerted=True, held_since=held_since, message=message
            )
            return Decision(paused, "alert")
        action = None if rollout.phase == "holding" else "hold"
        return Decision(rollout.but(phase="holding", held_since=held_since, message=sentence), action)

    async def _explain(self, rollout: Rollout, action: str, verdict: Verdict, now: float) -> dict[str, Any]:
        examples: list[dict[str, Any]] = []
        if self.examples is not None:
            with contextlib.suppress(DashboardError, OSError, ValueError):
                examples = await self.examples(rollout.service, rollout.spec.canary, rollout.started)
        return decision_entry(rollout, action, now, verdict=verdict.to_json(), examples=examples)

    def _payload(self, rollout: Rollout, event: str) -> dict[str, Any]:
        return {
            "event": event,
            "rollout": rollout.id,
            "service": rollout.service,
            "phase": rollout.phase,
            "step": rollout.step,
            "weight": rollout.weight,
            "primary": rollout.spec.primary,
            "canary": rollout.spec.canary,
            "message": rollout.message,
            "time": rollout.updated,
        }

    def _event(self, rollout: Rollout, action: str) -> None:
        url = rollout.spec.events
        if url is not None:
            self.webhooks.event(url, self._payload(rollout, EVENTS.get(action, action)))

    # Actions (the API)

    async def get(self, service: str) -> Rollout | None:
        record = await self.store.get_rollout(service)
        return None if record is None else Rollout.from_json(record.data, record.revision)

    def verdict(self, rollout_id: str) -> Verdict | None:
        running = self.running.get(rollout_id)
        return None if running is None else running.verdict

    async def start(self, service: str, spec: RolloutSpec, who: str, reason: str) -> Rollout:
        revision = await self.store.current()
        split = split_of(revision.mesh, service)
        if split is None:
            raise ApiError(404, f"services.{service}: no such service")
        for role, name in (("primary", spec.primary), ("canary", spec.canary)):
            if name not in split:
                raise ApiError(422, f"{role}: {service} has no subset {name!r} (it has {', '.join(split) or 'none'})")
        async with self.lock:
            current = await self.get(service)
            if current is not None and current.active:
                raise ApiError(409, f"{service} already has a running rollout ({current.id}, {current.phase})")
            now = self.clock()
            rollout_id = f"{service[:40]}-{uuid.uuid4().hex[:12]}".lower().replace("_", "-").replace(".", "-")
            weight = spec.weight(0)
            message = f"step 1 of {len(spec.steps)}: {spec.canary} to {weight} %, judged against {spec.primary}"
            rollout = Rollout(
                id=rollout_id,
                service=service,
                spec=spec,
                phase="progressing",
                step=0,
                weight=weight,
                by=who,
                reason=reason,
                started=now,
                step_started=now,
                updated=now,
                message=message,
                expected=spec.split(weight),
                ticks=1,
                routing=routing_of(revision.mesh, service) or "",
            )
            entry = decision_entry(rollout, "start", now, who=who, reason=reason, spec=spec.to_json())
            await self.store.append_rollout_log(rollout_id, [(0, entry)])
            stored = await self._put(rollout, current.revision if current else 0)
            await self.store.record_audit(
                who=who,
                action="rollout.start",
                target=f"services/{service}/rollout",
                before=None,
                after=stored.data,
                reason=reason,
            )
            await self._commit(rollout, spec.split(weight), "start", f"rollout {rollout_id}: {message}")
            await self._forget_old()
        rollout = Rollout.from_json(stored.data, stored.revision)
        self._event(rollout, "start")
        return rollout

    async def act(self, service: str, action: str, who: str, reason: str) -> Rollout:
        """pause | resume | promote | abort | approve (`ACTIONS`), by an operator."""
        if action not in ACTIONS:
            raise ApiError(404, f"no rollout action {action!r} (one of {', '.join(ACTIONS)})")
        async with self.lock:
            rollout = await self.get(service)
            if rollout is None or not rollout.active:
                raise ApiError(
                    409, f"{service} has no running rollout" + (f" (the last one {rollout.phase})" if rollout else "")
                )
            now = self.clock()
            before = rollout.to_json()
            spec = rollout.spec
            split: dict[str, int] | None = None
            said = f" by {who}" + (f": {reason}" if reason else "")
            if action == "pause":
                if rollout.phase == "paused":
                    raise ApiError(409, f"{service}'s rollout is already paused")
                rollout = rollout.but(phase="paused", paused_from=rollout.phase, message=f"paused{said}")
            elif action == "resume":
                if rollout.phase != "paused":
                    raise ApiError(409, f"{service}'s rollout is not paused ({rollout.phase})")
                if rollout.ticks + 2 >= MAX_ENTRIES:
                    raise ApiError(409, f"{service}'s rollout log is full; promote or abort it, or start a new one")
                split = spec.split(rollout.weight)
                routing = routing_of((await self.store.current()).mesh, service) or ""
                rollout = rollout.but(
                    phase="progressing",
                    paused_from=None,
                    held_since=None,
                    alerted=False,
                    step_started=now,
                    expected=split,
                    routing=routing,
                    message=f"resumed{said}; step {rollout.step + 1} at {rollout.weight} %",
                )
            elif action == "approve":
                if not spec.approval:
                    raise ApiError(409, f"{service}'s rollout has no approval gate; promote it instead")
                rollout = rollout.but(approved=True, message=f"promotion approved{said}")
            elif action == "promote":
                decision = self.advance(rollout.but(step=len(spec.steps) - 1), now, f"promoted{said}")
                rollout, split = decision.rollout, decision.split
            else:  # abort
                split = spec.split(0)
                rollout = rollout.but(
                    phase="aborted",
                    weight=0,
                    ended=now,
                    expected=split,
                    message=f"aborted{said}; {spec.primary} back to 100 %",
                )
            rollout = rollout.but(updated=now, ticks=rollout.ticks + 1)
            entry = decision_entry(rollout, action, now, who=who, reason=reason)
            await self.store.append_rollout_log(rollout.id, [(rollout.ticks - 1, entry)])
            stored = await self._put(rollout, rollout.revision)
            await self.store.record_audit(
                who=who,
                action=f"rollout.{action}",
                target=f"services/{service}/rollout",
                before=before,
                after=stored.data,
                reason=reason,
            )
            rollout = Rollout.from_json(stored.data, stored.revision)
            self.running.pop(rollout.id, None)  # its tick numbering moved on: replayed next tick
            if split is not None:
                await self._commit(rollout, split, action, f"rollout {rollout.id}: {rollout.message}")
        self._event(rollout, action)
        return rollout

    async def _put(self, rollout: Rollout, expect: int) -> RolloutRecord:
        """An operator's write of the rollout: a conflict (another replica wrote it meanwhile) is their 409."""
        try:
            return await self.store.put_rollout(rollout.service, rollout.to_json(), expect)
        except RolloutConflict as err:
            raise ApiError(409, f"{err}; try again") from None

    async def _forget_old(self) -> None:
        records = await self.store.rollouts()
        keep = {record.data["id"] for record in records}
        await self.store.forget_rollout_logs(keep)

    async def log(self, rollout_id: str, kind: str, after: int = -1) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """The rollout's log entries of `kind` ("tick" or "decision") numbered above `after`, oldest first, read a
        page at a time."""
        while True:
            entries = await self.store.rollout_log(rollout_id, after, LOG_PAGE)
            for seq, entry in entries:
                if entry.get("kind") == kind:
                    yield seq, entry
            if len(entries) < LOG_PAGE:
                return
            after = entries[-1][0]

    async def decisions(self, rollout_id: str, after: int = -1, limit: int = 100) -> list[tuple[int, dict[str, Any]]]:
        """The rollout's decision entries (not its ticks), oldest first, numbered above `after`."""
        found: list[tuple[int, dict[str, Any]]] = []
        async for item in self.log(rollout_id, "decision", after):
            found.append(item)
            if len(found) >= limit:
                break
        return found

    async def replay(self, rollout: Rollout) -> list[dict[str, Any]]:
        """Re-judge the rollout's logged ticks: each tick's stored outcome beside the one the judge gives now."""
        logged = [item async for item in self.log(rollout.id, "tick")]
        verdicts = replay(rollout.spec.criteria, [Tick.from_json(entry["tick"]) for _, entry in logged])
        return [
            {
                "seq": seq,
                "stored": entry.get("outcome"),
                "replayed": verdict.outcome,
                "evidence": round(verdict.evidence, 4),
                "sentence": verdict.sentence,
            }
            for (seq, entry), verdict in zip(logged, verdicts, strict=True)
        ]


def brief(verdict: Verdict) -> dict[str, Any]:
    """What the stored rollout keeps of its latest verdict (the log keeps the whole of each decision's)."""
    return {key: value for key, value in verdict.to_json().items() if key != "findings"}


def decision_entry(rollout: Rollout, action: str, now: float, **more: Any) -> dict[str, Any]:
    """A decision in the rollout's log: what was done, where the rollout then stood, and why (`more`: the verdict
    and examples of the driver's decisions, who and why for an operator's)."""
    return {
        "kind": "decision",
        "time": now,
        "action": action,
        "phase": rollout.phase,
        "step": rollout.step,
        "weight": rollout.weight,
        "message": rollout.message,
        **more,
    }
