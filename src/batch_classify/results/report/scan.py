"""One pass over the unit files: every figure of the report, accumulated with memory per class, not
per row."""

from __future__ import annotations

import dataclasses
import heapq
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from batch_classify.output.units import (
    Lists,
    int_column,
    iter_batches,
    top1_and_decoded,
    top1_names,
)
from batch_classify.results.report.examples import Examples
from batch_classify.results.report.names import ClassNames

ECE_BINS = 15
TOP_CONFUSIONS = 20
SHEET_MAX = 24
"""Rows kept per contact sheet."""


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
    errors: pa.Array | None = None
    """The error column (its messages), for the page's examples of each error type."""

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
                   ok, topk.lengths >= 5, top1_names(batch, top1, ok), batch.column("error"))


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
    examples: Examples = dataclasses.field(default_factory=Examples)
    """The page's examples: bounded per class (examples.py)."""

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
        self.examples.add(unit, first_row, batch, scored, correct)
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
        result.examples.end_unit(unit, first_row, result.confused)
    return result



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
