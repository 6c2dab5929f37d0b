"""PNG bar charts of ours-vs-Istio benchmark rows, drawn by the benchmark that measured them.

Role: one picture per headline row for docs/benchmarks.md: a bar per method (median), a
whisker up to its p99 (or p90), Istio's bars in one colour and ours in another, and the
ratio against the row's baseline printed on each bar. Rendering only: the numbers come in.
Uses matplotlib's non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ISTIO_COLOUR = "#466bb0"
OURS_COLOUR = "#2e9e5b"


@dataclass(frozen=True)
class Bar:
    """One method's figure: median, upper whisker, and whose it is."""

    label: str
    median: float
    upper: float
    istio: bool
    ratio: float | None = None  # vs the row's baseline, printed on the bar


def draw(path: Path, title: str, unit: str, bars: list[Bar], note: str = "") -> Path:
    """Write a horizontal bar chart to ``path`` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(bars) + 1.6), dpi=100)
    try:
        ys = list(range(len(bars)))[::-1]
        ax.barh(
            ys,
            [b.median for b in bars],
            xerr=[[0.0] * len(bars), [max(0.0, b.upper - b.median) for b in bars]],
            color=[ISTIO_COLOUR if b.istio else OURS_COLOUR for b in bars],
            capsize=3,
            error_kw={"elinewidth": 1, "ecolor": "#555555"},
        )
        ax.set_yticks(ys, [b.label for b in bars])
        ax.set_xlabel(unit)
        ax.set_title(title, fontsize=11)
        for y, b in zip(ys, bars, strict=True):
            text = f" {b.median:.3g}" + (f"  ({b.ratio:.2f}x)" if b.ratio is not None else "")
            ax.text(max(b.median, b.upper), y, text, va="center", ha="left", fontsize=8)
        if note:
            fig.text(0.01, 0.01, note, fontsize=7, color="#555555")
        ax.margins(x=0.25)
        fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
