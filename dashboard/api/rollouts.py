"""The rollout API under /api/v1: start an automated canary rollout, follow it, act on it, and replay it.

Reads need a viewer or operator token (or session); starting and acting need an operator. The driver
(`dashboard.rollout.driver.Rollouts`) does the work; these endpoints only validate and hand over. Every state change
is in the audit log (`rollout.start`, `rollout.pause`, ...), and every weight the rollout sets is a config commit
authored `rollout:<id>`, so it is on the service's change timeline.

The docstring of each endpoint ends in its OpenAPI operation (after `---`), read by `dashboard.api.openapi`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dashboard.api.auth import READ, WRITE, Auth
from dashboard.api.bodies import RolloutActionBody, RolloutBody, read_body
from dashboard.api.operator import int_param, json_response
from dashboard.errors import ApiError
from dashboard.rollout.driver import Rollouts, split_of
from dashboard.rollout.judge import Criteria
from dashboard.rollout.spec import DEFAULT_STEPS, Rollout, RolloutSpec, SpecError


def spec_of(body: RolloutBody, split: dict[str, int]) -> RolloutSpec:
    """The spec a body asks for, against the service's current split; raises 422 with the field."""
    primary = body.primary
    if primary is None:
        candidates = [name for name in split if name != body.canary]
        if not candidates:
            raise ApiError(422, "primary: the service has no other subset to compare the canary with")
        primary = max(candidates, key=lambda name: (split[name], -candidates.index(name)))
    if body.steps is not None and (body.step_weight is not None or body.max_weight is not None):
        raise ApiError(422, "steps: give either steps or step_weight and max_weight, not both")
    try:
        if body.step_weight is not None or body.max_weight is not None:
            if body.step_weight is None or body.max_weight is None:
                raise SpecError("step_weight, max_weight: give both")
            steps = RolloutSpec.stepped(body.step_weight, body.max_weight)
        else:
            steps = tuple(body.steps) if body.steps is not None else DEFAULT_STEPS
        judges = body.judges
        criteria = Criteria(
            errors=judges.errors,
            first_attempts=judges.first_attempts,
            latency=judges.latency,
            max_error_rate=judges.max_error_rate,
            max_p99_ms=judges.max_p99_ms,
        )
        return RolloutSpec(
            primary=primary,
            canary=body.canary,
            steps=steps,
            interval=body.interval,
            max_hold=body.max_hold,
            criteria=criteria,
            approval=body.approval,
            gate=body.gate,
            events=body.events,
        )
    except SpecError as err:
        raise ApiError(422, str(err)) from None


def rollout_json(rollout: Rollout) -> dict[str, Any]:
    return {**rollout.to_json(), "active": rollout.active}


class RolloutApi:
    """The rollout endpoints, bound to the driver and the `Auth` of the other APIs."""

    def __init__(self, rollouts: Rollouts, auth: Auth) -> None:
        self.rollouts = rollouts
        self.auth = auth

    def routes(self) -> list[Route]:
        prefix = "/api/v1"
        return [
            Route(f"{prefix}/rollouts", self.list_rollouts, methods=["GET"]),
            Route(f"{prefix}/services/{{name}}/rollout", self.get_rollout, methods=["GET"]),
            Route(f"{prefix}/services/{{name}}/rollout", self.start, methods=["POST"]),
            Route(f"{prefix}/services/{{name}}/rollout/decisions", self.decisions, methods=["GET"]),
            Route(f"{prefix}/services/{{name}}/rollout/replay", self.replay, methods=["GET"]),
            Route(f"{prefix}/services/{{name}}/rollout/{{action}}", self.act, methods=["POST"]),
        ]

    async def _rollout(self, request: Request) -> Rollout:
        await self.auth.require(request, READ)
        name = request.path_params["name"]
        rollout = await self.rollouts.get(name)
        if rollout is None:
            raise ApiError(404, f"services.{name}: no rollout")
        return rollout

    async def list_rollouts(self, request: Request) -> Response:
        """---
        summary: Every service's rollout, running or the last one ended
        tags: [rollouts]
        responses:
          "200": {description: "`{rollouts: [{id, service, phase, step, steps, weight, message, verdict, ...}]}`"}
          "403": {$ref: "#/components/responses/Error"}
        """
        await self.auth.require(request, READ)
        records = await self.rollouts.store.rollouts()
        found = [rollout_json(Rollout.from_json(record.data, record.revision)) for record in records]
        return json_response({"rollouts": found})

    async def get_rollout(self, request: Request) -> Response:
        """---
        summary: A service's rollout, running or the last one ended, with its latest verdict
        tags: [rollouts]
        parameters: [{$ref: "#/components/parameters/name"}]
        responses:
          "200": {description: "`{id, service, spec, phase, step, steps, weight, message, verdict, ...}`; `verdict`
            holds `findings` (each judge's counts, odds ratio and interval) while this replica drives it"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
        """
        rollout = await self._rollout(request)
        found = rollout_json(rollout)
        verdict = self.rollouts.verdict(rollout.id)
        if verdict is not None:
            found["verdict"] = verdict.to_json()
        return json_response(found)

    async def start(self, request: Request) -> Response:
        """---
        summary: Start an automated canary rollout of a service's canary subset
        description: >-
          The canary's weight goes to the first step at once; each `interval` the judge compares the canary with
          the primary (errors, first attempts, latency) and steps up, holds for evidence, or rolls back. 409 while
          another rollout of the service runs.
        tags: [rollouts]
        parameters: [{$ref: "#/components/parameters/name"}]
        requestBody:
          required: true
          content: {application/json: {schema: {$ref: "#/components/schemas/RolloutBody"}}}
        responses:
          "201": {description: "the rollout"}
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
          "409": {$ref: "#/components/responses/Error"}
          "422": {$ref: "#/components/responses/Error"}
        """
        principal = await self.auth.require(request, WRITE)
        name = request.path_params["name"]
        body = await read_body(request, RolloutBody)
        revision = await self.rollouts.store.current()
        split = split_of(revision.mesh, name)
        if split is None:
            raise ApiError(404, f"services.{name}: no such service")
        rollout = await self.rollouts.start(name, spec_of(body, split), principal.who, body.reason)
        return json_response(rollout_json(rollout), 201)

    async def act(self, request: Request) -> Response:
        """---
        summary: Pause, resume, promote (now, skipping the analysis), abort (primary back to 100 %) or approve
        tags: [rollouts]
        parameters:
          - {$ref: "#/components/parameters/name"}
          - {name: action, in: path, required: true, schema: {enum: [pause, resume, promote, abort, approve]}}
        requestBody:
          content: {application/json: {schema: {$ref: "#/components/schemas/RolloutActionBody"}}}
        responses:
          "200": {description: "the rollout"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
          "409": {$ref: "#/components/responses/Error"}
        """
        principal = await self.auth.require(request, WRITE)
        name, action = request.path_params["name"], request.path_params["action"]
        reason = ""
        if (await request.body()).strip():
            reason = (await read_body(request, RolloutActionBody)).reason
        return json_response(rollout_json(await self.rollouts.act(name, action, principal.who, reason)))

    async def decisions(self, request: Request) -> Response:
        """---
        summary: The rollout's decision log, oldest first, each with its verdict, counts and example request IDs
        tags: [rollouts]
        parameters:
          - {$ref: "#/components/parameters/name"}
          - {name: after, in: query, schema: {type: integer, minimum: 0}, description: decisions numbered above}
          - {$ref: "#/components/parameters/limit"}
        responses:
          "200": {description: "`{id, decisions: [{seq, time, action, phase, weight, message, verdict, examples}]}`"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
        """
        rollout = await self._rollout(request)
        after = int_param(request, "after", None, 0)
        limit = int_param(request, "limit", 100, 1, 500)
        assert limit is not None
        entries = await self.rollouts.decisions(rollout.id, -1 if after is None else after, limit)
        return json_response({"id": rollout.id, "decisions": [{"seq": seq, **entry} for seq, entry in entries]})

    async def replay(self, request: Request) -> Response:
        """---
        summary: Re-judge the rollout's stored inputs, tick by tick, beside what was decided then
        tags: [rollouts]
        parameters: [{$ref: "#/components/parameters/name"}]
        responses:
          "200": {description: "`{id, ticks, same, rows: [{seq, stored, replayed, evidence, sentence}]}`"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
        """
        rollout = await self._rollout(request)
        rows = await self.rollouts.replay(rollout)
        same = all(row["stored"] == row["replayed"] for row in rows)
        return json_response({"id": rollout.id, "ticks": len(rows), "same": same, "rows": rows})
