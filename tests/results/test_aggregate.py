"""Aggregation from hand-built Parquet files with known answers: top-1/top-5 and ImageNet-ReaL."""

from __future__ import annotations

import json

import pytest

from batch_classify.core.text import write_json
from batch_classify.output.writer import write_unit
from batch_classify.results.aggregate import AggregateError, aggregate, compute_metrics, read_predictions


def build_output(folder, rows, real_labels=None, top_k=5):
    """An output folder holding `rows` (id, label, topk_ids, error) in one unit."""
    (folder / "predictions").mkdir(parents=True)
    columns = {"id": [], "label": [], "target": [], "topk_ids": [], "topk_labels": [],
               "topk_scores": [], "error": []}
    for item_id, label, ids, error in rows:
        columns["id"].append(item_id)
        columns["label"].append(label)
        columns["target"].append(label)
        columns["topk_ids"].append(ids)
        columns["topk_labels"].append(None if ids is None else [f"c{i}" for i in ids])
        columns["topk_scores"].append(None if ids is None else [0.5] + [0.1] * (len(ids) - 1))
        columns["error"].append(error)
    write_unit(folder, 0, columns, {})
    write_json(folder / "manifest.json", {
        "dataset": {"path": str(folder), "kind": "images", "n_items": len(rows),
                    "classes": "imagenet-1k"},
        "model": {"name": "hand-made", "num_labels": 1000, "imagenet_ids": True},
        "job": {"top_k": top_k, "unit_size": len(rows)},
        "config": {"data": {"path": str(folder), "real_labels": real_labels}},
    })
    return folder


ROWS = [  # id, label, top-5, error
    ("val/ILSVRC2012_val_00000001.JPEG", 65, [65, 1, 2, 3, 4], None),      # top-1 right
    ("val/ILSVRC2012_val_00000002.JPEG", 970, [795, 970, 1, 2, 3], None),  # top-5 right
    ("val/ILSVRC2012_val_00000003.JPEG", 230, [9, 8, 7, 6, 5], None),      # wrong
    ("val/ILSVRC2012_val_00000004.JPEG", 10, None, "OSError: broken"),    # not scored
    ("val/ILSVRC2012_val_00000005.JPEG", None, [1, 2, 3, 4, 5], None),    # unlabelled
]


def test_metrics_count_scored_rows_only(tmp_path):
    metrics = compute_metrics(read_predictions(build_output(tmp_path / "out", ROWS)))
    assert (metrics["n"], metrics["n_errors"], metrics["n_labelled"], metrics["n_scored"]) == (5, 1, 4, 3)
    assert metrics["top1"] == pytest.approx(1 / 3) and metrics["top5"] == pytest.approx(2 / 3)
    assert metrics["errors_by_type"] == {"OSError": 1}


def test_real_labels_second_score(tmp_path):
    real = tmp_path / "real.json"
    # Image 1 has no ReaL label (left out); 2: ReaL {970, 795} -> top-1 right; 3: {230, 231}
    # -> wrong; 4: errored; 5: {3} -> top-5 right only.
    real.write_text(json.dumps([[], [970, 795], [230, 231], [10], [3]]))
    metrics = aggregate(build_output(tmp_path / "out", ROWS, real_labels=str(real)))
    assert metrics["n_real"] == 3
    assert metrics["real_top1"] == pytest.approx(1 / 3) and metrics["real_top5"] == pytest.approx(2 / 3)
    assert metrics["top1"] == pytest.approx(1 / 3)


def test_real_labels_need_validation_file_numbers(tmp_path):
    rows = [("cat.jpg", 281, [281, 1, 2, 3, 4], None)]
    real = tmp_path / "real.json"
    real.write_text("[[281]]")
    metrics = aggregate(build_output(tmp_path / "out", rows, real_labels=str(real)))
    assert metrics["real_top1"] is None and "ILSVRC2012_val_" in metrics["real_unavailable"]
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(AggregateError, match="cannot read"):
        aggregate(build_output(tmp_path / "out2", rows, real_labels=str(broken)))


def test_shipped_real_labels_resolve():
    from batch_classify.results.aggregate import real_labels_path

    real = json.loads(real_labels_path("imagenet-real").read_text())
    assert len(real) == 50000 and real[1] == [970, 795]
