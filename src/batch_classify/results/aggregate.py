"""Aggregate: every figure recomputed from the Parquet files (and the manifest) alone."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch_classify.core.errors import UserError, error_type
from batch_classify.core.faults import output_fault
from batch_classify.core.layout import METRICS, PREDICTIONS_DIR, TIMING, unit_of
from batch_classify.core.text import percent, write_json
from batch_classify.output.committed import Footer, Identity, describe_damage, first_unreadable, read_footers
from batch_classify.output.manifest import read_manifest
from batch_classify.output.units import (
    expected_units,
    file_stats,
    iter_batches,
    merge_stats,
    metrics_from_stats,
    unit_files,
)
from batch_classify.output.writer import SCHEMA
from batch_classify.results.report import write_report


class AggregateError(UserError, RuntimeError):
    """The outputs cannot be scored as they are; the message says what is wrong."""


def read_predictions(output_dir: str | Path) -> pa.Table:
    """All committed unit files, in unit order, in memory: for small outputs only (demo, tests).
    Partial (temporary) files are ignored."""
    folder = Path(output_dir) / PREDICTIONS_DIR
    files = sorted((p for p in folder.glob("unit-*.parquet") if unit_of(p) is not None), key=unit_of)
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(path, schema=SCHEMA) for path in files)


def compute_metrics(table: pa.Table) -> dict[str, Any]:
    """Counts and top-1/top-5 accuracy of one predictions table."""
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    targets = table.column("target").to_pylist()
    labels = table.column("label").to_pylist()
    topk = table.column("topk_ids").to_pylist()
    scored = [(t, ids) for t, ids, e in zip(targets, topk, table.column("error").to_pylist())
              if t is not None and e is None]
    metrics: dict[str, Any] = {
        "n": table.num_rows,
        "n_errors": len(errors),
        "errors_by_type": dict(sorted(Counter(map(error_type, errors)).items())),
        "n_labelled": sum(label is not None for label in labels),
        "n_scored": len(scored),
        "top1": None,
        "top5": None,
    }
    if scored:
        top1 = np.array([ids[0] == t for t, ids in scored])
        metrics["top1"] = float(top1.mean())
        if all(len(ids) >= 5 for _, ids in scored):
            metrics["top5"] = float(np.mean([t in ids[:5] for t, ids in scored]))
    return metrics


VAL_ID = re.compile(r"ILSVRC2012_val_(\d{8})")


def real_labels_path(value: str) -> Path:
    """``data.real_labels``: a real.json path, or 'imagenet-real' for the copy timm ships."""
    if value == "imagenet-real":
        return Path(str(resources.files("timm.data").joinpath("_info", "imagenet_real_labels.json")))
    return Path(value)


def real_accuracy(batches: pa.Table | Iterable[pa.RecordBatch], real_path: Path) -> dict[str, Any]:
    """ImageNet-ReaL top-1/top-5: a prediction is right if it is among the image's ReaL labels.

    ``batches``: a table or record batches with the id, topk_ids and error columns. Rows are
    matched to real.json by the validation file number in their id; images with no ReaL label
    are left out, as in the ReaL paper and timm."""
    try:
        real = json.loads(real_path.read_text())
    except (OSError, ValueError) as error:
        raise AggregateError(f"data.real_labels {real_path}: cannot read it ({error})") from None
    if isinstance(batches, pa.Table):
        batches = batches.to_batches()
    n = top1 = top5 = 0
    for batch in batches:
        for item_id, ids, error in zip(batch.column("id").to_pylist(), batch.column("topk_ids").to_pylist(),
                                       batch.column("error").to_pylist()):
            match = VAL_ID.search(item_id)
            if match is None or error is not None:
                continue
            index = int(match.group(1)) - 1
            if not 0 <= index < len(real) or not real[index]:
                continue
            labels = set(real[index])
            n += 1
            top1 += ids[0] in labels
            top5 += any(i in labels for i in ids[:5])
    if not n:
        return {"real_top1": None, "real_top5": None, "n_real": 0,
                "real_unavailable": "no row id holds an ILSVRC2012_val_ file number with ReaL labels"}
    return {"real_top1": top1 / n, "real_top5": top5 / n, "n_real": n}


def _names(values: list, limit: int = 10) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f" ... and {len(values) - limit} more" if len(values) > limit else "")


def check_units(output: Path, manifest: dict[str, Any], files: list[tuple[int, Path]],
                stats: list[dict[str, Any]]) -> None:
    """Refuse outputs that do not hold each of the job's units exactly once, or whose row count
    differs from the manifest's item count; works from the file names and footers alone."""
    by_digest: dict[str, list[str]] = {}
    for (_, path), unit_stats in zip(files, stats):
        if unit_stats["n"]:
            by_digest.setdefault(unit_stats["ids_digest"], []).append(path.name)
    copies = [names for names in by_digest.values() if len(names) > 1]
    if copies:
        raise AggregateError(
            f"{output}: id(s) appear more than once: {' and '.join(copies[0])} hold the same ids "
            "(equal id digests); the predictions mix results of different runs: remove the stray file(s)")
    for (unit, path), unit_stats in zip(files, stats):
        if unit_stats.get("unit", unit) != unit:
            raise AggregateError(
                f"{output}: {path.name} holds the rows of unit {unit_stats['unit']} (its footer says so): a "
                "copied or renamed file; remove it")
    n_units = expected_units(manifest)
    if n_units is None:
        raise AggregateError(f"{output}: the manifest has neither dataset.n_units nor dataset.n_items with "
                             "job.unit_size, so missing units cannot be found; write n_units into it")
    stray = [path.name for unit, path in files if unit >= n_units]
    if stray:
        raise AggregateError(f"{output}: {len(stray)} unit file(s) beyond the job's {n_units} units "
                             f"({_names(stray)}): they belong to another job; remove them")
    n_rows = sum(unit_stats["n"] for unit_stats in stats)
    expected = manifest["dataset"].get("n_items")
    rows = "" if expected is None else f"{n_rows} prediction rows but the manifest lists {expected} items; "
    present = {unit for unit, _ in files}
    missing = [unit for unit in range(n_units) if unit not in present]
    if missing:
        raise AggregateError(
            f"{output}: {rows}{len(missing)} of {n_units} units have no committed file "
            f"(units {_names(missing)}); run the job again to finish the missing units")
    if expected is not None and n_rows != expected:
        raise AggregateError(f"{output}: {rows}run the job again to finish the missing units")


def check_ids_within_units(output: Path, files: list[tuple[int, Path]], stats: list[dict[str, Any]]) -> None:
    """Each id once within each unit file. (Across units ids are unique by construction: each unit
    is written once, atomically, and check_units refuses copied files.) A footer's distinct count
    answers without reading the ids; only a file with a doubled id, or no such count, is read."""
    for (unit, path), counts in zip(files, stats):
        if counts.get("n_distinct") == counts["n"]:
            continue
        ids = pq.read_table(path, columns=["id"]).column("id")
        if pc.count_distinct(ids, mode="all").as_py() == len(ids):
            continue
        counts = pc.value_counts(ids)
        doubled = counts.filter(pc.greater(counts.field("counts"), 1))[0].as_py()
        raise AggregateError(
            f"{output}: id {doubled['values']!r} appears {doubled['counts']} times in unit {unit} "
            f"({path.name}); delete that file and run the job again to rewrite the unit")


def check_footers(output: Path, manifest: dict[str, Any], files: list[tuple[int, Path]]) -> list[Footer]:
    """Every unit file whole and this job's, from its footer alone (a unit file's number against
    its name is check_units' to say); refuses the folder naming the first that is not."""
    footers = list(read_footers(files, Identity.of(manifest), strict=False, check_unit=False))
    damaged = [footer for footer in footers if footer.problem is not None]
    if damaged:
        first = damaged[0]
        more = (f" ({len(damaged) - 1} more such file(s): {_names([f.path.name for f in damaged[1:]])})"
                if len(damaged) > 1 else "")
        raise AggregateError(f"{output}: {describe_damage(first.unit, first.path, first.problem)}{more}")
    return footers


def aggregate(output_dir: str | Path) -> dict[str, Any]:
    """Score the output folder, write metrics.json, return the metrics.

    Refuses outputs with a damaged or foreign unit file, a missing or doubled unit, an id twice
    within a unit, or whose item count differs from the manifest. Totals come from the unit files'
    footers, so memory does not grow with the rows. Also writes the report (per_class.csv,
    confusions.csv, report.md, plots, contact sheet, report.html and its thumbnails).
    """
    output = Path(output_dir)
    manifest = read_manifest(output)
    if manifest is None:
        raise AggregateError(f"{output} has no manifest.json: not a batch-classify output folder")
    files = unit_files(output)
    footers = check_footers(output, manifest, files)
    try:
        return _score(output, manifest, files, footers)
    except (OSError, pa.ArrowException) as error:
        if output_fault(error, output) is not None:
            raise  # the output filesystem failed (full, read-only, ...), not a unit file
        # A footer can be sound and a page behind it not: name the file the failed read came
        # from (found again only now, so a sound folder is read once).
        found = first_unreadable(files)
        if found is None:
            raise  # no unit file is at fault (a report file that cannot be written, say)
        raise AggregateError(f"{output}: {describe_damage(*found, repaired_by_job=False)}") from error


def _score(output: Path, manifest: dict[str, Any], files: list[tuple[int, Path]],
           footers: list[Footer]) -> dict[str, Any]:
    stats = [footer.stats if footer.stats is not None else file_stats(path)
             for footer, (_, path) in zip(footers, files)]
    check_units(output, manifest, files, stats)
    check_ids_within_units(output, files, stats)
    metrics = metrics_from_stats(merge_stats(stats))
    reason = manifest.get("accuracy_unavailable")
    if metrics["top1"] is None and reason is None:
        reason = "the dataset has no labels" if metrics["n_labelled"] == 0 else "no item could be scored"
    if metrics["top5"] is None and metrics["top1"] is not None:
        metrics["top5_unavailable"] = "fewer than 5 classes kept per row (output.top_k)"
    metrics["accuracy_unavailable"] = reason
    timing_path = output / TIMING
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    metrics["images_per_second"] = timing.get("images_per_second")
    metrics["timing"] = timing
    metrics["model"] = manifest["model"]
    metrics["dataset"] = manifest["dataset"]
    real = manifest.get("config", {}).get("data", {}).get("real_labels")
    if real:
        if not manifest["model"].get("imagenet_ids", True):
            metrics["real_unavailable"] = "the model's classes are not ImageNet-1k"
        else:
            columns = ["id", "topk_ids", "error"]
            batches = (batch for _, path in files for batch in iter_batches(path, columns))
            metrics.update(real_accuracy(batches, real_labels_path(real)))
    # The small, precious file first: metrics.json is written once the report's scores are known,
    # before its tables and pictures, and again with the list of report files once they are all
    # written. A metrics.json without report_files means the report is incomplete (a full disk).
    metrics.update(write_report(output, metrics, files,
                                scored=lambda extra: write_json(output / METRICS, {**metrics, **extra})))
    write_json(output / METRICS, metrics)
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """The short summary printed when a job ends."""
    speed = metrics.get("images_per_second")
    rows = [
        ("model", str(metrics["model"]["name"])),
        ("dataset", f"{metrics['dataset']['path']} ({metrics['dataset']['kind']})"),
        ("images", str(metrics["n"])),
        ("errors", str(metrics["n_errors"]) + (
            f" {metrics['errors_by_type']}" if metrics["n_errors"] else "")),
        ("top-1", percent(metrics["top1"])),
        ("top-5", percent(metrics["top5"])),
        *([("ReaL top-1", percent(metrics["real_top1"]))] if metrics.get("real_top1") is not None else []),
        ("images/s", "n/a" if speed is None else f"{speed:.1f}"),
    ]
    if metrics["model"].get("label_space"):
        rows.append(("labels", metrics["model"]["label_space"]))
    if metrics.get("accuracy_unavailable"):
        rows.append(("accuracy", "unavailable: " + metrics["accuracy_unavailable"]))
    if metrics.get("report_page_bytes"):  # ---- the report page (results/report/html.py)
        size = metrics["report_page_bytes"] / 1e6
        rows.append(("report", f"report.html with its thumbnails, {size:.1f} MB"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
