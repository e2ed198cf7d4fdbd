"""Minimal SVG plots (scatter, lines, bars) for the analysis tools, so they need no plotting library."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Sequence

_WIDTH, _HEIGHT, _MARGIN = 560, 400, 60
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    return [low + (high - low) * i / (count - 1) for i in range(count)]


class _Axes:
    """Maps data coordinates to the plot area and draws the frame, ticks and labels."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]):
        (self.x0, self.x1), (self.y0, self.y1) = x_range, y_range
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1.0
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1.0

    def px(self, x: float) -> float:
        return _MARGIN + (x - self.x0) / (self.x1 - self.x0) * (_WIDTH - 2 * _MARGIN)

    def py(self, y: float) -> float:
        return _HEIGHT - _MARGIN - (y - self.y0) / (self.y1 - self.y0) * (_HEIGHT - 2 * _MARGIN)

    def frame(self, title: str, xlabel: str, ylabel: str, x_ticks: bool = True) -> list[str]:
        left, right, top, bottom = _MARGIN, _WIDTH - _MARGIN, _MARGIN, _HEIGHT - _MARGIN
        out = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#333"/>']
        if x_ticks:
            for t in _nice_ticks(self.x0, self.x1):
                out.append(f'<text x="{self.px(t):.1f}" y="{bottom + 16}" font-size="11" text-anchor="middle">{t:.3g}</text>')
        for t in _nice_ticks(self.y0, self.y1):
            out.append(f'<text x="{left - 6}" y="{self.py(t) + 4:.1f}" font-size="11" text-anchor="end">{t:.3g}</text>')
        out.append(f'<text x="{_WIDTH / 2}" y="{top - 20}" font-size="14" text-anchor="middle">{escape(title)}</text>')
        out.append(f'<text x="{_WIDTH / 2}" y="{_HEIGHT - 14}" font-size="12" text-anchor="middle">{escape(xlabel)}</text>')
        out.append(
            f'<text x="16" y="{_HEIGHT / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 16 {_HEIGHT / 2})">{escape(ylabel)}</text>'
        )
        return out


def _write(path: str | Path, body: list[str]) -> None:
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" viewBox="0 0 {_WIDTH} {_HEIGHT}" font-family="sans-serif">'
    Path(path).write_text("\n".join([head, '<rect width="100%" height="100%" fill="white"/>', *body, "</svg>"]) + "\n")


def _range(values: Sequence[float]) -> tuple[float, float]:
    return (min(values), max(values)) if values else (0.0, 1.0)


def scatter_plot(path: str | Path, xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str, title: str, diagonal: bool = False) -> None:
    """Points (x, y); with `diagonal`, the line y = x over the shared range."""
    xs, ys = [float(v) for v in xs], [float(v) for v in ys]
    if diagonal:
        low, high = _range(xs + ys)
        axes = _Axes((low, high), (low, high))
    else:
        axes = _Axes(_range(xs), _range(ys))
    body = axes.frame(title, xlabel, ylabel)
    if diagonal:
        body.append(f'<line x1="{axes.px(low):.1f}" y1="{axes.py(low):.1f}" x2="{axes.px(high):.1f}" y2="{axes.py(high):.1f}" stroke="#999" stroke-dasharray="4 3"/>')
    body += [f'<circle cx="{axes.px(x):.1f}" cy="{axes.py(y):.1f}" r="1.6" fill="{_COLOURS[0]}" fill-opacity="0.5"/>' for x, y in zip(xs, ys)]
    _write(path, body)


def line_plot(path: str | Path, curves: Sequence[tuple[Sequence[float], Sequence[float], str]], xlabel: str, ylabel: str, title: str) -> None:
    """One polyline per (xs, ys, label), with a legend."""
    all_x = [float(v) for xs, _, _ in curves for v in xs]
    all_y = [float(v) for _, ys, _ in curves for v in ys]
    axes = _Axes(_range(all_x), _range(all_y))
    body = axes.frame(title, xlabel, ylabel)
    for i, (xs, ys, label) in enumerate(curves):
        colour = _COLOURS[i % len(_COLOURS)]
        points = " ".join(f"{axes.px(float(x)):.1f},{axes.py(float(y)):.1f}" for x, y in zip(xs, ys))
        body.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        body.append(f'<text x="{_WIDTH - _MARGIN + 4}" y="{_MARGIN + 14 * i + 10}" font-size="10" fill="{colour}">{escape(label)}</text>')
    _write(path, body)


def bar_chart(path: str | Path, values: dict[str, float], title: str, ylabel: str = "fraction") -> None:
    """One labelled bar per entry."""
    axes = _Axes((0.0, float(max(1, len(values)))), (0.0, max([float(v) for v in values.values()] + [1e-12])))
    body = axes.frame(title, "", ylabel, x_ticks=False)
    for i, (label, value) in enumerate(values.items()):
        left, right = axes.px(i + 0.15), axes.px(i + 0.85)
        top = axes.py(float(value))
        body.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" height="{axes.py(0) - top:.1f}" fill="{_COLOURS[i % len(_COLOURS)]}"/>')
        body.append(f'<text x="{(left + right) / 2:.1f}" y="{_HEIGHT - _MARGIN + 16}" font-size="12" text-anchor="middle">{escape(label)}</text>')
        body.append(f'<text x="{(left + right) / 2:.1f}" y="{top - 4:.1f}" font-size="11" text-anchor="middle">{float(value):.3f}</text>')
    _write(path, body)
