"""Learning curves as PNG files (Pillow only: no plotting library is installed).

`line_chart_png` draws one or more series of (x, y) points on shared axes with tick labels,
a legend and a marker at each point. `chart_geometry` is the mapping from data to pixels, so
a test can check that a point is drawn where its value says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from weakseg.data.io import atomic_path
from weakseg.report.plots import STAGE_COLOURS, nice_ticks

# The report's stage colours (Okabe-Ito hues, distinct for colour-blind readers), then two more.
SERIES_COLOURS = [*STAGE_COLOURS.values(), "#d55e00", "#56b4e9"]


@dataclass
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float]


@dataclass
class ChartGeometry:
    left: int
    top: int
    width: int
    height: int
    x_ticks: list[float]
    y_ticks: list[float]

    def pixel(self, x: float, y: float) -> tuple[float, float]:
        x0, x1, y0, y1 = self.x_ticks[0], self.x_ticks[-1], self.y_ticks[0], self.y_ticks[-1]
        return (self.left + (x - x0) / (x1 - x0) * self.width,
                self.top + (1.0 - (y - y0) / (y1 - y0)) * self.height)


def chart_geometry(series: Sequence[Series], size: tuple[int, int] = (720, 440), y_from_zero: bool = True) -> ChartGeometry:
    """Axes spanning the data; the y axis starts at 0 unless `y_from_zero` is off (a
    curve's rise then reads at its true size)."""
    left, right, top, bottom = 64, 24, 40, 56
    xs = [x for s in series for x in s.xs] or [0.0, 1.0]
    ys = [y for s in series for y in s.ys] or [0.0, 1.0]
    low = min(0.0, min(ys)) if y_from_zero else min(ys)
    return ChartGeometry(left, top, size[0] - left - right, size[1] - top - bottom,
                         nice_ticks(min(xs), max(xs)), nice_ticks(low, max(ys)))


def _label(value: float) -> str:
    return f"{value:g}"


def line_chart_png(path: str | Path, series: Sequence[Series], title: str, x_label: str, y_label: str,
                   size: tuple[int, int] = (720, 440), y_from_zero: bool = True) -> ChartGeometry:
    """Write the chart to `path` (atomically) and return its geometry."""
    for s in series:
        if len(s.xs) != len(s.ys):
            raise ValueError(f"series {s.name!r}: {len(s.xs)} x values but {len(s.ys)} y values")
    geometry = chart_geometry(series, size, y_from_zero)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    g = geometry
    draw.rectangle([g.left, g.top, g.left + g.width, g.top + g.height], outline="#999999", fill="#fbfbfb")
    for t in g.x_ticks:
        px, _ = g.pixel(t, g.y_ticks[0])
        draw.line([px, g.top, px, g.top + g.height], fill="#e4e4e4")
        draw.text((px, g.top + g.height + 6), _label(t), fill="#333333", font=font, anchor="ma")
    for t in g.y_ticks:
        _, py = g.pixel(g.x_ticks[0], t)
        draw.line([g.left, py, g.left + g.width, py], fill="#e4e4e4")
        draw.text((g.left - 6, py), _label(t), fill="#333333", font=font, anchor="rm")
    draw.text((size[0] / 2, 12), title, fill="#111111", font=font, anchor="ma")
    draw.text((g.left + g.width / 2, size[1] - 18), x_label, fill="#333333", font=font, anchor="ma")
    draw.text((8, g.top - 22), y_label, fill="#333333", font=font)
    for i, s in enumerate(series):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        points = [g.pixel(x, y) for x, y in zip(s.xs, s.ys)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        lx, ly = g.left + 10, g.top + 10 + 16 * i
        draw.line([lx, ly + 6, lx + 18, ly + 6], fill=colour, width=3)
        draw.text((lx + 24, ly), s.name, fill="#111111", font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return geometry
