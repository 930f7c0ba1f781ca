"""Inline SVG line charts for the HTML pages of `dcgan report` (a run, or a comparison's settings).

No plotting library: a chart is a few polylines, and the pages must open offline, on an air-gapped
cluster, with nothing installed. A series may carry a band (its lowest and highest value at each x),
drawn under its line: how a comparison shows the spread of its seeds.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")

Series = dict[str, list[tuple[float, float]]]
"""Name -> (x, value) points in x order."""
Bands = dict[str, list[tuple[float, float, float]]]
"""Name of a series -> (x, lowest, highest) around its line."""

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}h2{margin-top:28px}
.charts{display:flex;flex-wrap:wrap;gap:18px}.chart h3{font-size:14px;margin:4px 0}
.strip{display:flex;flex-wrap:wrap;gap:10px}.strip figure{margin:0;text-align:center;font-size:12px}
.strip img{width:180px;image-rendering:pixelated;border:1px solid #ccc}
table{border-collapse:collapse;font-size:13px}td{padding:2px 10px;border-bottom:1px solid #eee}"""
"""The pages' one stylesheet, inlined in each."""


@dataclass(frozen=True)
class Box:
    """The plotting area of a chart, in SVG pixels."""

    width: int = 560
    height: int = 220
    left: int = 58
    right: int = 12
    top: int = 12
    bottom: int = 30


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    return (low - 0.5, high + 0.5) if low == high else (low, high)


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"


def svg_chart(series: Series, box: Box = Box(), bands: Bands | None = None, x_label: str = "images seen") -> str:
    """One line chart: a polyline per series over its band (if any), the axes' ranges as labels, a legend."""
    bands = bands or {}
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    ys += [y for band in bands.values() for _, low, high in band for y in (low, high)]
    (x0, x1), (y0, y1) = _span(xs), _span(ys)
    inner_w, inner_h = box.width - box.left - box.right, box.height - box.top - box.bottom

    def at(x: float, y: float) -> str:
        px = box.left + (x - x0) / (x1 - x0) * inner_w
        py = box.top + (1 - (y - y0) / (y1 - y0)) * inner_h
        return f"{px:.1f},{py:.1f}"

    parts = [
        f'<svg width="{box.width}" height="{box.height}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
        f'<rect x="{box.left}" y="{box.top}" width="{inner_w}" height="{inner_h}" fill="none" stroke="#bbb"/>',
        f'<text x="{box.left - 4}" y="{box.top + 9}" text-anchor="end">{_label(y1)}</text>',
        f'<text x="{box.left - 4}" y="{box.top + inner_h}" text-anchor="end">{_label(y0)}</text>',
        f'<text x="{box.left}" y="{box.height - 14}">{_label(x0)}</text>',
        f'<text x="{box.width - box.right}" y="{box.height - 14}" text-anchor="end">{_label(x1)}</text>',
        f'<text x="{box.left + inner_w / 2}" y="{box.height - 2}" text-anchor="middle">{html.escape(x_label)}</text>',
    ]
    for index, (name, points) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        band = bands.get(name, [])
        if band:
            outline = [at(x, high) for x, _, high in band] + [at(x, low) for x, low, _ in reversed(band)]
            parts.append(f'<polygon fill="{color}" fill-opacity="0.2" stroke="none" points="{" ".join(outline)}"/>')
        path = " ".join(at(x, y) for x, y in points)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.3" points="{path}"/>')
        if len(points) == 1:
            cx, cy = at(*points[0]).split(",")
            parts.append(f'<circle r="2.5" fill="{color}" cx="{cx}" cy="{cy}"/>')
        parts.append(
            f'<text x="{box.left + 8}" y="{box.top + 14 + 13 * index}" fill="{color}">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
