"""`meshgate apply FILE`, `meshgate get services|gateways|rollouts|history` and `meshgate rollout ACTION SERVICE`:
the operator API from a terminal (arguments in `meshgate.cli`).

The server and token come from `--server` and `--token-file` (or `--token`, which `ps` shows to every local user),
or `MESHGATE_SERVER` and `MESHGATE_TOKEN`. A mesh file is validated locally first, so its errors name the file, the
field and the value. Exit status: 0 done, 1 the dashboard could not be reached or refused the token, 2 bad input
(the file, the arguments, or a 4xx about them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from dashboard.mesh import Mesh
from gateway.config import ConfigError

API_CLIENT_TIMEOUT = 30.0  # seconds for one request of the operator client to the dashboard API
BAD_INPUT = frozenset({400, 404, 409, 413, 422})


class CommandError(Exception):
    """A failure to report on one line, with the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _client(args: argparse.Namespace) -> httpx.Client:
    server: str = args.server  # the option's default is MESHGATE_SERVER's, else the local dashboard's
    if args.token and args.token_file:
        raise CommandError("--token-file: give the token once, not also with --token", 2)
    token = args.token or (_read_token(args.token_file) if args.token_file else os.environ.get("MESHGATE_TOKEN"))
    if not token:
        raise CommandError("no token: pass --token-file FILE or --token, or set MESHGATE_TOKEN", 2)
    if not server.startswith(("http://", "https://")):
        raise CommandError(f"--server: expected an http:// or https:// URL, got {server!r}", 2)
    return httpx.Client(
        base_url=server.rstrip("/"), headers={"authorization": f"Bearer {token}"}, timeout=API_CLIENT_TIMEOUT
    )


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            token = file.read().strip()
    except OSError as err:
        raise CommandError(f"--token-file {path}: {err.strerror or err}", 2) from None
    if not token:
        raise CommandError(f"--token-file {path}: the file is empty", 2)
    return token


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        answer = client.request(method, path, **kwargs)
    except httpx.HTTPError as err:
        raise CommandError(f"cannot reach the dashboard at {client.base_url}: {err or type(err).__name__}", 1) from None
    if answer.status_code >= 400:
        try:
            reason = str(answer.json()["error"])
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {answer.status_code}"
        status = 2 if answer.status_code in BAD_INPUT else 1
        raise CommandError(f"{client.base_url}: {answer.status_code} {reason}", status)
    return answer.json()


def _command(body: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except CommandError as err:
            print(f"meshgate: {err}", file=sys.stderr)
            return err.status

    return run


@_command
def run_apply(args: argparse.Namespace) -> int:
    try:
        mesh = Mesh.load(args.file)
    except ConfigError as err:
        raise CommandError(str(err), 2) from None
    reason = args.reason or f"meshgate apply {os.path.basename(args.file)}"
    with _client(args) as client:
        answer = _call(client, "PUT", "/api/v1/config", json={"mesh": mesh.to_dict(), "reason": reason})
    if answer.get("changed"):
        print(f"{args.file}: applied as config version {answer['version']}")
    else:
        print(f"{args.file}: no changes (config version {answer['version']})")
    return 0


@_command
def run_get(args: argparse.Namespace) -> int:
    path = {
        "services": "/api/v1/services",
        "gateways": "/api/v1/gateways",
        "rollouts": "/api/v1/rollouts",
        "history": "/api/v1/config/history",
    }
    params = {"limit": str(args.limit)} if args.what == "history" else {}
    with _client(args) as client:
        answer = _call(client, "GET", path[args.what], params=params)
    if args.output == "json":
        print(json.dumps(answer, indent=2, ensure_ascii=False))
        return 0
    tables: dict[str, Callable[[Any], list[list[str]]]] = {
        "services": _services,
        "gateways": _gateways,
        "rollouts": _rollouts,
        "history": _history,
    }
    rows = tables[args.what](answer)
    print(_table(rows))
    return 0


def _services(answer: dict[str, Any]) -> list[list[str]]:
    rows = [["NAME", "GROUP", "WEIGHTS", "ENDPOINTS"]]
    for service in answer["services"]:
        weights = " ".join(f"{subset}={weight}" for subset, weight in service["weights"].items())
        endpoints = " ".join(f"{subset}:{','.join(items) or '-'}" for subset, items in service["subsets"].items())
        rows.append([service["name"], service["group"], weights, endpoints])
    return rows


def _rollouts(answer: dict[str, Any]) -> list[list[str]]:
    rows = [["SERVICE", "PHASE", "CANARY", "WEIGHT", "STEP", "VERDICT", "EVIDENCE", "MESSAGE"]]
    for rollout in answer["rollouts"]:
        spec, verdict = rollout["spec"], rollout.get("verdict") or {}
        evidence = verdict.get("evidence")
        rows.append(
            [
                rollout["service"],
                rollout["phase"],
                f"{spec['canary']} vs {spec['primary']}",
                f"{rollout['weight']}%",
                f"{min(rollout['step'] + 1, rollout['steps'])}/{rollout['steps']}",
                str(verdict.get("outcome") or "-"),
                "-" if evidence is None else f"{evidence:.3g}",
                _clip(rollout["message"], 100),
            ]
        )
    return rows


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@_command
def run_rollout(args: argparse.Namespace) -> int:
    path = f"/api/v1/services/{args.service}/rollout"
    with _client(args) as client:
        if args.action == "status":
            rollout = _call(client, "GET", path)
            decisions = _call(client, "GET", f"{path}/decisions", params={"limit": "500"})["decisions"]
            if args.output == "json":
                print(json.dumps({**rollout, "decisions": decisions}, indent=2, ensure_ascii=False))
                return 0
            print(_status(rollout, decisions))
            return 0
        if args.action == "start":
            rollout = _call(client, "POST", path, json=_start_body(args))
        else:
            rollout = _call(client, "POST", f"{path}/{args.action}", json={"reason": args.reason})
    phase = f"{rollout['phase']} at {rollout['weight']} %"
    print(f"{rollout['service']}: rollout {rollout['id']} {phase}: {rollout['message']}")
    return 0


def _start_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"canary": args.canary, "reason": args.reason}
    optional = {
        "primary": args.primary,
        "steps": args.steps,
        "step_weight": args.step_weight,
        "max_weight": args.max_weight,
        "interval": args.interval,
        "max_hold": args.max_hold,
        "gate": args.gate,
        "events": args.events,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if args.approval:
        body["approval"] = True
    judges: dict[str, Any] = {}
    if args.no_latency:
        judges["latency"] = False
    if args.max_error_rate is not None:
        judges["max_error_rate"] = args.max_error_rate
    if args.max_p99 is not None:
        judges["max_p99_ms"] = args.max_p99 * 1000
    if judges:
        body["judges"] = judges
    return body


def _status(rollout: dict[str, Any], decisions: list[dict[str, Any]]) -> str:
    spec = rollout["spec"]
    steps = " ".join(
        f"[{weight}]" if index == rollout["step"] else str(weight) for index, weight in enumerate([*spec["steps"], 100])
    )
    lines = [
        f"{rollout['service']}: rollout {rollout['id']} of {spec['canary']} against {spec['primary']}, "
        f"started by {rollout['by']}" + (f" ({rollout['reason']})" if rollout["reason"] else ""),
        f"phase {rollout['phase']}, canary at {rollout['weight']} %, steps {steps}",
        rollout["message"],
    ]
    verdict = rollout.get("verdict") or {}
    for finding in verdict.get("findings", []):
        canary, primary = finding["canary"], finding["primary"]
        ratio = finding.get("odds_ratio")
        odds = f", odds ratio {ratio[0]:.2f} (95 % {ratio[1]:.2f} to {ratio[2]:.2f})" if ratio else ""
        lines.append(
            f"  {finding['what']}: canary {canary[1]}/{canary[0]}, primary {primary[1]}/{primary[0]}{odds}"
            + ("" if finding["safe"] else f"; not yet enough (needs {finding['needs'] or '?'} more)")
        )
    rows = [["TIME", "ACTION", "WEIGHT", "MESSAGE", "EXAMPLES"]]
    for decision in decisions:
        when = time.strftime("%H:%M:%S", time.localtime(decision["time"]))
        examples = " ".join(example["request_id"] for example in decision.get("examples", []))
        rows.append([when, decision["action"], f"{decision['weight']}%", _clip(decision["message"], 100), examples])
    return "\n".join(lines) + "\n\n" + _table(rows)


def _gateways(answer: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["GROUP", "INSTANCE", "VERSION", "CONFIG", "IN-SYNC", "STATE", "LAST-HEARTBEAT", "ADVERTISE"]]
    for gateway in answer:
        rows.append(
            [
                gateway["group"],
                gateway["instance"][:8],
                str(gateway.get("meshgate_version") or "-"),
                str(gateway.get("config_version")),
                "yes" if gateway["in_sync"] else "no",
                "stale" if gateway["stale"] else "live",
                f"{max(0.0, time.time() - gateway['last_heartbeat']):.0f}s ago",
                gateway.get("advertise") or "-",
            ]
        )
    return rows


def _history(answer: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["VERSION", "TIME", "AUTHOR", "REASON", "CHANGES"]]
    for revision in answer:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(revision["time"]))
        diff = revision["diff"]
        changes = "; ".join(diff[:3]) + (f"; +{len(diff) - 3} more" if len(diff) > 3 else "")
        rows.append([str(revision["version"]), when, revision["author"], revision["reason"] or "-", changes or "-"])
    return rows


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)
