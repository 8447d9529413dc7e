"""What the pages show, gathered and shaped for the templates: `PageData`.

It reads the config store (services, weights, the change timeline with the rollouts' audited state changes), the
rollout driver (`dashboard.rollout.driver.Rollouts`: a service's rollout and its decision log), the gateways' view
(`GatewayApi`, so "in sync" means the same as in the API), golden signals (`dashboard.api.signals.SignalsApi` over
the embedded history or Prometheus, the same calls as the JSON API) and traces (`dashboard.api.traces.Traces`). The
geometry of the SVG (the topology graph, charts, waterfalls) comes from `dashboard.ui.charts`, never from templates.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode

from dashboard.api.gateways import GatewayApi
from dashboard.api.operator import OperatorApi
from dashboard.api.signals import SignalsApi, chart_series
from dashboard.api.traces import TraceResult, Traces, not_found
from dashboard.errors import ApiError
from dashboard.mesh import Mesh
from dashboard.rollout.driver import Rollouts
from dashboard.rollout.spec import DEFAULT_INTERVAL, DEFAULT_STEPS, ENDED, Rollout
from dashboard.signals import topology as topo
from dashboard.spans.jaeger import JaegerError
from dashboard.spans.store import TraceFilters
from dashboard.store.model import Revision, Store
from dashboard.ui.charts import Chart, graph, line_chart, waterfall
from dashboard.ui.charts import number as _number
from gateway import rpc

WINDOWS = {"5m": 300.0, "1h": 3600.0, "6h": 21600.0}
RECENT = 15.0  # seconds of traffic behind a subset's "measured share": what the split does now
TIMELINE = 50  # config versions searched for a service's weight changes
AUDIT = 200  # audit entries searched for a service's rollout state changes
LOG_PAGE = 20  # rollout decisions shown at once, newest first; "older" pages back
MAX_DECISIONS = 5000  # decisions read from a rollout's log (a decision is an action, not a tick: few per step)
ROLLOUT_TARGET = "services/{}/rollout"  # the audit target of a service's rollout actions (dashboard.rollout.driver)
_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}")
Series = list[tuple[float, float | None]]
_T = TypeVar("_T")


def short_id(text: object) -> str:
    return str(text)[:8] if text else ""


def grpc_shares(calls: Mapping[str, float], failures: frozenset[int]) -> list[dict[str, Any]]:
    """The non-OK gRPC codes of a window, most frequent first: each one's share of the gRPC calls and whether the
    service counts it as a failure. [] without gRPC calls."""
    total = sum(calls.values())
    rows = [
        {"code": name, "calls": count, "share": count / total, "failure": rpc.NAMES.index(name) in failures}
        for name, count in calls.items()
        if name != "OK" and name in rpc.NAMES and total > 0
    ]
    return sorted(rows, key=lambda row: (-row["share"], row["code"]))


def split_of(mesh: Mapping[str, Any], service: str) -> dict[str, int] | None:
    spec = mesh.get("services", {}).get(service)
    if not isinstance(spec, Mapping) or not spec.get("routes"):
        return None
    return dict(spec["routes"][-1]["split"])


class PageData:
    """The pages' data sources. `signals` and `traces` may be None (the pages then say so instead of charts).

    >>> data = PageData(store, operator_api, gateway_api, signals=signals_api, traces=traces)
    >>> await data.service("catalog", 300.0)
    """

    def __init__(
        self,
        store: Store,
        operator: OperatorApi,
        gateway_api: GatewayApi,
        *,
        signals: SignalsApi | None = None,
        traces: Traces | None = None,
        rollouts: Rollouts | None = None,
    ) -> None:
        self.store = store
        self.operator = operator
        self.gateway_api = gateway_api
        self.signals = signals
        self.traces = traces
        self.rollouts = rollouts

    async def _mesh(self) -> tuple[Revision, Mesh]:
        revision = await self.store.current()
        return revision, self.operator.mesh_of(revision)

    async def service_names(self) -> list[str]:
        _, mesh = await self._mesh()
        return [service.name for service in mesh.services]

    async def subsets_of(self, name: str) -> list[str]:
        _, mesh = await self._mesh()
        service = mesh.service(name)
        if service is None:
            raise ApiError(404, f"services.{name}: no such service")
        return [subset.name for subset in service.subsets]

    async def weights_of(self, name: str) -> dict[str, int]:
        """The live split of `name`'s catch-all route, every subset named (0 when omitted)."""
        _, mesh = await self._mesh()
        service = mesh.service(name)
        if service is None:
            raise ApiError(404, f"services.{name}: no such service")
        split = dict(service.routes[-1].split)
        return {subset.name: split.get(subset.name, 0) for subset in service.subsets}

    # Topology

    async def topology(
        self, window: float, *, selected_node: str = "", selected_edge: str = "", path: frozenset[str] = frozenset()
    ) -> dict[str, Any] | None:
        """The graph as SVG geometry; `path` holds "source>destination" node-id pairs to highlight (a trace)."""
        if self.signals is None:
            return None
        document = await _signals(self.signals.topology(window))
        return graph(document, selected_node, selected_edge, path, self.signals.thresholds)

    async def details(self, window: float, *, node: str = "", edge: str = "") -> dict[str, Any] | None:
        """The golden signals over time of the selected edge, service (per subset) or group (per gateway)."""
        if self.signals is None or not (node or edge):
            return None
        end = time.time()
        start = end - window
        if edge:
            source, _, destination = edge.partition(">")
            found = await _signals(self.signals.edge(source, destination, window))
            lines = {"all subsets": chart_series(found["points"])}
            lines.update((subset, chart_series(points)) for subset, points in sorted(found["subsets"].items()))
            tops = shared_tops(list(lines.values()))
            return {
                "kind": "edge",
                "title": f"{source} → {destination}",
                "totals": found["totals"],
                "columns": [(name, signal_charts(series, start, end, (), tops)) for name, series in lines.items()],
                "edges": [],
                "link": None,
            }
        document = await _signals(self.signals.topology(window))
        node_data = next((item for item in document["nodes"] if item["id"] == node), None)
        if node_data is None:
            return {"kind": "missing", "title": node, "totals": None, "columns": [], "edges": [], "link": None}
        kind, name = node_data["kind"], str(node_data["name"])
        edges = [item for item in document["edges"] if node in (item["source"], item["destination"])]
        columns: list[tuple[str, list[Chart]]] = []
        totals = None
        link = None
        if kind == "service":
            found = await _signals(self.signals.service(name, window))
            totals = found["totals"]
            per_subset = {subset: chart_series(item["points"]) for subset, item in found["subsets"].items()}
            tops = shared_tops(list(per_subset.values()))
            columns = [(subset, signal_charts(series, start, end, (), tops)) for subset, series in per_subset.items()]
            link = f"/services/{name}"
        elif kind == "group":
            for record in await self.store.gateways():
                if record.group == name:
                    found = await _signals(self.signals.gateway(record.instance, window, record.group))
                    if not found["stale"]:
                        charts = saturation_charts(chart_series(found["points"]), start, end)
                        columns.append((f"gateway {short_id(record.instance)}", charts))
        return {"kind": kind, "title": name, "totals": totals, "columns": columns, "edges": edges, "link": link}

    # Services

    async def services(self, window: float) -> list[dict[str, Any]]:
        _, mesh = await self._mesh()
        golden = await _signals(self.signals.services(window)) if self.signals is not None else {}
        listing = []
        for service in mesh.services:
            signals = golden.get(service.name, {})
            listing.append(
                {
                    "name": service.name,
                    "group": mesh.group_of(service.name),
                    "weights": dict(service.routes[-1].split),
                    "rps": _number(signals.get("rps")),
                    "error_rate": _number(signals.get("error_rate")),
                    "p99_ms": _number(signals.get("p99_ms")),
                }
            )
        return listing

    async def service(self, name: str, window: float) -> dict[str, Any]:
        revision, mesh = await self._mesh()
        service = mesh.service(name)
        if service is None:
            raise ApiError(404, f"services.{name}: no such service")
        weights = dict(service.routes[-1].split)
        names = [subset.name for subset in service.subsets]
        found: Mapping[str, Any] = {"subsets": {}}
        recent: Mapping[str, Any] = {}
        if self.signals is not None:
            found = await _signals(self.signals.service(name, window))
            recent = (await _signals(self.signals.services(RECENT))).get(name, {}).get("subsets", {})
        rates = {subset: _number(recent.get(subset, {}).get("rps")) or 0.0 for subset in names}
        total = sum(rates.values())
        subsets = []
        for subset in service.subsets:
            totals = found["subsets"].get(subset.name, {}).get("totals", {})
            subsets.append(
                {
                    "name": subset.name,
                    # A discovered subset's endpoints are found by each gateway: the page names their source.
                    "endpoints": [subset.source] if subset.source else [str(endpoint) for endpoint in subset.endpoints],
                    "weight": weights.get(subset.name, 0),
                    "share": rates[subset.name] / total if total > 0 else None,
                    "rps": _number(totals.get("rps")),
                    "error_rate": _number(totals.get("error_rate")),
                    "p99_ms": _number(totals.get("p99_ms")),
                }
            )
        timeline = await self.timeline(name)
        end = time.time()
        start = end - window
        markers = [(item["time"], item["marker"], item["label"]) for item in timeline]
        per_subset = {
            name: chart_series(found["subsets"][name]["points"]) for name in names if name in found["subsets"]
        }
        tops = shared_tops(list(per_subset.values()))  # canary and primary on one scale
        columns = [(name, signal_charts(series, start, end, markers, tops)) for name, series in per_subset.items()]
        return {
            "name": name,
            "group": mesh.group_of(name),
            "version": revision.version,
            "weights": weights,
            "subsets": subsets,
            "primary": names[0],
            "canary": names[-1] if len(names) > 1 else None,
            "percents": (0, 10, 25, 50, 75, 100),
            "timeline": timeline,
            "columns": columns,
            "signals": self.signals is not None,
            "recent": RECENT,
            "grpc": grpc_shares(found.get("grpc", {}), service.grpc.failure_codes),
        }

    async def timeline(self, name: str) -> list[dict[str, Any]]:
        """The config versions that changed `name`'s weights, with who, why and the split before, and the audited
        state changes of its rollouts (`kind` "rollout", never revertible), newest first. `marker` is what a chart
        marker links to: the config version, or minus the audit entry's id for a rollout's change."""
        revisions = await self.store.history(TIMELINE + 1)
        current = split_of(revisions[0].mesh, name) if revisions else None
        changes = []
        for newer, older in zip(revisions, revisions[1:], strict=False):
            after, before = split_of(newer.mesh, name), split_of(older.mesh, name)
            if after is None or before is None or after == before:
                continue
            label = ", ".join(f"{subset} {weight}" for subset, weight in after.items() if weight)
            changes.append(
                {
                    "kind": "weights",
                    "marker": newer.version,
                    "version": newer.version,
                    "time": newer.time,
                    "author": newer.author,
                    "reason": newer.reason,
                    "before": before,
                    "after": after,
                    "label": f"version {newer.version}: {label}" + (f" ({newer.reason})" if newer.reason else ""),
                    "revertible": before != current,
                }
            )
        since = revisions[-1].time if len(revisions) > TIMELINE else None  # the stretch of history searched
        changes += await self._rollout_changes(name, since)
        return sorted(changes, key=lambda change: change["time"], reverse=True)

    async def _rollout_changes(self, name: str, since: float | None) -> list[dict[str, Any]]:
        """The audit log's rollout state changes of `name` (start, pause, resume, promote, abort, approve)."""
        target = ROLLOUT_TARGET.format(name)
        changes = []
        for entry in await self.store.audit(AUDIT):
            if not entry.action.startswith("rollout.") or entry.target != target:
                continue
            if since is not None and entry.time < since:
                break  # older than the weight changes shown: the two stay one stretch of time
            after = entry.after if isinstance(entry.after, Mapping) else {}
            action = entry.action.removeprefix("rollout.")
            changes.append(
                {
                    "kind": "rollout",
                    "marker": -entry.id,
                    "id": entry.id,
                    "time": entry.time,
                    "action": action,
                    "rollout": str(after.get("id", "")),
                    "phase": str(after.get("phase", "")),
                    "message": str(after.get("message", "")),
                    "author": entry.who,
                    "reason": entry.reason,
                    "label": f"rollout {action} by {entry.who}" + (f" ({entry.reason})" if entry.reason else ""),
                    "revertible": False,
                }
            )
        return changes

    # Rollouts

    async def rollout(self, name: str, older: int | None = None, log: bool = True) -> dict[str, Any] | None:
        """`name`'s rollout panel: the running or last rollout (None without one), the start form's defaults and,
        with `log`, a page of its decisions newest first (those numbered below `older`). None: no driver here."""
        if self.rollouts is None:
            return None
        weights = await self.weights_of(name)
        found = await self.rollouts.get(name)
        panel: dict[str, Any] = {
            "service": name,
            "current": None if found is None else rollout_view(found),
            "key": "none" if found is None else f"{found.id}.{found.phase}",
            "start": start_defaults(weights),
            "log": [],
            "older": None,
        }
        if found is not None and log:
            entries = await self.rollouts.decisions(found.id, -1, MAX_DECISIONS)
            if older is not None:
                entries = [(seq, entry) for seq, entry in entries if seq < older]
            shown = entries[-LOG_PAGE:]
            panel["log"] = [decision_view(seq, entry) for seq, entry in reversed(shown)]
            panel["older"] = shown[0][0] if len(entries) > len(shown) else None
        return panel

    async def weights_before(self, name: str, version: int) -> dict[str, int]:
        """The split `name` had just before config `version` (what a timeline marker's revert restores)."""
        older = await self.store.get(version - 1) if version > 1 else None
        if older is None or await self.store.get(version) is None:
            raise ApiError(404, f"no config version {version} with a version before it")
        before = split_of(older.mesh, name)
        if before is None:
            raise ApiError(422, f"services.{name}: did not exist before version {version}; nothing to revert to")
        return before

    # Traces

    async def trace(self, query: str) -> dict[str, Any]:
        """Look `query` up as a trace ID (32 hex digits) and else as a request ID; `found` False with a reason."""
        if self.traces is None:
            return {"found": False, "reason": "trace lookup is not configured on this dashboard", "query": query}
        result: TraceResult | None = None
        try:
            if _TRACE_ID.fullmatch(query):
                result = await self.traces.lookup_trace(query)
            if result is None or not result.spans:
                result = await self.traces.lookup_request(query)
        except ValueError as err:
            return {"found": False, "reason": str(err), "query": query}
        if not result.spans:
            return {"found": False, "reason": not_found(result, f"request or trace ID {query}"), "query": query}
        spans = list(result.spans)
        path = frozenset(hop_edge(span) for span in spans) - {""}
        return {
            "found": True,
            "query": query,
            "trace_id": result.trace_id,
            "trace_ids": result.trace_ids,
            "request_id": result.request_id,
            "rows": [(row, hop_view(row.span)) for row in waterfall(spans)],
            "unreachable": [unreachable_text(problem) for problem in result.unreachable],
            "gateways_asked": len(result.gateways_asked),
            "graph": await self.topology(WINDOWS["5m"], path=path),
            "path": sorted(path),
        }

    async def recent_traces(self, filters: Mapping[str, str]) -> tuple[list[dict[str, Any]], str]:
        """The recent-traces list for the filters, and a one-line problem (bad filter, Jaeger down) or ""."""
        if self.traces is None:
            return [], ""
        try:
            params = {"service": filters.get("service", ""), "status": filters.get("status", "")}
            params["min_duration_ms"] = filters.get("min_ms", "")
            return await self.traces.recent(TraceFilters.parse(params)), ""
        except ValueError as err:
            return [], str(err)
        except JaegerError as err:  # the page says so instead of failing
            return [], f"the recent traces cannot be read: {err}"

    # Gateways

    async def gateways(self) -> list[dict[str, Any]]:
        # The API's own description, so "in sync" and "stale" mean the same here.
        listing: list[dict[str, Any]] = [dict(item) for item in await self.gateway_api.describe_all()]
        for item in listing:
            item["saturation"] = {}
            if self.signals is not None and not item["stale"]:
                found = await _signals(self.signals.gateway(item["instance"], WINDOWS["5m"], item["group"]))
                item["saturation"] = found["latest"] or {}
        return listing


def rollout_view(rollout: Rollout) -> dict[str, Any]:
    """What the panel shows of a rollout: the phase, each step marked done, current or next, and the verdict."""
    spec = rollout.spec
    weights = [*spec.steps, 100]
    steps = []
    for index, weight in enumerate(weights):
        if index < rollout.step or (rollout.phase == "promoted" and index == rollout.step):
            state = "done"
        elif index == rollout.step:
            state = "stopped" if rollout.phase in ENDED else "current"
        else:
            state = "next"
        steps.append({"index": index, "weight": weight, "state": state, "promotion": index == len(spec.steps)})
    verdict = rollout.verdict or {}
    return {
        "id": rollout.id,
        "phase": rollout.phase,
        "phase_text": rollout.phase.replace("_", " "),
        "active": rollout.active,
        "paused": rollout.phase == "paused",
        "primary": spec.primary,
        "canary": spec.canary,
        "weight": rollout.weight,
        "step": rollout.step,
        "steps": steps,
        "interval": spec.interval,
        "approval": spec.approval,
        "approved": rollout.approved,
        "message": rollout.message,
        "sentence": str(verdict.get("sentence") or ""),
        "outcome": str(verdict.get("outcome") or ""),
        "needs": verdict.get("needs"),
        "by": rollout.by,
        "reason": rollout.reason,
        "started": rollout.started,
        "ended": rollout.ended,
    }


def decision_view(seq: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    """One decision of the log, with its example request IDs (errors first, as the driver picked them)."""
    found = entry.get("verdict")
    verdict: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    examples = []
    for example in entry.get("examples") or []:
        if isinstance(example, Mapping) and example.get("request_id"):
            request_id = str(example["request_id"])
            examples.append(
                {
                    "request_id": request_id,
                    "href": "/traces?" + urlencode({"q": request_id}),
                    "error": bool(example.get("error")),
                    "status": example.get("status"),
                    "ms": _number(example.get("ms")),
                }
            )
    action = str(entry.get("action", ""))
    return {
        "seq": seq,
        "time": entry.get("time"),
        "action": action,
        "bad": action in ("rollback", "alert", "abort") or verdict.get("outcome") == "harm",
        "weight": entry.get("weight"),
        "message": str(entry.get("message", "")),
        "sentence": str(verdict.get("sentence") or ""),
        "who": str(entry.get("who") or ""),
        "reason": str(entry.get("reason") or ""),
        "examples": examples,
    }


def start_defaults(weights: Mapping[str, int]) -> dict[str, Any]:
    """The start form's choices: the primary is the subset with the most weight now (the first on a tie, as the API
    picks it), the canary the last other subset."""
    names = list(weights)
    primary = max(names, key=lambda name: (weights[name], -names.index(name))) if names else ""
    others = [name for name in names if name != primary]
    return {
        "subsets": names,
        "primary": primary,
        "canary": others[-1] if others else "",
        "steps": ", ".join(str(step) for step in DEFAULT_STEPS),
        "interval": f"{DEFAULT_INTERVAL:g}",
    }


async def _signals(call: Awaitable[_T]) -> _T:
    """A signals call; a window the source cannot answer is a 400 (an unavailable one raises SignalsError: 503)."""
    try:
        return await call
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def signal_charts(
    series: Mapping[str, Series],
    start: float,
    end: float,
    markers: Sequence[tuple[float, int, str]] = (),
    tops: Mapping[str, float] | None = None,
) -> list[Chart]:
    """Rate, 5xx share and latency quantiles over time, with config changes as markers. `tops` (by unit) makes
    charts shown side by side share their scale."""
    tops = tops or {}

    def chart(title: str, lines: list[tuple[str, Series]], unit: str, floor: float) -> Chart:
        floor = max(floor, tops.get(unit, 0.0))
        return line_chart(title, lines, start=start, end=end, unit=unit, markers=markers, floor=floor)

    return [
        chart("requests / s", [("rate", series.get("rate", []))], "rps", 0.0),
        chart("errors (5xx)", [("errors", series.get("error_rate", []))], "%", 0.01),
        chart("latency", [(name, series.get(name, [])) for name in ("p50", "p95", "p99")], "ms", 1.0),
    ]


def shared_tops(many: Sequence[Mapping[str, Series]]) -> dict[str, float]:
    """The largest value of each kind of chart over several subsets' series, so they are drawn on one scale."""

    def top(names: Sequence[str]) -> float:
        values = [v for series in many for name in names for _, v in series.get(name, []) if v is not None]
        return max(values, default=0.0)

    return {"rps": top(["rate"]), "%": top(["error_rate"]), "ms": top(["p50", "p95", "p99"])}


def saturation_charts(series: Mapping[str, Series], start: float, end: float) -> list[Chart]:
    def one(title: str, name: str, unit: str, floor: float = 0.0) -> Chart:
        return line_chart(title, [(name, series.get(name, []))], start=start, end=end, unit=unit, floor=floor)

    return [
        one("in flight", "inflight", "", 1.0),
        one("event-loop lag", "loop_lag_ms", "ms", 1.0),
        one("CPU (share of a core)", "cpu", "%", 0.01),
        one("memory (RSS)", "rss", "bytes"),
    ]


def unreachable_text(problem: Mapping[str, Any]) -> str:
    who = problem.get("group") or problem.get("kind") or "?"
    return f"{who} ({problem.get('address', '?')}: {problem.get('error', '?')})"


def hop_view(span: Mapping[str, Any]) -> dict[str, Any]:
    """What a waterfall row shows of a span or gateway hop (`spans.SPAN_KEYS`), and every other field and attribute
    for the row's details."""
    status, error, tries = span.get("status"), span.get("error"), span.get("tries")
    shown = ("name", "group", "reporter", "destination", "subset", "endpoint", "status", "error", "tries", "attributes")
    details = {key: value for key, value in span.items() if key not in shown and value not in (None, "", [])}
    details.update({f"attr.{key}": value for key, value in (span.get("attributes") or {}).items()})
    return {
        "name": span.get("name") or "span",
        "group": span.get("group"),
        "reporter": span.get("reporter"),
        "service": span.get("destination") or span.get("service"),
        "subset": span.get("subset"),
        "endpoint": span.get("endpoint"),
        "status": status,
        "tries": tries,
        "retried": isinstance(tries, int) and tries > 1,
        "error": error,
        "failed": bool(error) or (isinstance(status, int) and status >= 500),
        "unverified": span.get("unverified"),  # the row says so, and its details say why
        "attributes": sorted(
            (key, value if isinstance(value, str) else json.dumps(value)) for key, value in details.items()
        ),
    }


def hop_edge(span: Mapping[str, Any]) -> str:
    """The topology edge ("source node>destination node") a gateway hop crossed, else ""."""
    caller, destination = span.get("caller"), span.get("destination")
    if not caller or not destination or span.get("reporter") not in ("source", "destination"):
        return ""
    if span.get("unverified"):  # not proven to be a gateway's hop: it draws no path
        return ""
    return f"{topo.source_node(str(caller))}>{topo.destination_node(str(destination))}"
