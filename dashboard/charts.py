"""Geometry for the dashboard's server-rendered SVG: line charts with change markers, and trace waterfalls.

Everything here is pure data in, numbers and strings out; the templates (`partials/chart.html`,
`partials/waterfall.html`) turn it into SVG with presentation attributes only, which the page's
Content-Security-Policy allows (no inline styles, no script).

>>> chart = line_chart("rate", [("v1", [(0.0, 1.0), (10.0, 3.0)])], start=0.0, end=10.0, unit="rps")
>>> chart.lines[0].segments
('40.0,150.0 600.0,14.0',)
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
