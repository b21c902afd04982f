"""The loss curve as an inline SVG (raw loss and its moving average), and small HTML pieces of the live view.

Drawn here rather than with gradio's plot components: those changed API across gradio 3, 4 and 5+, an SVG in an HTML
component renders the same everywhere and needs no plotting package.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

WIDTH, HEIGHT = 640, 220
PAD_L, PAD_R, PAD_T, PAD_B = 52, 12, 12, 28
MAX_POINTS = 600  # points drawn per series (longer runs are thinned evenly)


def _thin(points: Sequence[Sequence[float]], n: int = MAX_POINTS) -> list[Sequence[float]]:
    if len(points) <= n:
        return list(points)
    step = len(points) / n
    picked = [points[int(i * step)] for i in range(n)]
    if picked[-1] is not points[-1]:
        picked.append(points[-1])
    return picked


def _nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-12:
        ticks.append(round(t, 12))
        t += step
    return ticks


def loss_chart_svg(losses: Sequence[Sequence[float]], *, title: str = "loss",
                   validation: Sequence[Sequence[float]] = ()) -> str:
    """`losses`: [step, raw loss, smoothed loss] rows (lora_ext.train.jobs.Job.losses); `validation`: [step, loss]
    rows of the validation loss (drawn as orange points joined by a line). An empty chart says that it waits for the
    first step."""
    rows = [r for r in losses if len(r) >= 3 and all(math.isfinite(float(v)) for v in r[:3])]
    vals = [r for r in validation if len(r) >= 2 and all(math.isfinite(float(v)) for v in r[:2])]
    head = (f'<svg class="lora-ext-chart" role="img" aria-label="{html.escape(title)} curve" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" style="max-width:{WIDTH}px;background:#fff;'
            'border:1px solid #ddd;border-radius:6px" xmlns="http://www.w3.org/2000/svg">')
    if not rows:
        return (head + f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#888" font-size="14">'
                "the loss curve appears with the first steps</text></svg>")
    rows = _thin(rows)
    vals = _thin(vals)
    steps = [float(r[0]) for r in rows] + [float(r[0]) for r in vals]
    values = [float(v) for r in rows for v in r[1:3]] + [float(r[1]) for r in vals]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5 * abs(y0 or 1), y1 + 0.5 * abs(y1 or 1)
    pw, ph = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def px(s: float) -> float:
        return PAD_L + (s - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return PAD_T + (1 - (v - y0) / (y1 - y0)) * ph

    parts = [head]
    for t in _nice_ticks(y0, y1):
        y = py(t)
        parts.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#666">{t:g}</text>')
    for t in _nice_ticks(x0, x1):
        x = px(t)
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 8}" text-anchor="middle" font-size="11" fill="#666">{t:g}'
                     "</text>")
    raw = " ".join(f"{px(float(r[0])):.1f},{py(float(r[1])):.1f}" for r in rows)
    smooth = " ".join(f"{px(float(r[0])):.1f},{py(float(r[2])):.1f}" for r in rows)
    parts.append(f'<polyline class="raw" fill="none" stroke="#9ecae1" stroke-width="1" points="{raw}"/>')
    parts.append(f'<polyline class="smoothed" fill="none" stroke="#08519c" stroke-width="2" points="{smooth}"/>')
    if vals:
        pts = " ".join(f"{px(float(r[0])):.1f},{py(float(r[1])):.1f}" for r in vals)
        parts.append(f'<polyline class="validation" fill="none" stroke="#e6550d" stroke-width="1.5" points="{pts}"/>')
        parts += [f'<circle class="validation-point" cx="{px(float(r[0])):.1f}" cy="{py(float(r[1])):.1f}" r="3" '
                  'fill="#e6550d"/>' for r in vals]
        best = min(vals, key=lambda r: float(r[1]))
        parts.append(f'<text x="{WIDTH - PAD_R}" y="{PAD_T + 28}" text-anchor="end" font-size="12" fill="#e6550d">'
                     f"validation {float(vals[-1][1]):.4f} (best {float(best[1]):.4f} at step {int(best[0])})</text>")
    last = rows[-1]
    parts.append(f'<text x="{WIDTH - PAD_R}" y="{PAD_T + 12}" text-anchor="end" font-size="12" fill="#08519c">'
                 f"step {int(last[0])}: loss {float(last[1]):.4f} (smoothed {float(last[2]):.4f})</text>")
    parts.append("</svg>")
    return "".join(parts)


def progress_html(fraction: float, text: str, state: str) -> str:
    """A progress bar with a line of text (state colours: running blue, finished green, failed red, else grey)."""
    colour = {"running": "#2171b5", "finished": "#31a354", "failed": "#de2d26"}.get(state, "#969696")
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="lora-ext-progress" data-state="{html.escape(state)}">'
            f'<div style="background:#eee;border-radius:4px;height:14px;overflow:hidden">'
            f'<div class="bar" style="width:{pct:.1f}%;background:{colour};height:14px"></div></div>'
            f'<div class="text" style="margin-top:4px">{html.escape(text)}</div></div>')
