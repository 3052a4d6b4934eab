"""Self-contained SVG charts (no plotting library, no scripts, no network): fate-bench's plot and
fate-inspect's report. Axes with ticks and labels, every series its own colour and marker, a
min-max whisker where a point was measured several times, dashed reference lines, and the legend
in a column of its own beside the plot, clear of the data."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

# Tableau's ten: distinct in hue, and told apart by the markers too where colour is not seen.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f")
MARKERS = ("circle", "square", "triangle", "diamond", "cross", "down")


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    spread: list[tuple[float, float]] | None = None  # (min, max) per point
    reference: bool = False  # a dashed line without markers
    color: str | None = None


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    bars: bool = False
    width: int = 880
    height: int = 440
    top_axis: tuple[str, object] | None = None  # (label, x -> text) for a second scale along the top
    y_min: float = 0.0
    y_max: float | None = None  # None: from the data

    def svg(self) -> str:
        named = [s.name for s in self.series] if len(self.series) > 1 or self.series and not self.bars else []
        legend_w = min(260, 48 + 7 * max(map(len, named))) if named else 0
        left, right, top, bottom = 64, 16 + legend_w, 40 + (22 if self.top_axis else 0), 46
        w, h = self.width, self.height
        plot_w, plot_h = w - left - right, h - top - bottom
        xs = [x for s in self.series for x, _ in s.points] or [0.0, 1.0]
        ys = [y for s in self.series for _, y in s.points] + [hi for s in self.series for _, hi in (s.spread or [])]
        x0, x1 = min(xs), max(xs)
        if self.bars:
            x0, x1 = x0 - 0.5, x1 + 0.5
        if x1 <= x0:
            x0, x1 = x0 - 1, x1 + 1
        top_y = self.y_max if self.y_max is not None else max(ys or [1.0]) * 1.05
        y0, step = self.y_min, nice_ceiling((top_y - self.y_min) / 5 or 0.2)
        y1 = y0 + math.ceil((top_y - y0) / step - 1e-9) * step
        sx = lambda x: left + (x - x0) / (x1 - x0) * plot_w  # noqa: E731
        sy = lambda y: top + plot_h - (y - y0) / (y1 - y0) * plot_h  # noqa: E731
        out = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg" '
               f'font-family="sans-serif">',
               f'<rect width="{w}" height="{h}" fill="white"/>',
               f'<text x="{left + plot_w / 2}" y="20" font-size="15" text-anchor="middle" font-weight="bold">'
               f'{html.escape(self.title)}</text>']
        for y in ticks(y0, y1):  # horizontal grid and the y scale
            out.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{left + plot_w}" y2="{sy(y):.1f}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" font-size="11" text-anchor="end">{y:g}</text>')
        xt = sorted({x for s in self.series for x, _ in s.points}) if len(set(xs)) <= 12 else ticks(x0, x1)
        for x in xt:
            out.append(f'<line x1="{sx(x):.1f}" y1="{top + plot_h}" x2="{sx(x):.1f}" y2="{top + plot_h + 4}" '
                       f'stroke="#333"/>')
            out.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 17}" font-size="11" text-anchor="middle">'
                       f'{x:g}</text>')
            if self.top_axis:
                out.append(f'<text x="{sx(x):.1f}" y="{top - 6}" font-size="11" text-anchor="middle" fill="#555">'
                           f'{html.escape(self.top_axis[1](x))}</text>')
        out += [f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
                f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>',
                f'<text x="{left + plot_w / 2}" y="{h - 8}" font-size="12" text-anchor="middle">'
                f'{html.escape(self.x_label)}</text>',
                f'<text x="16" y="{top + plot_h / 2}" font-size="12" text-anchor="middle" '
                f'transform="rotate(-90 16 {top + plot_h / 2})">{html.escape(self.y_label)}</text>']
        if self.top_axis:
            out.append(f'<text x="{left + plot_w / 2}" y="{top - 22}" font-size="11" text-anchor="middle" '
                       f'fill="#555">{html.escape(self.top_axis[0])}</text>')
        for i, s in enumerate(self.series):
            color = s.color or PALETTE[i % len(PALETTE)]
            marker = MARKERS[i % len(MARKERS)]
            pts = sorted(s.points)
            if self.bars:
                bar = max(1.0, plot_w / max(len(pts), 1) * 0.8)
                out += [f'<rect x="{sx(x) - bar / 2:.1f}" y="{sy(y):.1f}" width="{bar:.1f}" '
                        f'height="{sy(y0) - sy(y):.1f}" fill="{color}"/>' for x, y in pts]
                continue
            dash = ' stroke-dasharray="6 4"' if s.reference else ""
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            for (x, _), (lo, hi) in zip(s.points, s.spread or []):
                out.append(f'<line x1="{sx(x):.1f}" y1="{sy(lo):.1f}" x2="{sx(x):.1f}" y2="{sy(hi):.1f}" '
                           f'stroke="{color}" stroke-width="1.5"/>')
            if not s.reference:
                out += [shape(marker, sx(x), sy(y), color) for x, y in pts]
            if legend_w:
                ly = top + 8 + 22 * i
                lx = w - legend_w + 4
                out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 26}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>')
                if not s.reference:
                    out.append(shape(marker, lx + 13, ly, color))
                out.append(f'<text x="{lx + 34}" y="{ly + 4}" font-size="12">{html.escape(s.name)}</text>')
        out.append("</svg>")
        return "".join(out)


def shape(kind: str, x: float, y: float, color: str, r: float = 4.5) -> str:
    if kind == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}"/>'
    if kind == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{color}"/>'
    if kind == "cross":
        return (f'<path d="M{x - r:.1f},{y - r:.1f}L{x + r:.1f},{y + r:.1f}M{x - r:.1f},{y + r:.1f}L{x + r:.1f},'
                f'{y - r:.1f}" stroke="{color}" stroke-width="2.5"/>')
    corners = {"triangle": ((0, -1.2), (1.1, 0.8), (-1.1, 0.8)), "down": ((0, 1.2), (1.1, -0.8), (-1.1, -0.8)),
               "diamond": ((0, -1.3), (1.1, 0), (0, 1.3), (-1.1, 0))}[kind]
    points = " ".join(f"{x + dx * r:.1f},{y + dy * r:.1f}" for dx, dy in corners)
    return f'<polygon points="{points}" fill="{color}"/>'


def nice_ceiling(value: float) -> float:
    """The next 1, 2, 2.5 or 5 times a power of ten at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value * 0.999)


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = nice_ceiling((high - low) / count)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]
