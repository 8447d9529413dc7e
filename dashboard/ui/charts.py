"""Geometry for the dashboard's server-rendered SVG: line charts with change markers, trace waterfalls, and the
topology graph (`graph`: boxes where `topology.layout` puts them, edges as curves, and their labels on plates in
the lanes between the layers, where they cover no box and no other label).

Everything here is pure data in, numbers and strings out; the macros in `templates/macros.html` and the waterfall
in `templates/traces.html` turn it into SVG with presentation attributes only, which the page's
Content-Security-Policy allows (no inline styles, no script).

>>> chart = line_chart("rate", [("v1", [(0.0, 1.0), (10.0, 3.0)])], start=0.0, end=10.0, unit="rps")
>>> chart.lines[0].segments
('40.0,150.0 600.0,14.0',)
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dashboard.signals import topology as topo

WIDTH = 600
HEIGHT = 150
LEFT = 52  # room for the y labels
TOP = 14
BOTTOM = 10  # room under the plot
Point = tuple[float, float | None]


@dataclass(frozen=True, slots=True)
class Line:
    """One series: polylines (a gap where a value is missing) and its last value, formatted."""

    name: str
    index: int  # which colour (CSS class s0..s5)
    segments: tuple[str, ...]
    last: str


@dataclass(frozen=True, slots=True)
class Marker:
    """A config change on the time axis: `x` in chart units, the version it made and a one-line label."""

    x: float
    version: int
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    unit: str
    width: int
    height: int
    left: int
    top: int
    bottom: int
    lines: tuple[Line, ...]
    y_ticks: tuple[tuple[float, str], ...]
    markers: tuple[Marker, ...]
    start_label: str
    end_label: str

    @property
    def empty(self) -> bool:
        return not any(line.segments for line in self.lines)


def fmt(value: float | None, unit: str) -> str:
    """A value for people: `12.3 rps`, `4.1 %` (from a ratio), `250 ms`, `1.2 MB`."""
    if value is None or math.isnan(value):
        return "–"
    if unit == "%":
        return f"{_short(value * 100)} %"
    if unit == "ms":
        return f"{_short(value)} ms"
    if unit in ("rps", "") and abs(value) >= 10_000:
        return f"{_short(value / 1000)}k {unit}".strip()
    if unit == "bytes":
        for scale, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= scale:
                return f"{_short(value / scale)} {suffix}"
        return f"{value:.0f} B"
    return f"{_short(value)} {unit}".strip()


def _short(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    if abs(value) >= 0.01:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.2g}"


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _nice_top(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return float(next(step * power for step in (1, 2, 5, 10) if step * power >= value))


def line_chart(
    title: str,
    series: Sequence[tuple[str, Sequence[Point]]],
    *,
    start: float,
    end: float,
    unit: str,
    markers: Sequence[tuple[float, int, str]] = (),
    floor: float = 0.0,
) -> Chart:
    """A chart of `series` (name, [(time, value or None)]) from `start` to `end` (seconds since the epoch).
    `markers` are (time, version, label) config changes; those outside the window are left out. The y axis
    starts at 0 and ends at a round number at or above the largest value (and `floor`)."""
    span = max(end - start, 1e-9)
    values = [value for _, points in series for _, value in points if value is not None and math.isfinite(value)]
    top_value = _nice_top(max([floor, *values]) if values else floor)
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - TOP - BOTTOM

    def x_of(ts: float) -> float:
        return round(LEFT + (min(max(ts, start), end) - start) / span * plot_w, 1)

    def y_of(value: float) -> float:
        return round(TOP + plot_h - min(value / top_value, 1.0) * plot_h, 1)

    lines = []
    for index, (name, points) in enumerate(series):
        segments: list[str] = []
        current: list[str] = []
        last: float | None = None
        for ts, value in sorted(points, key=lambda point: point[0]):
            if value is None or not math.isfinite(value) or ts < start or ts > end:
                if current:
                    segments.append(" ".join(current))
                current = []
                continue
            current.append(f"{x_of(ts)},{y_of(value)}")
            last = value
        if current:
            segments.append(" ".join(current if len(current) > 1 else current * 2))
        lines.append(Line(name, index % 6, tuple(segments), fmt(last, unit)))
    ticks = tuple((y_of(top_value * share), fmt(top_value * share, unit)) for share in (0.0, 0.5, 1.0))
    shown = tuple(Marker(x_of(ts), version, label) for ts, version, label in markers if start <= ts <= end)
    return Chart(title, unit, WIDTH, HEIGHT, LEFT, TOP, BOTTOM, tuple(lines), ticks, shown, clock(start), clock(end))


@dataclass(frozen=True, slots=True)
class Row:
    """One span of a waterfall: indented by `depth`, its bar at `x`..`x + width` of 1000 units."""

    span: Mapping[str, Any]
    depth: int
    x: float
    width: float
    offset_ms: float
    duration_ms: float


def waterfall(spans: Sequence[Mapping[str, Any]]) -> tuple[Row, ...]:
    """Spans (each with `span_id`, `parent_span_id`, `start` in seconds and `duration_ms`) as rows: each parent
    before its children, siblings by start time, bars on a shared time axis. A span whose parent is missing is a
    root."""
    if not spans:
        return ()
    ids = {span["span_id"] for span in spans}
    children: dict[str | None, list[Mapping[str, Any]]] = {}
    for span in spans:
        parent = span.get("parent_span_id") or None
        children.setdefault(parent if parent in ids else None, []).append(span)
    begins = {span["span_id"]: round(float(span["start"]) * 1e9) for span in spans}
    ends = {
        span["span_id"]: begins[span["span_id"]] + round(max(float(span["duration_ms"] or 0), 0) * 1e6)
        for span in spans
    }
    first = min(begins.values())
    last = max(ends.values())
    total = max(last - first, 1)
    rows: list[Row] = []
    seen: set[str] = set()

    def visit(parent: str | None, depth: int) -> None:
        for span in sorted(children.get(parent, ()), key=lambda item: begins[item["span_id"]]):
            if span["span_id"] in seen:  # a cycle in bad data: show each span once
                continue
            seen.add(span["span_id"])
            begin, finish = begins[span["span_id"]], ends[span["span_id"]]
            x = (begin - first) / total * 1000
            width = max((finish - begin) / total * 1000, 2.0)
            rows.append(
                Row(
                    span,
                    depth,
                    round(x, 1),
                    round(min(width, 1000 - x), 1),
                    (begin - first) / 1e6,
                    (finish - begin) / 1e6,
                )
            )
            visit(span["span_id"], depth + 1)

    visit(None, 0)
    return tuple(rows)


# The topology graph

# Each edge ends in a straight run into its destination; its label sits on a plate on that run, in the lane before
# the destination's layer. Labels are rows of 10.5 px monospace text, 6.3 px a character.
LABEL_CHAR, LABEL_ROW = 6.4, 12.0
LABEL_PAD_X, LABEL_PAD_Y = 6.0, 3.0  # inside a plate
LABEL_SPACE = 4.0  # between two plates stacked in one lane
CURVE_ROOM = 90.0  # before a lane's plates, where edges bend from the column they leave to their run
LEAD = 8.0  # of each run before its plate, so the curve meets the plate level
ARROW_ROOM = 24.0  # after a lane's plates, for the arrowhead (and a bend when a run cannot end on its box)


def dom_id(prefix: str, key: str) -> str:
    """A stable element id for any text (node ids hold ':'): htmx puts focus back on the element with the same id."""
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def number(value: object) -> float | None:
    """A finite number as a float; anything else (None, a string, a bool, NaN) as None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


Box = tuple[float, float, float, float]  # left, top, right, bottom
XY = tuple[float, float]


def ports(ends: list[tuple[str, float]], box: Box) -> dict[str, float]:
    """Where edges meet one side of a box: spread over its middle, in the order of the other ends' heights, so
    edges sharing a box neither start nor end at one point."""
    ordered = sorted(ends, key=lambda end: (end[1], end[0]))
    height = box[3] - box[1]
    step = height * 0.6 / max(len(ordered), 1)
    return {key: box[1] + height * 0.2 + step * (index + 0.5) for index, (key, _) in enumerate(ordered)}


def spread(wanted: Sequence[float], heights: Sequence[float], space: float, low: float) -> list[float]:
    """Tops for boxes stacked in one column, given in the order of their `wanted` tops: each as near its wanted
    top as the others allow, at least `space` apart and none above `low`. Boxes that would overlap move as one
    block, placed where its members want it on average.

    >>> spread([10.0, 12.0, 100.0], [20.0, 20.0, 20.0], 4.0, 0.0)
    [0.0, 24.0, 100.0]
    """
    blocks: list[tuple[list[int], float]] = []  # (members, top)

    def below(members: list[int]) -> float:  # from the block's top to where the next box may start
        return sum(heights[i] + space for i in members)

    for index, top in enumerate(wanted):
        blocks.append(([index], max(low, top)))
        while len(blocks) > 1 and blocks[-2][1] + below(blocks[-2][0]) > blocks[-1][1]:
            members = blocks[-2][0] + blocks.pop()[0]
            offsets = itertools.accumulate((heights[i] + space for i in members[:-1]), initial=0.0)
            mean = math.fsum(wanted[i] - offset for i, offset in zip(members, offsets, strict=True)) / len(members)
            blocks[-1] = (members, max(low, mean))
    tops = []
    for members, top in blocks:
        for i in members:
            tops.append(top)
            top += heights[i] + space
    return tops


def edge_label(edge: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The rows of an edge's label and the CSS class of each: rate and 5xx share, (mTLS and) p99, calls denied."""
    rate = f"{fmt(number(edge.get('rps')) or 0.0, 'rps')} · {fmt(number(edge.get('error_rate')), '%')}"
    latency = ("mTLS · " if edge.get("mtls") else "") + f"p99 {fmt(number(edge.get('p99_ms')), 'ms')}"
    rows = [("edge-label", rate), ("edge-label", latency)]
    denied = int(number(edge.get("denied")) or 0)
    return rows + [("edge-denied", f"{denied} denied")] if denied else rows


def plate_size(rows: Sequence[tuple[str, str]]) -> tuple[float, float]:
    return LABEL_CHAR * max(len(text) for _, text in rows) + 2 * LABEL_PAD_X, LABEL_ROW * len(rows) + 2 * LABEL_PAD_Y


def stack_labels(lanes: Mapping[float, list[tuple[float, str, float]]]) -> dict[str, float]:
    """The height of each edge's run (and its label's centre), from the height each wants and its plate's, by lane:
    `(wanted, edge key, plate height)`. Plates in a lane keep the order of the heights they want, as near them as
    the others allow and never overlapping (`spread`)."""
    centres: dict[str, float] = {}
    for lane in lanes.values():
        ordered = sorted(lane)
        tops = spread([y - h / 2 for y, _, h in ordered], [h for _, _, h in ordered], LABEL_SPACE, LABEL_SPACE)
        centres.update((key, top + h / 2) for (_, key, h), top in zip(ordered, tops, strict=True))
    return centres


def crossings(columns: Mapping[float, list[Box]], start: XY, end: XY) -> list[XY]:
    """Where an edge from `start` to `end` crosses the layers between: level through the gap between two boxes of
    each (or above or below them all), the gap nearest to a straight line, so that it never passes behind a box.
    `columns`: each layer's boxes, by the layer's centre."""
    points: list[XY] = []
    (x1, y1), (x2, y2) = start, end
    for centre in sorted(columns):
        column = sorted(columns[centre], key=lambda box: box[1])
        left, right = min(box[0] for box in column), max(box[2] for box in column)
        if x1 < left and right < x2:
            gaps = [(above[3] + below[1]) / 2 for above, below in zip(column, column[1:], strict=False)]
            gaps += [column[0][1] - topo.GAP_Y / 2, column[-1][3] + topo.GAP_Y / 2]
            wanted = y1 + (y2 - y1) * (centre - x1) / (x2 - x1)
            y = min(gaps, key=lambda gap: (abs(gap - wanted), gap))
            points += [(left, y), (right, y)]
            x1, y1 = right, y
    return points


def edge_path(points: Sequence[XY]) -> str:
    """An SVG path through `points`: a bend (level at both ends) from the first to the second, straight on to the
    third, a bend to the fourth, and so on."""
    (x, y), *rest = points
    d = [f"M{x:.1f},{y:.1f}"]
    for index, (to_x, to_y) in enumerate(rest):
        if index % 2 or abs(to_y - y) < 0.05:
            d.append(f"L{to_x:.1f},{to_y:.1f}")
        else:
            half = (to_x - x) / 2
            d.append(f"C{x + half:.1f},{y:.1f} {to_x - half:.1f},{to_y:.1f} {to_x:.1f},{to_y:.1f}")
        x, y = to_x, to_y
    return " ".join(d)


def graph_nodes(
    document: Mapping[str, Any], positions: Mapping[str, tuple[float, float]], selected: str, on_path: set[str]
) -> list[dict[str, Any]]:
    """Each node's box centred where `topology.layout` put it, sized by `topology.node_size`, with its text rows."""
    nodes = []
    for node in document["nodes"]:
        node_id = str(node["id"])
        width, height = topo.node_size(node)
        x, y = positions[node_id][0] - width / 2, positions[node_id][1] - height / 2
        lines = topo.node_lines(node)
        first = y + (height - topo.ROW * len(lines)) / 2 + topo.ROW - 5  # the rows' baselines, centred in the box
        nodes.append(
            {
                "id": node_id,
                "dom": dom_id("node", node_id),
                "kind": str(node["kind"]),
                "name": lines[0],
                "rows": [(round(first + topo.ROW * i, 1), line) for i, line in enumerate(lines)],
                "health": node.get("health") if node.get("health") in topo.HEALTH else "ok",
                "box": (x, y, x + width, y + height),
                "x": round(x, 1),
                "y": round(y, 1),
                "w": round(width, 1),
                "h": round(height, 1),
                "tx": round(x + topo.PADDING, 1),
                "selected": node_id == selected,
                "on_path": node_id in on_path,
            }
        )
    return nodes


def routes(
    edges: Sequence[tuple[str, str, str]],
    positions: Mapping[str, XY],
    boxes: Mapping[str, Box],
    rows: Mapping[str, list[tuple[str, str]]],
) -> dict[str, dict[str, Any]]:
    """Each edge's path and label, by key, for `edges` (key, source, destination) between `boxes` (by node id)
    laid out at `positions`. Edges end in a straight run carrying their label on a plate, in the lane before their
    destination's layer: the plates of a lane are one width and stacked (`stack_labels`) near where their edges
    meet the box (`ports`), so each label sits on its own edge and covers no other (nor any box, the lanes being
    as wide as `lane_room` asked)."""
    columns: dict[float, list[Box]] = {}  # by layer (its centre): its boxes
    lanes: dict[float, tuple[float, float]] = {}  # by layer: the right end of the lane before it, and its width
    for node_id, box in boxes.items():
        columns.setdefault(positions[node_id][0], []).append(box)
        right, width = lanes.get(positions[node_id][0], (box[0], 0.0))
        lanes[positions[node_id][0]] = (min(right, box[0] - ARROW_ROOM), width)
    for key, _, destination in edges:
        right, width = lanes[positions[destination][0]]
        lanes[positions[destination][0]] = (right, max(width, plate_size(rows[key])[0]))
    incoming: dict[str, list[tuple[str, float]]] = {}
    for key, source, destination in edges:
        incoming.setdefault(destination, []).append((key, positions[source][1]))
    wanted = {key: y for node, ends in incoming.items() for key, y in ports(ends, boxes[node]).items()}
    stacks: dict[float, list[tuple[float, str, float]]] = {}
    for key, _, destination in edges:
        stacks.setdefault(positions[destination][0], []).append((wanted[key], key, plate_size(rows[key])[1]))
    runs = stack_labels(stacks)
    outgoing: dict[str, list[tuple[str, float]]] = {}
    for key, source, _ in edges:
        outgoing.setdefault(source, []).append((key, runs[key]))
    starts = {key: y for node, ends in outgoing.items() for key, y in ports(ends, boxes[node]).items()}
    found = {}
    for key, source, destination in edges:
        y, (right, width), (x2, top, _, bottom) = runs[key], lanes[positions[destination][0]], boxes[destination]
        left, height = right - width, plate_size(rows[key])[1]
        end = y if top + 0.15 * (bottom - top) <= y <= bottom - 0.15 * (bottom - top) else wanted[key]  # or bend
        start, run = (boxes[source][2], starts[key]), [(left - LEAD, y), (right, y)]
        baseline = y - height / 2 + LABEL_PAD_Y + LABEL_ROW - 3  # 10.5 px text: 9 px above the baseline
        found[key] = {
            "d": edge_path([start, *crossings(columns, start, run[0]), *run, (x2, end)]),
            "run": (round(left - LEAD, 1), round(right, 1), round(y, 1)),
            "plate": (round(left, 1), round(y - height / 2, 1), round(width, 1), round(height, 1)),
            "lx": round(left + width / 2, 1),
            "lines": [(round(baseline + LABEL_ROW * i, 1), *row) for i, row in enumerate(rows[key])],
        }
    return found


def lane_room(edges: Sequence[tuple[str, str, str]], rows: Mapping[str, list[tuple[str, str]]]) -> dict[str, float]:
    """The gap each destination needs before its layer: room for edges to bend, for their labels, for arrows."""
    room: dict[str, float] = {}
    for key, _, destination in edges:
        room[destination] = max(room.get(destination, 0.0), CURVE_ROOM + plate_size(rows[key])[0] + ARROW_ROOM)
    return room


def graph(
    document: Mapping[str, Any],
    selected_node: str,
    selected_edge: str,
    path: frozenset[str],
    thresholds: topo.Thresholds,
) -> dict[str, Any]:
    """SVG geometry: the boxes (`graph_nodes`), and an edge from box side to box side for each pair that talked,
    its label on it (`routes`)."""
    edges = [(f"{edge['source']}>{edge['destination']}", edge) for edge in document["edges"]]
    rows = {key: edge_label(edge) for key, edge in edges}
    ends = [(key, str(edge["source"]), str(edge["destination"])) for key, edge in edges]
    positions = topo.layout(document, lane_room(ends, rows))
    nodes = graph_nodes(document, positions, selected_node, {node for edge in path for node in edge.split(">")})
    boxes: dict[str, Box] = {node["id"]: node.pop("box") for node in nodes}
    drawn = [(key, source, destination) for key, source, destination in ends if {source, destination} <= set(boxes)]
    found = routes(drawn, positions, boxes, rows)
    views = []
    for key, edge in edges:
        if key not in found:
            continue
        error_rate, p99 = number(edge.get("error_rate")), number(edge.get("p99_ms"))
        views.append(
            {
                "key": key,
                "dom": dom_id("edge", key),
                "source": str(edge["source"]),
                "destination": str(edge["destination"]),
                **found[key],
                "rps": number(edge.get("rps")) or 0.0,
                "error_rate": error_rate,
                "p50_ms": number(edge.get("p50_ms")),
                "p99_ms": p99,
                "mtls": bool(edge.get("mtls")),
                "denied": int(number(edge.get("denied")) or 0),
                "health": thresholds.health(error_rate, p99) if edge.get("rps") else "idle",
                "selected": key == selected_edge,
                "on_path": key in path,
            }
        )
    width, height = topo.canvas_size(document, positions) if nodes else (300.0, 80.0)
    lowest = max((view["plate"][1] + view["plate"][3] for view in views), default=0.0)
    height = max(height, lowest + topo.MARGIN)
    return {"nodes": nodes, "edges": views, "width": round(width), "height": round(height), "path": bool(path)}
