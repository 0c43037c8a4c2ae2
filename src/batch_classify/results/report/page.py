"""The report: per-class accuracy, confusions, calibration and a contact sheet of mistakes.

``write_report(output_dir)`` reads the Parquet predictions and the manifest and writes,
next to metrics.json, ``report.md`` with the files it shows. Labelled outputs get
per-class accuracy, the most-confused pairs, the expected calibration error and the most
confident mistakes; unlabelled ones (labelling mode) the distribution of predicted
classes and the least confident predictions."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batch_classify.core.layout import (
    CONFUSIONS,
    MISTAKES,
    PER_CLASS,
    PER_CLASS_PLOT,
    PREDICTED,
    PREDICTED_PLOT,
    REPORT,
    REPORT_ASSETS,
    REPORT_FILES,
    REPORT_HTML,
    TIMING,
    UNCERTAIN,
)
from batch_classify.core.text import markdown_table, percent
from batch_classify.output.manifest import read_manifest
from batch_classify.output.units import (
    file_stats,
    merge_stats,
    metrics_from_stats,
    unit_files,
)
from batch_classify.results.report.html import Page, page_pictures, write_html
from batch_classify.results.report.names import ClassNames, class_names, shorten
from batch_classify.results.report.pictures import (
    Tile,
    contact_sheet,
    mistake_tile,
    prediction_tile,
)
from batch_classify.results.report.plots import plot_accuracy, plot_predicted
from batch_classify.results.report.scan import (
    ECE_BINS,
    TOP_CONFUSIONS,
    ClassScore,
    Scan,
    confusions,
    per_class,
    scan,
)
from batch_classify.results.report.thumbnails import Pictures

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- files


def write_csv(path: Path, headers: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(["" if cell is None else cell for cell in row] for row in rows)


def _image_note(opener_error: str | None, opened: int, shown: int) -> str:
    if opener_error is not None:
        return f"_The images could not be opened: {opener_error}._"
    if opened < shown:
        return f"_{shown - opened} of {shown} images could not be opened._"
    return ""


@dataclass
class Context:
    output: Path
    manifest: dict[str, Any]
    scan: Scan
    names: ClassNames
    metrics: dict[str, Any]
    written: list[str] = dataclasses.field(default_factory=lambda: [REPORT])
    pictures: Pictures | None = None
    """Every picture of the report, read back unit by unit before anything is drawn."""

    @property
    def model_name(self) -> str:
        return str(self.manifest.get("model", {}).get("name"))


def _header(ctx: Context) -> list[str]:
    dataset = ctx.manifest["dataset"]
    return ["# Classification report", "",
            f"Model `{ctx.model_name}` on `{dataset.get('path')}` ({dataset.get('kind')}).", ""]


def _summary(ctx: Context, extra: list[list[Any]]) -> list[str]:
    m = ctx.metrics
    errors = str(m["n_errors"]) + (f" ({', '.join(f'{k}: {v}' for k, v in m['errors_by_type'].items())})"
                                   if m["n_errors"] else "")
    rows = [["images", m["n"]], ["errors", errors], ["labelled", m["n_labelled"]], ["scored", m["n_scored"]]]
    if m.get("images_per_second") is not None:
        rows.append(["images/s", f"{m['images_per_second']:.1f}"])
    label_space = ctx.manifest.get("model", {}).get("label_space")
    if label_space:
        rows.append(["label space", label_space])
    return ["## Summary", "", markdown_table(["", ""], rows + extra), ""]


def _sheet_section(ctx: Context, title: str, tiles: list[Tile], name: str) -> list[str]:
    lines = [f"## {title}", ""]
    if not tiles:
        return lines + ["None.", ""]
    opener_error = ctx.pictures.reading.unreachable
    opened = contact_sheet(tiles, None if opener_error else ctx.pictures.tile, ctx.output / name)
    if opened:
        ctx.written.append(name)
        lines += [f"![{title.lower()}]({name})", ""]
    note = _image_note(opener_error, opened, len(tiles))
    return lines + ([note, ""] if note else [])


# ---------------------------------------------------------------- labelled: accuracy


def _write_class_files(ctx: Context, scores: list[ClassScore], pairs: list[tuple[int, int, int]]) -> None:
    write_csv(ctx.output / PER_CLASS, ["class_index", "wnid", "name", "n", "top1", "top5"],
              [[s.index, s.wnid, s.name, s.n, s.top1, s.top5] for s in scores])
    names = ctx.names
    write_csv(ctx.output / CONFUSIONS, ["true_index", "true_wnid", "true_name", "predicted_index",
                                        "predicted_wnid", "predicted_name", "count"],
              [[t, names.label_wnid(t), names.label(t), p, names.predicted_wnid(p), names.predicted(p), n]
               for t, p, n in pairs])
    ctx.written += [PER_CLASS, CONFUSIONS]


def _class_section(scores: list[ClassScore]) -> list[str]:
    lines = ["## Per-class accuracy", "", f"![per-class accuracy and calibration]({PER_CLASS_PLOT})", ""]
    if len(scores) > 1:
        worst = sorted(scores, key=lambda s: (s.top1, -s.n, s.index))[:10]
        lines += [f"Lowest top-1 (all classes in [{PER_CLASS}]({PER_CLASS})):", "",
                  markdown_table(["class", "n", "top-1", "top-5"],
                                 [[shorten(s.name) if s.wnid else s.name, s.n, percent(s.top1),
                                   percent(s.top5)] for s in worst]), ""]
    return lines


def _confusion_section(names: ClassNames, pairs: list[tuple[int, int, int]]) -> list[str]:
    if not pairs:
        return ["## Most-confused pairs", "", "No mistakes.", ""]
    table = markdown_table(["true", "predicted", "count"],
                           [[names.label(t, short=True), names.predicted(p, short=True), n]
                            for t, p, n in pairs])
    return ["## Most-confused pairs", "", f"By top-1 prediction; all in [{CONFUSIONS}]({CONFUSIONS}).", "",
            table, ""]


def _scores(result: Scan, scores: list[ClassScore]) -> dict[str, Any]:
    """What the report adds to metrics.json: macro top-1 and calibration (None when unlabelled)."""
    if not result.n_scored:
        return {"macro_top1": None, "ece": None, "n_classes_scored": 0}
    return {"macro_top1": float(np.mean([s.top1 for s in scores])), "ece": result.calibration.ece(),
            "n_classes_scored": len(scores)}


def _labelled_report(ctx: Context, scores: list[ClassScore], extra: dict[str, Any]) -> list[str]:
    result = ctx.scan
    macro, ece = extra["macro_top1"], extra["ece"]
    pairs = confusions(result)
    _write_class_files(ctx, scores, pairs)
    plot_accuracy(scores, result.calibration, macro, ctx.model_name, ctx.output / PER_CLASS_PLOT)
    ctx.written.append(PER_CLASS_PLOT)
    summary = _summary(ctx, [["top-1", percent(ctx.metrics["top1"])],
                             ["top-5", percent(ctx.metrics["top5"])],
                             [f"macro top-1 (mean over {len(scores)} classes)", percent(macro)],
                             [f"expected calibration error ({ECE_BINS} bins)", f"{ece:.4f}"]])
    lines = (summary + _class_section(scores) + _confusion_section(ctx.names, pairs)
             + _sheet_section(ctx, "Most confident mistakes",
                              [mistake_tile(pick, ctx.names) for pick in result.mistakes.picks()], MISTAKES))
    return lines


# ---------------------------------------------------------------- labelling mode: what was predicted


def _labelling_report(ctx: Context) -> list[str]:
    result, names = ctx.scan, ctx.names
    n_predicted = result.n_predicted
    ordered = sorted(result.predicted.items(), key=lambda x: (-x[1], x[0]))
    write_csv(ctx.output / PREDICTED, ["predicted_index", "predicted_wnid", "predicted_name", "count"],
              [[p, names.predicted_wnid(p), names.predicted(p), n] for p, n in ordered])
    ctx.written.append(PREDICTED)
    why = ctx.metrics.get("accuracy_unavailable") or (
        "the dataset has no labels" if ctx.metrics["n_labelled"] == 0 else "no item could be scored")
    lines = _summary(ctx, [["accuracy", f"unavailable: {why}"], ["distinct top-1 classes", len(ordered)]])
    lines += ["## Most frequent predictions", ""]
    top = [(names.predicted(p, short=True), n) for p, n in ordered[:TOP_CONFUSIONS]]
    if top:
        plot_predicted(top, f"Top-1 predictions: {len(ordered)} classes over {n_predicted} images",
                       ctx.output / PREDICTED_PLOT)
        ctx.written.append(PREDICTED_PLOT)
        lines += [f"![most frequent top-1 classes]({PREDICTED_PLOT})", "",
                  markdown_table(["class", "images", "share"],
                                 [[name, n, percent(n / n_predicted)] for name, n in top]),
                  "", f"All classes in [{PREDICTED}]({PREDICTED}).", ""]
    else:
        lines += ["No image was classified.", ""]
    lines += _sheet_section(ctx, "Least confident predictions",
                            [prediction_tile(pick, names) for pick in result.uncertain.picks()], UNCERTAIN)
    return lines


# ---------------------------------------------------------------- entry point


def write_report(output_dir: str | Path, metrics: dict[str, Any] | None = None,
                 files: list[tuple[int, Path]] | None = None,
                 scored: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write report.md and its files next to metrics.json; return metrics to merge into it:
    ``macro_top1``, ``ece`` (both None in labelling mode), ``n_classes_scored``, ``report_files``.
    ``scored`` is called with the scores before any of the report's files is written (aggregate
    writes metrics.json then, so a report that cannot be written leaves the metrics in place).

    ``aggregate`` passes the metrics and unit files it already has; alone, this finds them."""
    output = Path(output_dir)
    manifest = read_manifest(output)
    if manifest is None:
        raise FileNotFoundError(f"{output} has no manifest.json: not a batch-classify output folder")
    files = unit_files(output) if files is None else files
    if metrics is None:
        metrics = metrics_from_stats(merge_stats(file_stats(path) for _, path in files))
        metrics["accuracy_unavailable"] = manifest.get("accuracy_unavailable")
        timing = json.loads((output / TIMING).read_text()) if (output / TIMING).exists() else {}
        metrics["images_per_second"] = timing.get("images_per_second")
    result = scan(files)
    ctx = Context(output, manifest, result, class_names(manifest, result.model_names), metrics)
    scores = per_class(result, ctx.names) if result.n_scored else []
    extra = _scores(result, scores)
    if scored is not None:
        scored(extra)
    sheet = result.mistakes if result.n_scored else result.uncertain
    ctx.pictures = Pictures.read(manifest, output, page_pictures(result),
                                 [(pick.unit, pick.item_id) for pick in sheet.picks()])
    body = _labelled_report(ctx, scores, extra) if result.n_scored else _labelling_report(ctx)
    (output / REPORT).write_text("\n".join(_header(ctx) + body).rstrip() + "\n")
    page_bytes = write_html(Page(output, manifest, metrics, result, ctx.names, ctx.pictures))
    ctx.written += [REPORT_HTML, *([REPORT_ASSETS] if ctx.pictures.written else [])]
    log.info("report: %s with %d thumbnails in %s/, %.1f MB; pictures read back from %d unit(s)", REPORT_HTML,
             len(ctx.pictures.written), REPORT_ASSETS, page_bytes / 1e6, ctx.pictures.reading.units_read)
    for stale in set(REPORT_FILES) - set(ctx.written):  # left by an earlier report of other results
        (output / stale).unlink(missing_ok=True)
    return {**extra, "report_files": ctx.written, "report_page_bytes": page_bytes}
