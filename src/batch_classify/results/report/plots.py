"""The report's plots: per-class accuracy with the reliability diagram, and the predicted classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from batch_classify.results.report.names import shorten
from batch_classify.results.report.scan import Calibration, ClassScore

# ---------------------------------------------------------------- plots


def _figure(width: float, height: float):
    # The object API on the Agg canvas: no pyplot, no global backend switch, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_accuracy(scores: list[ClassScore], calibration: Calibration, macro: float, title: str,
                  path: Path) -> None:
    """Left: per-class top-1 sorted from best to worst (``macro``: their mean). Right: the
    reliability diagram of ``calibration``."""
    count, accuracy, confidence = calibration.reliability()
    ece = calibration.ece()
    figure = _figure(11, 4.2)
    left, right = figure.subplots(1, 2, width_ratios=[2.2, 1])
    ordered = sorted(scores, key=lambda s: -s.top1)
    positions = np.arange(len(ordered))
    left.bar(positions, [s.top1 for s in ordered], width=1.0 if len(ordered) > 60 else 0.8,
             color="#4C72B0", edgecolor="none")
    left.axhline(macro, color="#C44E52", linestyle="--", linewidth=1.2, label=f"macro top-1 {macro:.1%}")
    if len(ordered) <= 30:
        left.set_xticks(positions, [shorten(s.name) if s.wnid else s.name for s in ordered],
                        rotation=60, ha="right", fontsize=8)
    else:
        left.set_xlabel("classes, best to worst")
    left.set_xlim(-0.6, len(ordered) - 0.4)
    left.set_ylim(0, 1.02)
    left.set_ylabel("top-1 accuracy")
    left.set_title(f"Per-class top-1 ({len(ordered)} classes)")
    left.legend(loc="lower left")
    edges = np.linspace(0, 1, len(count) + 1)
    filled = count > 0
    width = edges[1] - edges[0]
    right.bar(edges[:-1][filled], accuracy[filled], width=width, align="edge",
              color="#55A868", edgecolor="white", label="accuracy")
    right.bar(edges[:-1][filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width,
              align="edge", fill=False, hatch="///", edgecolor="#C44E52", linewidth=0.8,
              label="gap to mean confidence")
    right.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1)
    right.set_xlabel("top-1 confidence")
    right.set_ylabel("accuracy")
    right.set_title(f"Calibration (ECE {ece:.3f})")
    right.legend(loc="upper left", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path)


def plot_predicted(counts: list[tuple[str, int]], title: str, path: Path) -> None:
    figure = _figure(8, 0.8 + 0.28 * len(counts))
    axes = figure.subplots()
    names = [name for name, _ in counts][::-1]
    axes.barh(np.arange(len(counts)), [n for _, n in counts][::-1], color="#4C72B0")
    axes.set_yticks(np.arange(len(counts)), names, fontsize=8)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("images predicted (top-1)")
    axes.set_title(title, fontsize=10)
    figure.savefig(path)
