"""The report: hand-built predictions whose per-class accuracy, ECE and confusions are known."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch_classify.core.labels import imagenet_classes
from batch_classify.core.text import write_json
from batch_classify.output.writer import write_unit
from batch_classify.results.report import write_report
from batch_classify.results.report.pictures import CELL, PAD, THUMB
from batch_classify.results.report.scan import expected_calibration_error

ANIMALS = ["cat", "dog", "fox"]
ANIMAL_MODEL = {"name": "tiny/animals", "num_labels": 3, "label_space": "3 outputs: the model's own classes"}
IMAGENET_MODEL = {"name": "tiny/imagenet", "num_labels": 1000,
                  "label_space": "1000 outputs: ImageNet-1k order"}

# (id, label, top-1 prediction, its confidence); target == label (the model's classes are the
# dataset's, in the same order). Per class: cat 2/4, dog 2/3, fox 2/3 right.
SCORED = [
    ("cat/r0.png", 0, 0, 0.90),
    ("cat/r1.png", 0, 0, 0.82),
    ("cat/r2.png", 0, 1, 0.70),
    ("cat/r3.png", 0, 1, 0.95),
    ("dog/r4.png", 1, 1, 0.55),
    ("dog/r5.png", 1, 1, 0.85),
    ("dog/r6.png", 1, 2, 0.50),
    ("fox/r7.png", 2, 2, 0.99),
    ("fox/r8.png", 2, 0, 0.45),
    ("fox/r9.png", 2, 2, 0.75),
]
# Mistakes by confidence, highest first: r3 (0.95), r2 (0.70), r6 (0.50), r8 (0.45).
COLOURS = {"r3": (220, 30, 30), "r2": (30, 200, 30), "r6": (30, 30, 220), "r8": (230, 200, 20)}


def _prediction(top1: int, confidence: float, n_classes: int, k: int) -> tuple[list[int], list[float]]:
    others = [c for c in range(n_classes) if c != top1][: k - 1]
    rest = (1.0 - confidence) / len(others)
    return [top1, *others], [confidence, *([rest] * len(others))]


def make_output(folder: Path, rows: list[dict], *, classes, model: dict, model_names, data: dict,
                kind: str, top_k: int) -> Path:
    """A finished output folder: one unit of the given rows plus a manifest."""
    columns: dict[str, list] = {key: [] for key in
                                ("id", "label", "target", "topk_ids", "topk_labels", "topk_scores", "error")}
    for row in rows:
        ids, scores = ([], []) if row.get("error") else _prediction(row["top1"], row["confidence"],
                                                                    len(model_names), top_k)
        columns["id"].append(row["id"])
        columns["label"].append(row.get("label"))
        columns["target"].append(row.get("target", row.get("label")))
        columns["topk_ids"].append(ids)
        columns["topk_labels"].append([model_names[i] for i in ids])
        columns["topk_scores"].append(scores)
        columns["error"].append(row.get("error"))
    write_unit(folder, 0, columns, {"model": model})
    write_json(folder / "manifest.json", {
        "format_version": 1,
        "dataset": {"path": data["path"], "kind": kind, "n_items": len(rows), "classes": classes,
                    "fingerprint": "f" * 64},
        "model": model,
        "job": {"top_k": top_k, "unit_size": len(rows)},
        "accuracy_unavailable": None,
        "config": {"data": {"kind": "auto", "labels": None, **data}, "runtime": {"max_image_pixels": 10**8}},
    })
    return folder


def solid_images(root: Path, ids: list[str], colours: dict[str, tuple[int, int, int]]) -> Path:
    """One small PNG per id, of a solid colour (grey unless named in ``colours``)."""
    for i, item in enumerate(ids):
        path = root / item
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = colours.get(Path(item).stem, (128, 128, 128))
        Image.new("RGB", (40 + 10 * i, 30 + 5 * (i % 3)), colour).save(path)
    return root


@pytest.fixture
def animals(tmp_path: Path) -> Path:
    images = solid_images(tmp_path / "images", [r[0] for r in SCORED], COLOURS)
    rows = [{"id": i, "label": label, "top1": top1, "confidence": c} for i, label, top1, c in SCORED]
    rows.append({"id": "fox/broken.png", "label": 2, "error": "UnidentifiedImageError: cannot identify"})
    rows.append({"id": "stray.png", "label": None, "target": None, "top1": 0, "confidence": 0.3})
    return make_output(tmp_path / "out", rows, classes=ANIMALS, model=ANIMAL_MODEL, model_names=ANIMALS,
                       data={"path": str(images)}, kind="imagefolder", top_k=3)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def cell_centre(sheet: Image.Image, position: int, columns: int) -> tuple[int, int, int]:
    x = (position % columns) * CELL[0] + PAD + THUMB // 2
    y = (position // columns) * CELL[1] + PAD + THUMB // 2
    return sheet.getpixel((x, y))


def close(colour, expected, tolerance: int = 24) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(colour, expected))


def test_ece_by_hand():
    # 15 bins of width 1/15. 0.1 and 0.12 share (1/15, 2/15]: accuracy 1/2, confidence 0.11.
    # 0.0 falls in the first bin, 1.0 in the last.
    confidence = np.array([0.1, 0.12, 0.0, 1.0])
    correct = np.array([1, 0, 0, 1])
    expected = (2 / 4) * abs(0.5 - 0.11) + (1 / 4) * 0.0 + (1 / 4) * 0.0
    assert expected_calibration_error(confidence, correct) == pytest.approx(expected)
    # Every row right at confidence 0.9: |1 - 0.9|.
    assert expected_calibration_error(np.full(5, 0.9), np.ones(5)) == pytest.approx(0.1)


def test_labelled_report(animals: Path):
    extra = write_report(animals)

    # 10 scored rows (the error row and the unlabelled row are not scored).
    assert extra["n_classes_scored"] == 3
    assert extra["macro_top1"] == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    # Bin sums |right - sum of confidences|: 0.45 (0.45 wrong), 0.5 (0.50 wrong), 0.45 (0.55
    # right), 0.7 (0.70 wrong), 0.25 (0.75 right), |2 - 1.67| (0.82, 0.85 right), 0.1 (0.90
    # right), |1 - 1.94| (0.95 wrong, 0.99 right); over 10 rows.
    assert extra["ece"] == pytest.approx(3.72 / 10, abs=1e-6)
    assert set(extra["report_files"]) == {"report.md", "per_class.csv", "confusions.csv",
                                          "per_class.png", "mistakes.jpg", "report.html", "report_files"}

    per_class = read_csv(animals / "per_class.csv")
    assert [(r["class_index"], r["wnid"], r["name"], r["n"]) for r in per_class] == [
        ("0", "", "cat", "4"), ("1", "", "dog", "3"), ("2", "", "fox", "3")]
    assert [float(r["top1"]) for r in per_class] == pytest.approx([0.5, 2 / 3, 2 / 3])
    assert all(r["top5"] == "" for r in per_class)  # 3 classes kept per row: no top-5

    confusions = read_csv(animals / "confusions.csv")
    assert [(r["true_name"], r["predicted_name"], r["count"]) for r in confusions] == [
        ("cat", "dog", "2"), ("dog", "fox", "1"), ("fox", "cat", "1")]

    report = (animals / "report.md").read_text()
    assert "60.00%" in report  # top-1: 6 of 10
    assert "61.11%" in report  # macro top-1
    assert "0.3720" in report  # ECE
    assert "UnidentifiedImageError: 1" in report
    assert "![" in report and "mistakes.jpg" in report and "per_class.png" in report
    assert "could not be opened" not in report

    with Image.open(animals / "per_class.png") as plot:
        assert plot.width > 400 and plot.height > 200
    with Image.open(animals / "mistakes.jpg") as sheet:
        # 4 mistakes: one row of 4 cells, most confident first.
        assert sheet.size == (4 * CELL[0], CELL[1])
        sheet = sheet.convert("RGB")
        for position, stem in enumerate(["r3", "r2", "r6", "r8"]):
            assert close(cell_centre(sheet, position, 4), COLOURS[stem]), stem


def test_missing_images(animals: Path, tmp_path: Path):
    # One image gone: its cell says so, the others render.
    (tmp_path / "images" / "cat" / "r2.png").unlink()
    extra = write_report(animals)
    assert "mistakes.jpg" in extra["report_files"]
    assert "1 of 4 images could not be opened" in (animals / "report.md").read_text()
    with Image.open(animals / "mistakes.jpg") as sheet:
        sheet = sheet.convert("RGB")
        assert close(cell_centre(sheet, 0, 4), COLOURS["r3"])
        assert close(cell_centre(sheet, 1, 4), (232, 232, 232))  # the empty cell's grey

    # The folder moved: the report is still written, says so, and the old sheet is removed.
    shutil.rmtree(tmp_path / "images")
    extra = write_report(animals)
    report = (animals / "report.md").read_text()
    assert "The images could not be opened" in report and "does not exist" in report
    assert "mistakes.jpg" not in extra["report_files"]
    assert not (animals / "mistakes.jpg").exists()
    assert extra["macro_top1"] == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)


def test_imagenet_report(tmp_path: Path):
    wnids, names = imagenet_classes()
    top5 = {  # label 0 (tench) twice, 281 (tabby) twice
        "a.png": (0, [0, 1, 2, 3, 4]),        # right, in top-5
        "b.png": (0, [1, 0, 2, 3, 4]),        # wrong (goldfish), in top-5
        "c.png": (281, [282, 285, 1, 2, 3]),  # wrong (tiger cat), not in top-5
        "d.png": (281, [281, 282, 1, 2, 3]),  # right
    }
    solid_images(tmp_path / "val", list(top5), {})
    columns = {"id": [], "label": [], "target": [], "topk_ids": [], "topk_labels": [], "topk_scores": [],
               "error": []}
    for item, (label, ids) in top5.items():
        for key, value in (("id", item), ("label", label), ("target", label), ("topk_ids", ids),
                           ("topk_labels", [names[i] for i in ids]),
                           ("topk_scores", [0.8, 0.1, 0.05, 0.03, 0.02]), ("error", None)):
            columns[key].append(value)
    out = tmp_path / "out"
    write_unit(out, 0, columns, {})
    write_json(out / "manifest.json", {
        "dataset": {"path": str(tmp_path / "val"), "kind": "images", "n_items": 4, "classes": "imagenet-1k"},
        "model": IMAGENET_MODEL, "config": {"data": {"path": str(tmp_path / "val")}}})

    extra = write_report(out)
    per_class = read_csv(out / "per_class.csv")
    assert [(r["class_index"], r["wnid"], r["name"], r["n"]) for r in per_class] == [
        ("0", "n01440764", names[0], "2"), ("281", "n02123045", names[281], "2")]
    assert [(float(r["top1"]), float(r["top5"])) for r in per_class] == [(0.5, 1.0), (0.5, 0.5)]
    confusions = read_csv(out / "confusions.csv")
    assert sorted((r["true_wnid"], r["predicted_wnid"], r["count"]) for r in confusions) == [
        ("n01440764", "n01443537", "1"), ("n02123045", "n02123159", "1")]  # goldfish, tiger cat
    # All at confidence 0.8, half right: ECE = |0.5 - 0.8|.
    assert extra["ece"] == pytest.approx(0.3, abs=1e-6)
    assert extra["macro_top1"] == pytest.approx(0.5)
    with Image.open(out / "mistakes.jpg") as sheet:
        assert sheet.size == (2 * CELL[0], CELL[1])


def test_labelling_mode(tmp_path: Path):
    # No labels: 7 images, predicted dog 4 times, cat twice, fox once.
    predictions = [("p0.png", 1, 0.9), ("p1.png", 1, 0.8), ("p2.png", 0, 0.4), ("p3.png", 1, 0.7),
                   ("p4.png", 2, 0.35), ("p5.png", 0, 0.6), ("p6.png", 1, 0.95)]
    listed = tmp_path / "list" / "files.txt"
    solid_images(listed.parent, [p[0] for p in predictions], {"p4": (200, 0, 200)})
    listed.write_text("\n".join(p[0] for p in predictions) + "\n")
    rows = [{"id": i, "label": None, "top1": top1, "confidence": c} for i, top1, c in predictions]
    out = make_output(tmp_path / "out", rows, classes="imagenet-1k", model=ANIMAL_MODEL, model_names=ANIMALS,
                      data={"path": str(listed)}, kind="file_list", top_k=3)

    extra = write_report(out)
    assert extra["macro_top1"] is None and extra["ece"] is None and extra["n_classes_scored"] == 0
    assert set(extra["report_files"]) == {"report.md", "predicted_classes.csv", "predicted_classes.png",
                                          "least_confident.jpg", "report.html", "report_files"}
    counts = read_csv(out / "predicted_classes.csv")
    assert [(r["predicted_name"], r["count"]) for r in counts] == [("dog", "4"), ("cat", "2"), ("fox", "1")]
    report = (out / "report.md").read_text()
    assert "unavailable: the dataset has no labels" in report
    assert "| dog | 4 | 57.14% |" in report
    with Image.open(out / "least_confident.jpg") as sheet:
        # 7 tiles: 6 columns, 2 rows; the least confident (p4, 0.35) first.
        assert sheet.size == (6 * CELL[0], 2 * CELL[1])
        assert close(cell_centre(sheet.convert("RGB"), 0, 6), (200, 0, 200))


def test_hugging_face_images(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    import io

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 24), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    folder = tmp_path / "hf"
    datasets.Dataset.from_dict(
        {"image": [{"bytes": png((250, 0, 0)), "path": None}, {"bytes": png((0, 0, 250)), "path": None}],
         "label": [0, 1]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=["cat", "dog"])}),
    ).save_to_disk(str(folder))
    # Row 1 (blue) is a confident mistake, row 0 (red) right.
    rows = [{"id": "0", "label": 0, "top1": 0, "confidence": 0.6},
            {"id": "1", "label": 1, "top1": 0, "confidence": 0.9}]
    out = make_output(tmp_path / "out", rows, classes=["cat", "dog"], model=ANIMAL_MODEL,
                      model_names=ANIMALS, data={"path": str(folder)}, kind="hf", top_k=3)
    extra = write_report(out)
    assert "mistakes.jpg" in extra["report_files"]
    with Image.open(out / "mistakes.jpg") as sheet:
        assert sheet.size == CELL
        assert close(cell_centre(sheet.convert("RGB"), 0, 1), (0, 0, 250))
