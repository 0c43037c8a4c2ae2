"""The committed unit files of an output folder, read in bounded memory: footers and record batches.

aggregate, report and compare never hold all rows: they sum the counts each unit file carries
in its footer and scan the columns they need in record batches of ``BATCH_ROWS`` rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch_classify.core.digests import add_digests
from batch_classify.core.layout import PREDICTIONS_DIR, unit_of
from batch_classify.output.writer import read_unit_stats, unit_stats

BATCH_ROWS = 65_536
"""Rows per record batch when scanning unit files (a module constant so tests can make it small)."""

STATS_COLUMNS = ["id", "label", "target", "topk_ids", "error"]


def unit_files(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(unit, path) of every committed unit file, in unit order. Partial (temporary) files are ignored."""
    folder = Path(output_dir) / PREDICTIONS_DIR
    if not folder.is_dir():
        return []
    found = ((unit_of(path), path) for path in folder.glob("unit-*.parquet"))
    return sorted((unit, path) for unit, path in found if unit is not None)


def expected_units(manifest: dict[str, Any]) -> int | None:
    """How many units the job has: ``dataset.n_units``, else derived from n_items and unit_size."""
    dataset, job = manifest.get("dataset", {}), manifest.get("job", {})
    if dataset.get("n_units") is not None:
        return int(dataset["n_units"])
    if dataset.get("n_items") is not None and job.get("unit_size"):
        return -(-int(dataset["n_items"]) // int(job["unit_size"]))  # ranges of unit_size items
    return None


def iter_batches(path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    # Page checksums (written with every unit file) catch a flipped byte inside a page.
    yield from pq.ParquetFile(path, page_checksum_verification=True).iter_batches(
        columns=columns, batch_size=BATCH_ROWS)


def merge_stats(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum unit_stats-shaped counts (of batches of one file, or of unit files)."""
    total: dict[str, Any] = {"n": 0, "n_errors": 0, "n_labelled": 0, "n_scored": 0, "top1_hits": 0,
                             "top5_hits": 0}
    errors: Counter[str] = Counter()
    top5_available, digests = True, []
    for part in parts:
        for key in total:
            total[key] += part[key]
        errors.update(part["errors_by_type"])
        top5_available = top5_available and part["top5_available"]
        digests.append(part["ids_digest"])
    return {**total, "errors_by_type": dict(sorted(errors.items())), "top5_available": top5_available,
            "ids_digest": add_digests(digests)}


def file_stats(path: Path) -> dict[str, Any]:
    """A unit file's counts: from its footer, or for files written before footers, by scanning it."""
    stats = read_unit_stats(path)
    if stats is not None:
        return stats
    return merge_stats(unit_stats(batch.to_pydict()) for batch in iter_batches(path, STATS_COLUMNS))


def metrics_from_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The counts and accuracies ``aggregate.compute_metrics`` gives, from summed unit counts."""
    scored = stats["n_scored"]
    return {
        "n": stats["n"],
        "n_errors": stats["n_errors"],
        "errors_by_type": dict(sorted(stats["errors_by_type"].items())),
        "n_labelled": stats["n_labelled"],
        "n_scored": scored,
        "top1": stats["top1_hits"] / scored if scored else None,
        "top5": stats["top5_hits"] / scored if scored and stats["top5_available"] else None,
    }


# ---------------------------------------------------------------- columns of one batch as arrays


def int_column(array: pa.Array) -> np.ndarray:
    """An integer column with -1 for nulls."""
    return pc.fill_null(array, -1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def null_mask(array: pa.Array) -> np.ndarray:
    return array.is_null().to_numpy(zero_copy_only=False)


class Lists:
    """A list column as flat values, with where each row's list starts and how long it is."""

    def __init__(self, array: pa.Array):
        self.lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.flat = pc.list_flatten(array)  # null lists hold no values: consistent with lengths 0

    def values(self) -> np.ndarray:
        return self.flat.to_numpy(zero_copy_only=False)

    def first(self, rows: np.ndarray, fill, dtype) -> np.ndarray:
        """Each row's first value where ``rows`` (which must all be non-empty), else ``fill``."""
        result = np.full(len(self.lengths), fill, dtype=dtype)
        result[rows] = self.values()[self.starts[rows]]
        return result


def top1_and_decoded(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 model class or -1, decoded): decoded rows have no error and at least one class kept."""
    topk = Lists(batch.column("topk_ids"))
    decoded = null_mask(batch.column("error")) & (topk.lengths > 0)
    return topk.first(decoded, -1, np.int64), decoded


def top1_names(batch: pa.RecordBatch, top1: np.ndarray, decoded: np.ndarray,
               skip_empty: bool = False) -> dict[int, str | None]:
    """{top-1 index: the name the model gave it} over this batch, the last row's name winning (as
    a dict updated row by row would). ``skip_empty``: rows whose name is null or '' give none."""
    labels = Lists(batch.column("topk_labels"))
    named = np.flatnonzero(decoded & (labels.lengths > 0))
    names = labels.flat.take(pa.array(labels.starts[named], type=pa.int64()))
    if skip_empty:
        keep = pc.fill_null(pc.greater(pc.binary_length(names), 0), False).to_numpy(zero_copy_only=False)
        named, names = named[keep], names.filter(pa.array(keep))
    if named.size == 0:
        return {}
    index = top1[named]
    unique, first_reversed = np.unique(index[::-1], return_index=True)
    last = index.size - 1 - first_reversed
    return dict(zip(unique.tolist(), names.take(pa.array(last)).to_pylist()))
