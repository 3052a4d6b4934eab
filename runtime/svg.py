"""Small self-contained SVG line and bar charts (no plotting library, no scripts, no network)."""

from __future__ import annotations

import html

COLORS = {"cross_layer": "#d62728", "cross_layer_norm": "#ff7f0e", "eap": "#1f77b4", "previous_token": "#7f7f7f",
          "cross-layer": "#d62728", "none": "#7f7f7f", "all-resident": "#2ca02c"}


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]], y_max: float = 1.0,
              bars: bool = False, x_label: str = "", y_label: str = "") -> str:
    w, h, pad = 300, 180, 34
    xs = [x for pts in series.values() for x, _ in pts] or [0, 1]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    sx = lambda x: pad + (x - x0) / (x1 - x0) * (w - pad - 8)  # noqa: E731
    sy = lambda y: h - pad + 4 - (y / y_max) * (h - pad - 12)  # noqa: E731
    parts = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{w / 2}" y="11" font-size="11" text-anchor="middle">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{sy(0)}" x2="{w - 8}" y2="{sy(0)}" stroke="#999"/>',
             f'<line x1="{pad}" y1="{sy(0)}" x2="{pad}" y2="{sy(y_max)}" stroke="#999"/>',
             f'<text x="{pad - 3}" y="{sy(y_max) + 4}" font-size="9" text-anchor="end">{y_max:.3g}</text>',
             f'<text x="{pad - 3}" y="{sy(0)}" font-size="9" text-anchor="end">0</text>',
             f'<text x="{pad}" y="{h - 8}" font-size="9">{x0:g}</text>',
             f'<text x="{w - 8}" y="{h - 8}" font-size="9" text-anchor="end">{x1:g} {html.escape(x_label)}</text>',
             f'<text x="4" y="{sy(y_max / 2)}" font-size="9">{html.escape(y_label)}</text>']
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS.get(name, "#2ca02c")
        if bars:
            bw = max(1.0, (w - pad - 8) / max(len(pts), 1) - 1)
            parts += [f'<rect x="{sx(x) - bw / 2:.1f}" y="{sy(y):.1f}" width="{bw:.1f}" height="{sy(0) - sy(y):.1f}" '
                      f'fill="{color}"/>' for x, y in pts]
        else:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            parts.append(f'<text x="{w - 10}" y="{20 + 10 * i}" font-size="9" fill="{color}" '
                         f'text-anchor="end">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
