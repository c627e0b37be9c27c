"""Web UI charts: the Train tab's live curves (loss, reward accuracy) and the Data tab's token-length histogram.

The live curves are rows for gradio's LinePlot, one series per curve, named in the page language.

Drawn in the page rather than as a PNG so its captions follow the page language (the browser has the fonts for
Chinese; a server-side PNG often has none) and so the x-axis spans the data: the bins cover the shortest to the
longest example, and cutoff_len is a dashed line when it falls inside that span, or a note at the right edge when
every example is shorter (a line at 1024 beside data that ends at 200 would squash all bars into one corner).
"""

from __future__ import annotations

from collections.abc import Sequence

from tunelab.webui.i18n import text
from tunelab.webui.render import esc

# Where an alignment run's metrics.jsonl keeps its reward accuracy (TRL's name, which every stage logs, rm's
# renamed to it; and the evaluation's spelling); the first key an event has is plotted, validation separately.
REWARD_ACCURACY_KEYS = ("rewards/accuracies", "reward_accuracy")
EVAL_REWARD_ACCURACY_KEYS = tuple(f"eval_{k}" for k in REWARD_ACCURACY_KEYS)
CURVES = (("loss", ("loss",)), ("validation", ("eval_loss",)), ("reward_accuracy", REWARD_ACCURACY_KEYS),
          ("validation_reward_accuracy", EVAL_REWARD_ACCURACY_KEYS))


def curve_rows(history: Sequence[dict], lang: str = "en") -> list[dict]:
    """metrics.jsonl events -> {step, loss (the plotted value), series} rows: loss and validation loss, and for
    alignment runs (dpo, orpo, simpo, kto, rm) reward accuracy, on the same 0-1-ish scale as a DPO loss."""
    rows = []
    for series, keys in CURVES:
        name = text(f"train.series.{'train' if series == 'loss' else series}", lang)
        for event in history:
            key = next((k for k in keys if isinstance(event.get(k), (int, float))), None)
            if key is not None and "step" in event:
                rows.append({"step": event["step"], "loss": event[key], "series": name})
    return rows


WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 30, 44  # plot margins (axis labels and ticks live there)
MAX_BINS = 40


def histogram_bins(lengths: Sequence[int], max_bins: int = MAX_BINS) -> tuple[list[int], list[float]]:
    """(counts, edges) over [min, max] of the data: at most max_bins bins, never wider than one token apart."""
    import numpy as np

    arr = np.asarray(lengths)
    low, high = int(arr.min()), int(arr.max())
    bins = max(1, min(max_bins, high - low + 1))
    counts, edges = np.histogram(arr, bins=bins, range=(low, high + 1) if high == low else (low, high))
    return [int(c) for c in counts], [float(e) for e in edges]


def _ticks(low: float, high: float, n: int = 5) -> list[int]:
    """n evenly spaced whole-number ticks from low to high, both ends included (the axis shows the data's span)."""
    return sorted({round(low + i * (high - low) / (n - 1)) for i in range(n)})


def histogram_svg(lengths: Sequence[int], cutoff_len: int, lang: str = "en") -> str:
    """The histogram with translated title, axis labels and cutoff mark; an empty string for no data."""
    if not len(lengths):
        return ""
    counts, edges = histogram_bins(lengths)
    low, high, top = edges[0], edges[-1], max(counts)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(v: float) -> float:
        return LEFT + (v - low) / (high - low) * plot_w

    def y(c: float) -> float:
        return TOP + plot_h - c / top * plot_h

    title = esc(text("hist.title", lang, n=len(lengths)))
    parts = [(f'<svg class="tl-hist" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
             'width="100%" role="img" font-size="12" font-family="sans-serif">'
             f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>')]
    for c, a, b in zip(counts, edges, edges[1:]):
        if c:
            parts.append(f'<rect class="tl-hist-bar" x="{x(a):.1f}" y="{y(c):.1f}" width="{max(1.0, x(b) - x(a) - 1):.1f}" '
                         f'height="{y(0) - y(c):.1f}" fill="#4C72B0"><title>{int(a)}-{int(b)}: {c}</title></rect>')
    parts.append(f'<line x1="{LEFT}" y1="{y(0)}" x2="{WIDTH - RIGHT}" y2="{y(0)}" stroke="#333"/>')
    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{y(0)}" stroke="#333"/>')
    for t in _ticks(low, high):
        parts.append(f'<text x="{x(t):.1f}" y="{y(0) + 15:.1f}" text-anchor="middle">{t}</text>')
    for t in _ticks(0, top):
        parts.append(f'<text x="{LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
                 f'{esc(text("hist.x", lang))}</text>')
    parts.append(f'<text x="14" y="{TOP + plot_h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {TOP + plot_h / 2})">{esc(text("hist.y", lang))}</text>')
    parts.append(_cutoff_mark(cutoff_len, low, high, x, lang))
    return "".join(parts) + "</svg>"


def _cutoff_mark(cutoff_len: int, low: float, high: float, x, lang: str) -> str:
    label = esc(text("hist.cutoff", lang, n=cutoff_len))
    if low <= cutoff_len <= high:
        return (f'<g class="tl-hist-cutoff"><line x1="{x(cutoff_len):.1f}" y1="{TOP}" x2="{x(cutoff_len):.1f}" '
                f'y2="{HEIGHT - BOTTOM}" stroke="#C44E52" stroke-dasharray="5,4"/>'
                f'<text x="{x(cutoff_len) - 4:.1f}" y="{TOP + 12}" text-anchor="end" fill="#C44E52">{label}</text></g>')
    beyond = esc(text("hist.beyond", lang, n=int(high)))
    return (f'<g class="tl-hist-cutoff"><text x="{WIDTH - RIGHT}" y="{TOP + 12}" text-anchor="end" fill="#C44E52">'
            f'{label} → ({beyond})</text></g>')
