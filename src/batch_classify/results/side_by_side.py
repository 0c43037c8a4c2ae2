"""Several models of one pass side by side: accuracy, calibration, speed and pairwise agreement.

Each model's folder is a complete single-model output; this reads their metrics.json and
timing.json, and joins each pair's predictions on id (``compare``), unit by unit.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from batch_classify.core.layout import METRICS, SIDE_BY_SIDE
from batch_classify.core.text import markdown_table, percent, write_json
from batch_classify.results.compare import compare
from batch_classify.results.report.models_page import write_models_page

"""Top level of a several-model output: the models and their sub-folders."""

"""side_by_side.md and side_by_side.json: the table, written when the job ends."""


def _model_rate(metrics: dict[str, Any]) -> float | None:
    """Images per second of this model's forward passes alone, over all ranks."""
    timing = metrics.get("timing") or {}
    seconds = timing.get("model_seconds_per_rank")
    items = timing.get("items_per_rank")
    if not seconds or not items:
        return None
    rates = [n / s for n, s in zip(items, seconds) if s]
    return sum(rates) if rates else None


def side_by_side(output: str | Path, folders: list[Path]) -> tuple[str, dict[str, Any]]:
    """Write side_by_side.md/.json at ``output``; return the text table and the summary."""
    output = Path(output)
    models = []
    for folder in folders:
        metrics = json.loads((folder / METRICS).read_text())
        models.append({"folder": folder.name, "model": metrics["model"]["name"], "n": metrics["n"],
                       "n_errors": metrics["n_errors"], "top1": metrics["top1"], "top5": metrics["top5"],
                       "ece": metrics.get("ece"), "images_per_second": metrics.get("images_per_second"),
                       "model_images_per_second": _model_rate(metrics)})
    agreement = []
    for a, b in itertools.combinations(folders, 2):
        result = compare(a, b)
        agreement.append({"a": a.name, "b": b.name, "agreement": result["agreement"],
                          "n_both_decoded": result["n_both_decoded"]})
    rows = [[m["folder"], percent(m["top1"]), percent(m["top5"]),
             "n/a" if m["ece"] is None else f"{m['ece']:.4f}",
             "n/a" if m["images_per_second"] is None else f"{m['images_per_second']:.1f}",
             "n/a" if m["model_images_per_second"] is None else f"{m['model_images_per_second']:.1f}"]
            for m in models]
    table = markdown_table(["model", "top-1", "top-5", "ECE", "images/s (pass)", "images/s (model alone)"],
                           rows)
    names = [folder.name for folder in folders]
    by_pair = {(p["a"], p["b"]): p["agreement"] for p in agreement}
    matrix = [[a, *("-" if a == b else percent(by_pair.get((a, b), by_pair.get((b, a))))
                    for b in names)] for a in names]
    agreement_table = markdown_table(["top-1 agreement", *names], matrix)
    text = (f"# {len(folders)} models, one pass\n\n{table}\n\n{agreement_table}\n\n"
            "images/s (pass): every image decoded once for all models, first batch to last write. "
            "images/s (model alone): that model's forward passes only (on a GPU, the time to queue "
            "them).\n")
    (output / SIDE_BY_SIDE[0]).write_text(text)
    summary = {"models": models, "agreement": agreement}
    write_json(output / SIDE_BY_SIDE[1], summary)
    # ---- the page: report.html (results/report/models_page.py)
    write_models_page(output, folders, summary)
    return text, summary
