"""Inline SVG charts for the HTML report: horizontal per-class IoU bars and a J-vs-F scatter.

Each function returns an `<svg>` element as a string, with no `xmlns` attribute (HTML5 does
not need it for inline SVG, and the report then holds no URL at all). Every number a reader
might want to check is also kept as a `data-*` attribute, so a test can compare the drawing
with the values it was made from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Sequence

# One colour per pipeline stage, in stage order; chosen to stay distinct for colour-blind
# readers (Okabe-Ito hues).
STAGE_COLOURS = {
    "cam": "#0072b2",
    "refined": "#e69f00",
    "pseudo_labels": "#009e73",
    "final": "#cc79a7",
}


def _num(value: float) -> str:
    """SVG coordinates with two decimals: enough for a screen, short in the file."""
    return f"{value:.2f}"


def is_missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def percent(value: float | None) -> str:
    """A metric in [0, 1] as a percentage with one decimal, the way papers print J and F."""
    return "n/a" if is_missing(value) else f"{100 * value:.1f}"


def iou_bars_svg(names: Sequence[str], values: Sequence[float | None], track_width: float = 320.0) -> str:
    """Horizontal bars, one per class: a grey track of `track_width` (IoU 1) and a bar whose
    width is IoU x track_width. A class absent from the evaluation (None / NaN) gets "n/a"
    and no bar, so it cannot be mistaken for an IoU of 0."""
    label_width, value_width, row, bar_height = 130.0, 50.0, 22.0, 14.0
    width = label_width + track_width + value_width
    height = row * len(names) + 6
    parts = [
        f'<svg class="iou-bars" width="{_num(width)}" height="{_num(height)}" '
        f'viewBox="0 0 {_num(width)} {_num(height)}" role="img" aria-label="per-class IoU">'
    ]
    for i, (name, value) in enumerate(zip(names, values)):
        y = 3 + i * row
        text_y = y + bar_height - 3
        parts.append(f'<g class="iou-row" data-class="{escape(name)}">')
        parts.append(
            f'<text x="{_num(label_width - 6)}" y="{_num(text_y)}" text-anchor="end" class="label">{escape(name)}</text>'
        )
        parts.append(
            f'<rect class="track" x="{_num(label_width)}" y="{_num(y)}" width="{_num(track_width)}" '
            f'height="{_num(bar_height)}" fill="#eeeeee"/>'
        )
        if is_missing(value):
            parts.append(f'<text x="{_num(label_width + 4)}" y="{_num(text_y)}" class="na">n/a</text>')
        else:
            parts.append(
                f'<rect class="bar" x="{_num(label_width)}" y="{_num(y)}" width="{_num(value * track_width)}" '
                f'height="{_num(bar_height)}" fill="#4c72b0" data-iou="{value!r}"><title>{escape(name)}: '
                f"IoU {percent(value)} %</title></rect>"
            )
            parts.append(
                f'<text x="{_num(label_width + track_width + 6)}" y="{_num(text_y)}" class="value">{percent(value)}</text>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def nice_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """Tick positions covering [low, high] at a step of 1, 2 or 5 x 10^k: the step whose tick
    count is closest to `target`, and of those the one that wastes the least axis."""
    if high <= low:
        low, high = low - 0.05, high + 0.05
    magnitude = 10 ** math.floor(math.log10((high - low) / max(target - 1, 1)))
    best = None
    for step in (m * magnitude for m in (0.5, 1, 2, 5, 10)):
        first = math.floor(low / step + 1e-9) * step
        last = math.ceil(high / step - 1e-9) * step
        count = int(round((last - first) / step)) + 1
        key = (abs(count - target), last - first)
        if best is None or key < best[0]:
            best = (key, first, step, count)
    _, first, step, count = best
    # Rounded to the step's decimals so labels read 0.3, not 0.30000000000000004.
    decimals = max(0, -int(math.floor(math.log10(step)))) + 1
    return [round(first + i * step, decimals) for i in range(count)]


@dataclass
class ScatterPoint:
    run: str
    stage: str
    f: float
    j: float


def jf_scatter_svg(points: Sequence[ScatterPoint], stages: Sequence[str], width: float = 640.0, height: float = 460.0) -> str:
    """J (y) against F (x), one point per (run, stage), coloured by stage, as in hfpl Fig. 1.

    The points of one run are joined in stage order and the run's folder name is written
    once, beside its latest stage, so a run's path from CAM to final network reads at a
    glance without one label per point piling up. Later stages are drawn smaller on top of
    earlier ones, so stages with equal scores (refined = pseudo_labels when no pixel is
    dropped) show as concentric rings instead of hiding each other. The axes span the data
    (with a margin), not [0, 1]: runs a few points apart would otherwise overlap."""
    left, right, top, bottom = 56.0, 110.0, 40.0, 46.0
    plot_w, plot_h = width - left - right, height - top - bottom
    fs = [p.f for p in points] or [0.0, 1.0]
    js = [p.j for p in points] or [0.0, 1.0]
    x_ticks = nice_ticks(max(0.0, min(fs) - 0.02), min(1.0, max(fs) + 0.02))
    y_ticks = nice_ticks(max(0.0, min(js) - 0.02), min(1.0, max(js) + 0.02))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    order = {stage: i for i, stage in enumerate(stages)}

    def sx(f: float) -> float:
        return left + (f - x0) / (x1 - x0) * plot_w

    def sy(j: float) -> float:
        return top + (1 - (j - y0) / (y1 - y0)) * plot_h

    def radius(stage: str) -> float:
        return max(3.5, 9.5 - 1.5 * order.get(stage, len(order)))

    parts = [
        f'<svg class="jf-scatter" width="{_num(width)}" height="{_num(height)}" '
        f'viewBox="0 0 {_num(width)} {_num(height)}" role="img" aria-label="J against F" '
        f'data-x0="{x0!r}" data-x1="{x1!r}" data-y0="{y0!r}" data-y1="{y1!r}" '
        f'data-left="{left!r}" data-top="{top!r}" data-plot-width="{plot_w!r}" data-plot-height="{plot_h!r}">',
        f'<rect x="{_num(left)}" y="{_num(top)}" width="{_num(plot_w)}" height="{_num(plot_h)}" fill="#fbfbfb" stroke="#999999"/>',
    ]
    for t in x_ticks:
        x = sx(t)
        parts.append(f'<line class="grid" x1="{_num(x)}" y1="{_num(top)}" x2="{_num(x)}" y2="{_num(top + plot_h)}" stroke="#e3e3e3"/>')
        parts.append(f'<line x1="{_num(x)}" y1="{_num(top + plot_h)}" x2="{_num(x)}" y2="{_num(top + plot_h + 5)}" stroke="#555555"/>')
        parts.append(f'<text class="tick x-tick" x="{_num(x)}" y="{_num(top + plot_h + 18)}" text-anchor="middle">{t:g}</text>')
    for t in y_ticks:
        y = sy(t)
        parts.append(f'<line class="grid" x1="{_num(left)}" y1="{_num(y)}" x2="{_num(left + plot_w)}" y2="{_num(y)}" stroke="#e3e3e3"/>')
        parts.append(f'<line x1="{_num(left - 5)}" y1="{_num(y)}" x2="{_num(left)}" y2="{_num(y)}" stroke="#555555"/>')
        parts.append(f'<text class="tick y-tick" x="{_num(left - 8)}" y="{_num(y + 4)}" text-anchor="end">{t:g}</text>')
    parts.append(
        f'<text class="axis-title" x="{_num(left + plot_w / 2)}" y="{_num(height - 8)}" text-anchor="middle">'
        "F (contour F-measure)</text>"
    )
    parts.append(
        f'<text class="axis-title" x="14" y="{_num(top + plot_h / 2)}" text-anchor="middle" '
        f'transform="rotate(-90 14 {_num(top + plot_h / 2)})">J (mIoU)</text>'
    )
    # Legend: the stage colours and sizes, in one row above the plot.
    lx = left
    for stage in stages:
        parts.append(
            f'<circle cx="{_num(lx + 8)}" cy="{_num(top - 18)}" r="{_num(radius(stage))}" '
            f'fill="{STAGE_COLOURS.get(stage, "#333333")}"/>'
        )
        parts.append(f'<text class="legend" x="{_num(lx + 20)}" y="{_num(top - 14)}">{escape(stage)}</text>')
        lx += 30 + 8 * len(stage)

    runs = list(dict.fromkeys(p.run for p in points))
    paths = {run: sorted((p for p in points if p.run == run), key=lambda p: order.get(p.stage, len(order))) for run in runs}
    for path in paths.values():
        if len(path) > 1:
            coords = " ".join(f"{_num(sx(p.f))},{_num(sy(p.j))}" for p in path)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="#bbbbbb" stroke-width="1"/>')
    for p in sorted(points, key=lambda p: order.get(p.stage, len(order))):
        colour = STAGE_COLOURS.get(p.stage, "#333333")
        parts.append(
            f'<circle class="point" cx="{_num(sx(p.f))}" cy="{_num(sy(p.j))}" r="{_num(radius(p.stage))}" '
            f'fill="{colour}" stroke="#ffffff" stroke-width="1" data-run="{escape(p.run)}" '
            f'data-stage="{escape(p.stage)}" data-f="{p.f!r}" data-j="{p.j!r}"><title>{escape(p.run)} / '
            f"{escape(p.stage)}: J {percent(p.j)}, F {percent(p.f)}</title></circle>"
        )
    for run, path in paths.items():
        last = path[-1]
        x, y = sx(last.f), sy(last.j)
        # Continue the direction the run's path arrived from, so the name lands beside its
        # latest point rather than on its earlier ones; flip it where it would leave the plot.
        prev = path[-2] if len(path) > 1 else None
        going_left = prev is not None and sx(prev.f) > x
        going_down = prev is not None and sy(prev.j) < y
        text_width = 6.5 * len(run)  # about 11 px DejaVu Sans per character
        if going_left and x - 10 - text_width < left:
            going_left = False
        if not going_left and x + 10 + text_width > width:
            going_left = True
        anchor, dx = ("end", -10.0) if going_left else ("start", 10.0)
        dy = 16.0 if going_down else -8.0
        parts.append(
            f'<text class="point-label" data-run="{escape(run)}" x="{_num(x + dx)}" y="{_num(y + dy)}" '
            f'text-anchor="{anchor}">{escape(run)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
