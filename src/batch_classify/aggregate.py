"""Aggregate: every figure recomputed from the Parquet files (and the manifest) alone."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import read_manifest, write_json
from .report import write_report
from .writer import PREDICTIONS_DIR, SCHEMA, unit_of

METRICS = "metrics.json"
TIMING = "timing.json"


class AggregateError(RuntimeError):
    """The outputs cannot be scored as they are; the message says what is wrong."""


def read_predictions(output_dir: str | Path) -> pa.Table:
    """All committed unit files, in unit order. Partial (temporary) files are ignored."""
    folder = Path(output_dir) / PREDICTIONS_DIR
    files = sorted((p for p in folder.glob("unit-*.parquet") if unit_of(p) is not None), key=unit_of)
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(path, schema=SCHEMA) for path in files)


def _error_type(message: str) -> str:
    return message.split(":", 1)[0]


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
        "errors_by_type": dict(sorted(Counter(map(_error_type, errors)).items())),
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


def real_accuracy(table: pa.Table, real_path: Path) -> dict[str, Any]:
    """ImageNet-ReaL top-1/top-5: a prediction is right if it is among the image's ReaL labels.

    Rows are matched to real.json by the validation file number in their id; images with no
    ReaL label are left out, as in the ReaL paper and timm."""
    try:
        real = json.loads(real_path.read_text())
    except (OSError, ValueError) as error:
        raise AggregateError(f"data.real_labels {real_path}: cannot read it ({error})") from None
    top1, top5 = [], []
    for item_id, ids, error in zip(table.column("id").to_pylist(), table.column("topk_ids").to_pylist(),
                                   table.column("error").to_pylist()):
        match = VAL_ID.search(item_id)
        if match is None or error is not None:
            continue
        index = int(match.group(1)) - 1
        if not 0 <= index < len(real) or not real[index]:
            continue
        labels = set(real[index])
        top1.append(ids[0] in labels)
        top5.append(any(i in labels for i in ids[:5]))
    if not top1:
        return {"real_top1": None, "real_top5": None, "n_real": 0,
                "real_unavailable": "no row id holds an ILSVRC2012_val_ file number with ReaL labels"}
    return {"real_top1": float(np.mean(top1)), "real_top5": float(np.mean(top5)), "n_real": len(top1)}


def aggregate(output_dir: str | Path) -> dict[str, Any]:
    """Score the output folder, write metrics.json, return the metrics.

    Refuses outputs in which an id appears twice or whose item count differs from the manifest.
    Also writes the report (per_class.csv, confusions.csv, report.md, plots, contact sheet).
    """
    output = Path(output_dir)
    manifest = read_manifest(output)
    if manifest is None:
        raise AggregateError(f"{output} has no manifest.json: not a batch-classify output folder")
    table = read_predictions(output)
    ids = table.column("id").to_pylist()
    counts = Counter(ids)
    duplicated = [item for item, count in counts.items() if count > 1]
    if duplicated:
        raise AggregateError(
            f"{output}: {len(duplicated)} id(s) appear more than once (e.g. {duplicated[0]!r}); "
            "the predictions mix results of different runs"
        )
    expected = manifest["dataset"]["n_items"]
    if len(ids) != expected:
        raise AggregateError(
            f"{output}: {len(ids)} prediction rows but the manifest lists {expected} items; "
            "run the job again to finish the missing units"
        )
    metrics = compute_metrics(table)
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
            metrics.update(real_accuracy(table, real_labels_path(real)))
    metrics.update(write_report(output))
    write_json(output / METRICS, metrics)
    return metrics


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f}%"


def format_table(metrics: dict[str, Any]) -> str:
    """The short summary printed when a job ends."""
    speed = metrics.get("images_per_second")
    rows = [
        ("model", str(metrics["model"]["name"])),
        ("dataset", f"{metrics['dataset']['path']} ({metrics['dataset']['kind']})"),
        ("images", str(metrics["n"])),
        ("errors", str(metrics["n_errors"]) + (
            f" {metrics['errors_by_type']}" if metrics["n_errors"] else "")),
        ("top-1", _percent(metrics["top1"])),
        ("top-5", _percent(metrics["top5"])),
        *([("ReaL top-1", _percent(metrics["real_top1"]))] if metrics.get("real_top1") is not None else []),
        ("images/s", "n/a" if speed is None else f"{speed:.1f}"),
    ]
    if metrics["model"].get("label_space"):
        rows.append(("labels", metrics["model"]["label_space"]))
    if metrics.get("accuracy_unavailable"):
        rows.append(("accuracy", "unavailable: " + metrics["accuracy_unavailable"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
