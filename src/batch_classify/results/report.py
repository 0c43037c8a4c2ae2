"""The report: per-class accuracy, confusions, calibration and a contact sheet of mistakes.

``write_report(output_dir)`` reads the Parquet predictions and the manifest and writes,
next to metrics.json, ``report.md`` with the files it shows. Labelled outputs get
per-class accuracy, the most-confused pairs, the expected calibration error and the most
confident mistakes; unlabelled ones (labelling mode) the distribution of predicted
classes and the least confident predictions.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont, ImageOps

from batch_classify.core.labels import imagenet_classes
from batch_classify.output.manifest import read_manifest
from batch_classify.output.units import (
    Lists,
    file_stats,
    int_column,
    iter_batches,
    merge_stats,
    metrics_from_stats,
    top1_and_decoded,
    top1_names,
    unit_files,
)

REPORT = "report.md"
PER_CLASS = "per_class.csv"
CONFUSIONS = "confusions.csv"
PER_CLASS_PLOT = "per_class.png"
MISTAKES = "mistakes.jpg"
PREDICTED = "predicted_classes.csv"
PREDICTED_PLOT = "predicted_classes.png"
UNCERTAIN = "least_confident.jpg"
ALL_FILES = (REPORT, PER_CLASS, CONFUSIONS, PER_CLASS_PLOT, MISTAKES, PREDICTED, PREDICTED_PLOT, UNCERTAIN)

ECE_BINS = 15
TOP_CONFUSIONS = 20
SHEET_MAX = 24
SHEET_COLUMNS = 6
THUMB = 168
"""Thumbnails are fitted into a THUMB x THUMB square."""
PAD = 4
LINE = 16
CAPTION_LINES = 3
CELL = (THUMB + 2 * PAD, THUMB + 3 * PAD + CAPTION_LINES * LINE)
"""(width, height) of one contact-sheet cell: the sheet is columns x rows of these."""


# ---------------------------------------------------------------- one pass over the unit files


class Calibration:
    """Per-bin sums for the reliability diagram and the ECE, over equal-width confidence bins
    (lo, hi] (0 goes to the first). Sums are added row after row in file order, as one
    np.bincount over all rows would, so the figures do not depend on how rows are batched."""

    def __init__(self, bins: int = ECE_BINS):
        self.edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
        self.count = np.zeros(bins, dtype=np.int64)
        self.correct_sum = np.zeros(bins)
        self.confidence_sum = np.zeros(bins)

    def add(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        confidence = np.asarray(confidence, dtype=np.float64)
        which = np.searchsorted(self.edges, confidence, side="left")
        self.count += np.bincount(which, minlength=self.count.size)
        np.add.at(self.correct_sum, which, np.asarray(correct, dtype=np.float64))
        np.add.at(self.confidence_sum, which, confidence)

    def ece(self) -> float:
        """Sum over bins of (n_bin / n) * |accuracy_bin - mean confidence_bin|."""
        n = int(self.count.sum())
        if n == 0:
            return float("nan")
        return float(np.abs(self.correct_sum - self.confidence_sum).sum() / n)

    def reliability(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(count, accuracy, mean confidence) of each bin; accuracy and confidence NaN when empty."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.count, self.correct_sum / self.count, self.confidence_sum / self.count


@dataclass
class Pick:
    """A row kept for a contact sheet."""

    unit: int
    item_id: str
    label: int
    top1: int
    confidence: float


class Ranking:
    """The ``limit`` rows of lowest key (confidence, or minus it), across all files; ties keep
    unit order, then row order, as a stable sort of all rows would."""

    def __init__(self, limit: int, descending: bool):
        self.limit, self.descending = limit, descending
        self.kept: list[tuple[float, int, int, Pick]] = []

    def add(self, unit: int, first_row: int, mask: np.ndarray, batch: Batch) -> None:
        indices = np.flatnonzero(mask)
        if indices.size == 0:
            return
        keys = -batch.confidence[indices] if self.descending else batch.confidence[indices]
        best = np.argsort(keys, kind="stable")[: self.limit]
        chosen = indices[best]
        ids = batch.ids.take(pa.array(chosen)).to_pylist()
        candidates = [(key, unit, first_row + i, Pick(unit, item_id, int(batch.label[i]), int(batch.top1[i]),
                                                      float(batch.confidence[i])))
                      for key, i, item_id in zip(keys[best].tolist(), chosen.tolist(), ids)]
        # (key, unit, row) is unique: the Pick is never compared.
        self.kept = heapq.nsmallest(self.limit, self.kept + candidates)

    def picks(self) -> list[Pick]:
        return [entry[-1] for entry in self.kept]


@dataclass
class Batch:
    """One record batch as arrays; -1 marks a null label, target or prediction."""

    ids: pa.Array
    label: np.ndarray
    target: np.ndarray
    top1: np.ndarray
    confidence: np.ndarray
    in_top5: np.ndarray
    ok: np.ndarray
    """Decoded and predicted: error null and at least one class kept."""
    top5_kept: np.ndarray
    model_names: dict[int, str]

    @classmethod
    def read(cls, batch: pa.RecordBatch) -> Batch:
        topk = Lists(batch.column("topk_ids"))
        top1, ok = top1_and_decoded(batch)
        target = int_column(batch.column("target"))
        ids = topk.values()
        in_top5 = np.zeros(len(ok), dtype=bool)
        for j in range(5):
            has = np.flatnonzero(ok & (topk.lengths > j))
            in_top5[has] |= ids[topk.starts[has] + j] == target[has]
        scores = Lists(batch.column("topk_scores"))
        confidence = scores.first(ok, np.nan, np.float64)
        return cls(batch.column("id"), int_column(batch.column("label")), target, top1, confidence, in_top5,
                   ok, topk.lengths >= 5, top1_names(batch, top1, ok))


SCAN_COLUMNS = ["id", "label", "target", "topk_ids", "topk_labels", "topk_scores", "error"]


@dataclass
class Scan:
    """Every figure of the report, accumulated file by file: memory grows with the classes, not the rows."""

    n_scored: int = 0
    class_n: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    class_top1: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    class_top5: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    top5_available: bool = True
    calibration: Calibration = dataclasses.field(default_factory=Calibration)
    confused: Counter = dataclasses.field(default_factory=Counter)
    """(true label, predicted model class) -> count of scored top-1 mistakes."""
    mistakes: Ranking = dataclasses.field(default_factory=lambda: Ranking(SHEET_MAX, descending=True))
    uncertain: Ranking = dataclasses.field(default_factory=lambda: Ranking(SHEET_MAX, descending=False))
    n_predicted: int = 0
    predicted: Counter = dataclasses.field(default_factory=Counter)
    """Model class -> how many decoded rows have it as top-1."""
    model_names: dict[int, str] = dataclasses.field(default_factory=dict)
    """Model class index -> the name the model gives it, for every index predicted."""

    def add(self, unit: int, first_row: int, batch: Batch) -> None:
        scored = batch.ok & (batch.label >= 0) & (batch.target >= 0)
        correct = batch.top1 == batch.target
        labels = batch.label[scored]
        self.n_scored += int(scored.sum())
        self._add_classes(labels, correct[scored], batch.in_top5[scored])
        # Top-5 needs 5 classes kept on every row with a target, as compute_metrics decides.
        labelled = batch.ok & (batch.target >= 0)
        self.top5_available = self.top5_available and bool(batch.top5_kept[labelled].all())
        self.calibration.add(batch.confidence[scored], correct[scored])
        wrong = scored & ~correct
        if wrong.any():
            pairs, counts = np.unique(np.stack([batch.label[wrong], batch.top1[wrong]], axis=1), axis=0,
                                      return_counts=True)
            self.confused.update(dict(zip(map(tuple, pairs.tolist()), counts.tolist())))
        self.mistakes.add(unit, first_row, wrong, batch)
        self.uncertain.add(unit, first_row, batch.ok, batch)
        self.n_predicted += int(batch.ok.sum())
        predicted, counts = np.unique(batch.top1[batch.ok], return_counts=True)
        self.predicted.update(dict(zip(predicted.tolist(), counts.tolist())))
        self.model_names.update(batch.model_names)

    def _add_classes(self, labels: np.ndarray, correct: np.ndarray, in_top5: np.ndarray) -> None:
        if labels.size == 0:
            return
        size = max(self.class_n.size, int(labels.max()) + 1)
        grow = (lambda a: np.pad(a, (0, size - a.size)))  # noqa: E731
        self.class_n = grow(self.class_n) + np.bincount(labels, minlength=size)
        self.class_top1 = grow(self.class_top1) + np.bincount(labels[correct], minlength=size)
        self.class_top5 = grow(self.class_top5) + np.bincount(labels[in_top5], minlength=size)


def scan(files: list[tuple[int, Path]]) -> Scan:
    """One pass over the unit files, in unit order, in record batches."""
    result = Scan()
    for unit, path in files:
        first_row = 0
        for record_batch in iter_batches(path, SCAN_COLUMNS):
            result.add(unit, first_row, Batch.read(record_batch))
            first_row += record_batch.num_rows
    return result


def shorten(imagenet_name: str) -> str:
    """The first of an ImageNet class's synonyms: 'tench, Tinca tinca' -> 'tench'."""
    return imagenet_name.split(",")[0].strip()


@dataclass
class ClassNames:
    """Names of the dataset's label indices and of the model's output indices."""

    label_wnids: list[str]
    label_names: list[str]
    model_imagenet: bool
    model_names: dict[int, str]

    def label(self, index: int, short: bool = False) -> str:
        if not 0 <= index < len(self.label_names):
            return f"class {index}"
        name = self.label_names[index]
        return shorten(name) if short and self.label_wnids[index] else name

    def label_wnid(self, index: int) -> str:
        return self.label_wnids[index] if 0 <= index < len(self.label_wnids) else ""

    def predicted(self, index: int, short: bool = False) -> str:
        if self.model_imagenet and 0 <= index < 1000:
            name = imagenet_classes()[1][index]
            return shorten(name) if short else name
        return self.model_names.get(index, f"class {index}")

    def predicted_wnid(self, index: int) -> str:
        return imagenet_classes()[0][index] if self.model_imagenet and 0 <= index < 1000 else ""


def model_is_imagenet(model: dict[str, Any]) -> bool:
    """Whether the model reports ImageNet-1k indices (as labels.model_labels decides)."""
    if "imagenet_ids" in model:
        return bool(model["imagenet_ids"])
    return model.get("num_labels") == 1000 or "background" in str(model.get("label_space", ""))


def class_names(manifest: dict[str, Any], model_names: dict[int, str]) -> ClassNames:
    classes = manifest["dataset"].get("classes", "imagenet-1k")
    if classes == "imagenet-1k":
        wnids, names = (list(c) for c in imagenet_classes())
    else:
        wnids, names = [""] * len(classes), [str(c) for c in classes]
    return ClassNames(wnids, names, model_is_imagenet(manifest.get("model", {})), model_names)


# ---------------------------------------------------------------- the maths


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over equal-width confidence bins (lo, hi] (0 goes to the first):
    sum over bins of (n_bin / n) * |accuracy_bin - mean confidence_bin|."""
    calibration = Calibration(bins)
    calibration.add(confidence, correct)
    return calibration.ece()


@dataclass
class ClassScore:
    index: int
    wnid: str
    name: str
    n: int
    top1: float
    top5: float | None


def per_class(result: Scan, names: ClassNames) -> list[ClassScore]:
    """Accuracy of each dataset class present among the scored rows, by class index."""
    scores = []
    for index in np.flatnonzero(result.class_n).tolist():
        n = int(result.class_n[index])
        top5 = int(result.class_top5[index]) / n if result.top5_available else None
        scores.append(ClassScore(index, names.label_wnid(index), names.label(index), n,
                                 int(result.class_top1[index]) / n, top5))
    return scores


def confusions(result: Scan, limit: int = TOP_CONFUSIONS) -> list[tuple[int, int, int]]:
    """(true label, predicted model class, count) of the commonest top-1 mistakes."""
    pairs = ((t, p, n) for (t, p), n in result.confused.items())
    return sorted(pairs, key=lambda x: (-x[2], x[0], x[1]))[:limit]


# ---------------------------------------------------------------- images


Opener = Callable[[int, str], Image.Image]
"""Opens the image behind (unit, row id)."""


def image_opener(manifest: dict[str, Any], output_dir: str | Path) -> Opener:
    """Open the image behind a row (its unit and id). Raises when the dataset itself cannot be reached.

    Where the folder has its input listing, the item is looked up in its unit (a tar, a
    row-group run, a range of listed files); hand-made folders without one name files by id.
    """
    from batch_classify.inputs.listing import LISTED_KINDS, image_sources, read_listing
    from batch_classify.pipeline.decode import open_image

    config = manifest.get("config", {})
    data = config.get("data", {})
    max_pixels = config.get("runtime", {}).get("max_image_pixels", 128_000_000)
    kind = manifest["dataset"].get("kind")
    listing = read_listing(output_dir)
    root = Path(listing.root if listing is not None else data.get("path", manifest["dataset"]["path"]))
    if kind == "file_list" and listing is None:
        root = root.parent
    if kind in LISTED_KINDS and not root.is_dir():
        raise FileNotFoundError(f"the image folder {root} does not exist (moved or removed?)")
    if listing is None and kind in LISTED_KINDS:
        return lambda unit, item_id: open_image(str(root / item_id), max_pixels)
    if listing is None:  # a folder written without its listing (by hand): list the input whole
        from batch_classify.core.config import DataConfig
        from batch_classify.inputs.listing import load_items

        known = {f.name for f in dataclasses.fields(DataConfig)}
        items = load_items(DataConfig(**{k: v for k, v in data.items() if k in known}))
        position = {item_id: i for i, item_id in enumerate(items.ids)}
        return lambda unit, item_id: open_image(items.open(position[item_id]), max_pixels)
    source = image_sources(output_dir)
    return lambda unit, item_id: open_image(source(unit, item_id), max_pixels)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int, keep_end: bool = False) -> str:
    """The text, cut to ``width`` pixels with an ellipsis (at the start when ``keep_end``)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[1:] if keep_end else text[:-1]
    return "…" + text if keep_end else text + "…"


@dataclass
class Tile:
    unit: int
    item_id: str
    lines: list[tuple[str, str]]
    """(text, colour) caption lines under the thumbnail."""


def mistake_tile(pick: Pick, names: ClassNames) -> Tile:
    return Tile(pick.unit, pick.item_id, [(pick.item_id, "dimgray"),
                                          ("true: " + names.label(pick.label, short=True), "darkgreen"),
                                          (f"{pick.confidence:.0%} {names.predicted(pick.top1, short=True)}",
                                           "firebrick")])


def prediction_tile(pick: Pick, names: ClassNames) -> Tile:
    return Tile(pick.unit, pick.item_id, [(pick.item_id, "dimgray"),
                                          (f"pred: {names.predicted(pick.top1, short=True)}", "black"),
                                          (f"confidence {pick.confidence:.0%}", "firebrick")])


def _thumbnail(opener: Opener | None, tile: Tile) -> Image.Image | None:
    if opener is None:
        return None
    try:
        return ImageOps.contain(opener(tile.unit, tile.item_id), (THUMB, THUMB))
    except Exception:  # a moved or broken file: the cell says so
        return None


def contact_sheet(tiles: list[Tile], opener: Opener | None, path: Path) -> int:
    """Draw the tiles in a grid of CELL-sized cells; return how many images opened.
    Writes nothing when none did."""
    columns = min(SHEET_COLUMNS, len(tiles))
    sheet = Image.new("RGB", sheet_size(len(tiles)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(13)
    opened = 0
    for i, tile in enumerate(tiles):
        x, y = (i % columns) * CELL[0], (i // columns) * CELL[1]
        draw.rectangle([x + PAD, y + PAD, x + PAD + THUMB - 1, y + PAD + THUMB - 1], fill=(232, 232, 232))
        thumb = _thumbnail(opener, tile)
        if thumb is None:
            draw.text((x + PAD + 8, y + PAD + THUMB // 2 - 8), "image unavailable", fill="gray", font=font)
        else:
            opened += 1
            sheet.paste(thumb, (x + PAD + (THUMB - thumb.width) // 2, y + PAD + (THUMB - thumb.height) // 2))
        for line, (text, colour) in enumerate(tile.lines):
            fitted = _fit(draw, text, font, THUMB, keep_end=line == 0)  # the id's end is its file name
            draw.text((x + PAD, y + 2 * PAD + THUMB + line * LINE), fitted, fill=colour, font=font)
    if opened:
        sheet.save(path, quality=88)
    return opened


def sheet_size(n_tiles: int) -> tuple[int, int]:
    """(width, height) in pixels of the contact sheet of ``n_tiles`` tiles."""
    columns = min(SHEET_COLUMNS, n_tiles)
    return columns * CELL[0], math.ceil(n_tiles / columns) * CELL[1]


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float):
    # The object API on the Agg canvas: no pyplot, no global backend switch, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_accuracy(scores: list[ClassScore], count: np.ndarray, accuracy: np.ndarray,
                  confidence: np.ndarray, macro: float, ece: float, title: str, path: Path) -> None:
    """Left: per-class top-1 sorted from best to worst. Right: the reliability diagram."""
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


# ---------------------------------------------------------------- files


def percent(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100.0 * value:.2f}%"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


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
    scored: Callable[[dict[str, Any]], None] = lambda _extra: None
    """Called with the report's scores before any of its files is written (aggregate writes
    metrics.json then, so a report that cannot be written leaves the metrics in place)."""

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


def _opener(manifest: dict[str, Any], output: Path) -> tuple[Opener | None, str | None]:
    try:
        return image_opener(manifest, output), None
    except Exception as error:  # the report goes on without pictures
        return None, f"{type(error).__name__}: {error}"


def _sheet_section(ctx: Context, title: str, tiles: list[Tile], name: str) -> list[str]:
    lines = [f"## {title}", ""]
    if not tiles:
        return lines + ["None.", ""]
    opener, opener_error = _opener(ctx.manifest, ctx.output)
    opened = contact_sheet(tiles, opener, ctx.output / name)
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


def _labelled_report(ctx: Context) -> tuple[list[str], dict[str, Any]]:
    result = ctx.scan
    scores = per_class(result, ctx.names)
    macro = float(np.mean([s.top1 for s in scores]))
    ece = result.calibration.ece()
    pairs = confusions(result)
    ctx.scored({"macro_top1": macro, "ece": ece, "n_classes_scored": len(scores)})
    _write_class_files(ctx, scores, pairs)
    plot_accuracy(scores, *result.calibration.reliability(), macro, ece, ctx.model_name,
                  ctx.output / PER_CLASS_PLOT)
    ctx.written.append(PER_CLASS_PLOT)
    summary = _summary(ctx, [["top-1", percent(ctx.metrics["top1"])],
                             ["top-5", percent(ctx.metrics["top5"])],
                             [f"macro top-1 (mean over {len(scores)} classes)", percent(macro)],
                             [f"expected calibration error ({ECE_BINS} bins)", f"{ece:.4f}"]])
    lines = (summary + _class_section(scores) + _confusion_section(ctx.names, pairs)
             + _sheet_section(ctx, "Most confident mistakes",
                              [mistake_tile(pick, ctx.names) for pick in result.mistakes.picks()], MISTAKES))
    return lines, {"macro_top1": macro, "ece": ece, "n_classes_scored": len(scores)}


# ---------------------------------------------------------------- labelling mode: what was predicted


def _labelling_report(ctx: Context) -> tuple[list[str], dict[str, Any]]:
    result, names = ctx.scan, ctx.names
    ctx.scored({"macro_top1": None, "ece": None, "n_classes_scored": 0})
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
    return lines, {"macro_top1": None, "ece": None, "n_classes_scored": 0}


# ---------------------------------------------------------------- entry point


def write_report(output_dir: str | Path, metrics: dict[str, Any] | None = None,
                 files: list[tuple[int, Path]] | None = None,
                 scored: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write report.md and its files next to metrics.json; return metrics to merge into it:
    ``macro_top1``, ``ece`` (both None in labelling mode), ``n_classes_scored``, ``report_files``.

    ``aggregate`` passes the metrics and unit files it already has; alone, this finds them."""
    # Imported here, not at the top: aggregate() calls this module.
    from batch_classify.results.aggregate import TIMING

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
    if scored is not None:
        ctx.scored = scored
    body, extra = _labelled_report(ctx) if result.n_scored else _labelling_report(ctx)
    (output / REPORT).write_text("\n".join(_header(ctx) + body).rstrip() + "\n")
    for stale in set(ALL_FILES) - set(ctx.written):  # left by an earlier report of other results
        (output / stale).unlink(missing_ok=True)
    return {**extra, "report_files": ctx.written}
