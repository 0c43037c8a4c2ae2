"""aggregate, report and compare over many unit files read in small record batches, checked
against a brute-force computation over all rows."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch_classify.core.layout import unit_path
from batch_classify.core.text import write_json
from batch_classify.output import units
from batch_classify.output.writer import UNIT_STATS_KEY, read_unit_stats, write_unit
from batch_classify.results import aggregate as aggregate_module
from batch_classify.results import compare as compare_module
from batch_classify.results.aggregate import AggregateError, aggregate
from batch_classify.results.compare import compare
from batch_classify.results.report import page as report
from batch_classify.results.report import thumbnails
from batch_classify.results.report.scan import SHEET_MAX

NAMES = ["cat", "dog", "fox", "owl", "eel", "yak"]
MODEL = {"name": "tiny/six", "num_labels": 6, "label_space": "6 outputs: the model's own classes"}
SIZES = [37, 5, 61, 12, 48, 1, 29]
"""Rows in each of 7 units: uneven, most longer than one record batch."""
BATCH = 8
COLUMNS = ("id", "label", "target", "topk_ids", "topk_labels", "topk_scores", "error")
TIED = [0.25, 0.5, 0.75, 0.875]
"""Exact in float32; drawn often so that rankings have ties across batches and units."""


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(units, "BATCH_ROWS", BATCH)

    def refuse(*_args, **_kwargs):
        raise AssertionError("read_predictions loads every row: aggregate, report, compare must not call it")

    monkeypatch.setattr(aggregate_module, "read_predictions", refuse)


def random_row(rng: random.Random, item_id: str, labelled: bool = True, names=NAMES, top_k: int = 5) -> dict:
    label = rng.randrange(len(NAMES)) if labelled and rng.random() > 0.15 else None
    target = label if rng.random() > 0.1 else None  # labels the model cannot map
    failed = rng.random() < 0.08
    error = rng.choice(["OSError: truncated", "UnidentifiedImageError: what"]) if failed else None
    ids, scores = [], []
    if error is None:
        ids = rng.sample(range(len(NAMES)), top_k)
        if label is not None and rng.random() < 0.5 and label in ids:
            ids.remove(label)
            ids.insert(0, label)
        first = rng.choice(TIED) if rng.random() < 0.6 else float(np.float32(rng.random()))
        scores = [first, *(float(np.float32(rng.random() * (1 - first))) for _ in ids[1:])]
    return {"id": item_id, "label": label, "target": target, "topk_ids": ids,
            "topk_labels": [names[i] for i in ids], "topk_scores": scores, "error": error}


def random_units(seed: int, sizes=SIZES, labelled: bool = True, names=NAMES) -> list[list[dict]]:
    rng = random.Random(seed)
    n = 0
    result = []
    for size in sizes:
        result.append([random_row(rng, f"class{n % 3}/img{n:04d}.png", labelled, names)
                       for n in range(n, n + size)])
        n += size
    return result


def write_output(folder: Path, unit_rows: list[list[dict]], *, n_items="count", n_units="count",
                 unit_size: int = 64, fingerprint: str = "f" * 64) -> Path:
    for unit, rows in enumerate(unit_rows):
        write_unit(folder, unit, {key: [row[key] for row in rows] for key in COLUMNS}, {"model": MODEL})
    count = sum(map(len, unit_rows))
    dataset = {"path": str(folder / "no-images"), "kind": "images", "classes": NAMES,
               "fingerprint": fingerprint, "n_items": count if n_items == "count" else n_items}
    if n_units is not None:
        dataset["n_units"] = len(unit_rows) if n_units == "count" else n_units
    write_json(folder / "manifest.json", {
        "dataset": dataset, "model": MODEL, "job": {"top_k": 5, "unit_size": unit_size},
        "config": {"data": {"path": dataset["path"]}}})
    return folder


def all_rows(unit_rows: list[list[dict]]) -> list[dict]:
    return [{**row, "unit": unit, "row": i}
            for unit, rows in enumerate(unit_rows) for i, row in enumerate(rows)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- brute force over all rows


def decoded(row: dict) -> bool:
    return row["error"] is None and bool(row["topk_ids"])


def brute_metrics(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["error"] is None and r["target"] is not None and r["topk_ids"]]
    errors = Counter(r["error"].split(":")[0] for r in rows if r["error"] is not None)
    return {"n": len(rows), "n_errors": sum(errors.values()), "errors_by_type": dict(sorted(errors.items())),
            "n_labelled": sum(r["label"] is not None for r in rows), "n_scored": len(scored),
            "top1": sum(r["topk_ids"][0] == r["target"] for r in scored) / len(scored),
            "top5": sum(r["target"] in r["topk_ids"][:5] for r in scored) / len(scored)}


def report_scored(rows: list[dict]) -> list[dict]:
    return [r for r in rows if decoded(r) and r["label"] is not None and r["target"] is not None]


def brute_ece(rows: list[dict]) -> float:
    edges = np.linspace(0.0, 1.0, 16)[1:-1]
    count, right, confidence = [0] * 15, [0.0] * 15, [0.0] * 15
    for r in report_scored(rows):  # row after row, in unit then row order
        which = sum(edge < r["topk_scores"][0] for edge in edges)
        count[which] += 1
        right[which] += float(r["topk_ids"][0] == r["target"])
        confidence[which] += r["topk_scores"][0]
    return float(np.abs(np.array(right) - np.array(confidence)).sum() / sum(count))


def brute_per_class(rows: list[dict]) -> list[tuple[int, int, float, float]]:
    by_class: dict[int, list[dict]] = {}
    for r in report_scored(rows):
        by_class.setdefault(r["label"], []).append(r)
    return [(label, len(group), sum(r["topk_ids"][0] == r["target"] for r in group) / len(group),
             sum(r["target"] in r["topk_ids"][:5] for r in group) / len(group))
            for label, group in sorted(by_class.items())]


def brute_confusions(rows: list[dict]) -> list[tuple[int, int, int]]:
    pairs = Counter((r["label"], r["topk_ids"][0])
                    for r in report_scored(rows) if r["topk_ids"][0] != r["target"])
    return sorted(((t, p, n) for (t, p), n in pairs.items()), key=lambda x: (-x[2], x[0], x[1]))[:20]


@pytest.fixture
def sheets(monkeypatch) -> dict[str, list[tuple[int, str]]]:
    """(unit, id) of every contact-sheet tile, by sheet file name."""
    drawn: dict[str, list[tuple[int, str]]] = {}
    original = report.contact_sheet

    def record(tiles, opener, path):
        drawn[path.name] = [(tile.unit, tile.item_id) for tile in tiles]
        return original(tiles, opener, path)

    monkeypatch.setattr(report, "contact_sheet", record)
    return drawn


# ---------------------------------------------------------------- aggregate and report


def test_many_units_equal_brute_force(tmp_path: Path, sheets):
    unit_rows = random_units(seed=1)
    rows = all_rows(unit_rows)
    out = write_output(tmp_path / "out", unit_rows)
    metrics = aggregate(out)

    for key, value in brute_metrics(rows).items():
        assert metrics[key] == value, key
    assert metrics["ece"] == brute_ece(rows)
    expected_classes = brute_per_class(rows)
    per_class = read_csv(out / "per_class.csv")
    assert [(int(r["class_index"]), int(r["n"]), float(r["top1"]), float(r["top5"])) for r in per_class] == \
        expected_classes
    assert metrics["macro_top1"] == float(np.mean([top1 for _, _, top1, _ in expected_classes]))
    confusions = read_csv(out / "confusions.csv")
    assert [(int(r["true_index"]), int(r["predicted_index"]), int(r["count"])) for r in confusions] == \
        brute_confusions(rows)
    assert [r["predicted_name"] for r in confusions] == [NAMES[p] for _, p, _ in brute_confusions(rows)]

    mistakes = [r for r in report_scored(rows) if r["topk_ids"][0] != r["target"]]
    ranked = sorted(mistakes, key=lambda r: (-r["topk_scores"][0], r["unit"], r["row"]))[: SHEET_MAX]
    assert sheets["mistakes.jpg"] == [(r["unit"], r["id"]) for r in ranked]
    # The ranking crosses ties: several of the shown rows share a confidence.
    assert len({r["topk_scores"][0] for r in ranked}) < len(ranked)


def test_labelling_mode_equal_brute_force(tmp_path: Path, sheets):
    unit_rows = random_units(seed=2, labelled=False)
    rows = all_rows(unit_rows)
    out = write_output(tmp_path / "out", unit_rows)
    metrics = aggregate(out)
    assert metrics["top1"] is None and metrics["ece"] is None

    counts = Counter(r["topk_ids"][0] for r in rows if decoded(r))
    predicted = read_csv(out / "predicted_classes.csv")
    assert [(int(r["predicted_index"]), r["predicted_name"], int(r["count"])) for r in predicted] == [
        (p, NAMES[p], n) for p, n in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]
    least = sorted((r for r in rows if decoded(r)), key=lambda r: (r["topk_scores"][0], r["unit"], r["row"]))
    assert sheets["least_confident.jpg"] == [(r["unit"], r["id"]) for r in least[: SHEET_MAX]]


def test_calibration_sums_row_by_row(tmp_path: Path):
    # 0.0625 then 15 rows at 2**-58: added one by one each tiny term is lost to rounding (a
    # quarter of 0.0625's ulp); summed per batch of 8 first, eight of them make 2 ulps and stay.
    # The ECE must be the one of a single pass in row order, whatever the batches.
    confidences = [0.0625] + [2.0**-58] * 15
    rows = [{"id": f"r{i}", "label": 0, "target": 0, "topk_ids": [1, 0, 2, 3, 4],
             "topk_labels": [NAMES[c] for c in (1, 0, 2, 3, 4)], "topk_scores": [c, 0.0, 0.0, 0.0, 0.0],
             "error": None} for i, c in enumerate(confidences)]
    metrics = aggregate(write_output(tmp_path / "out", [rows]))
    assert metrics["ece"] == brute_ece(all_rows([rows])) == 0.0625 / 16


def test_report_does_not_depend_on_batch_size(tmp_path: Path, monkeypatch):
    out = write_output(tmp_path / "out", random_units(seed=3))
    files = ("report.md", "per_class.csv", "confusions.csv", "per_class.png")
    aggregate(out)
    small = {name: (out / name).read_bytes() for name in files}
    monkeypatch.setattr(units, "BATCH_ROWS", 10_000)
    aggregate(out)
    assert {name: (out / name).read_bytes() for name in files} == small


def test_pictures_are_read_with_their_units_once(tmp_path: Path, monkeypatch):
    unit_rows = random_units(seed=4)
    out = write_output(tmp_path / "out", unit_rows)
    unit_of_id = {row["id"]: unit for unit, rows in enumerate(unit_rows) for row in rows}
    asked = []

    def read_back(manifest, output_dir, wanted, use):
        assert Path(output_dir) == out
        wanted = sorted(wanted)
        asked.extend(wanted)
        for unit, item_id in wanted:
            use(unit, item_id, Image.new("RGB", (8, 8)))
        return thumbnails.Reading(opened=set(wanted))

    monkeypatch.setattr(thumbnails, "read_back", read_back)
    drawn = {}

    def sheet(tiles, opener, path):
        drawn[path.name] = [opener(tile.unit, tile.item_id) for tile in tiles]
        return len(tiles)

    monkeypatch.setattr(report, "contact_sheet", sheet)
    report.write_report(out)
    assert len(drawn["mistakes.jpg"]) == SHEET_MAX  # every tile found among what was read back
    assert len(asked) == len(set(asked)) > SHEET_MAX  # the page's pictures too, each asked for once
    assert all(unit_of_id[item_id] == unit for unit, item_id in asked)


def test_missing_units_are_named(tmp_path: Path):
    out = write_output(tmp_path / "out", random_units(seed=5))
    for unit in (3, 5):
        unit_path(out, unit).unlink()
    with pytest.raises(AggregateError, match=r"2 of 7 units have no committed file \(units 3, 5\); run"):
        aggregate(out)

    # Item count not known (WebDataset tars): units are still checked.
    unknown = write_output(tmp_path / "unknown", random_units(seed=5), n_items=None)
    unit_path(unknown, 0).unlink()
    with pytest.raises(AggregateError, match=r"1 of 7 units have no committed file \(units 0\)") as caught:
        aggregate(unknown)
    assert "prediction rows" not in str(caught.value)

    many = write_output(tmp_path / "many", random_units(seed=5), n_items=None, n_units=20)
    with pytest.raises(AggregateError, match=r"13 of 20 units .*units 7, 8, .*, 16 \.\.\. and 3 more\)"):
        aggregate(many)


def test_units_derived_from_item_count_without_n_units(tmp_path: Path):
    # Older manifests: n_units from n_items and unit_size. 193 items in units of 64: 4 units.
    sizes = [64, 64, 64, 1]
    out = write_output(tmp_path / "out", random_units(seed=6, sizes=sizes), n_units=None, unit_size=64)
    assert aggregate(out)["n"] == 193
    unit_path(out, 3).unlink()
    with pytest.raises(AggregateError, match=r"192 prediction rows but the manifest lists 193 items; "
                                             r"1 of 4 units have no committed file \(units 3\)"):
        aggregate(out)


def test_row_count_must_match_items(tmp_path: Path):
    out = write_output(tmp_path / "out", random_units(seed=7), n_items=sum(SIZES) + 1)
    with pytest.raises(AggregateError, match="193 prediction rows but the manifest lists 194 items"):
        aggregate(out)


def test_duplicate_id_within_a_unit_is_refused(tmp_path: Path):
    unit_rows = random_units(seed=8)
    unit_rows[2][40] = {**unit_rows[2][40], "id": unit_rows[2][3]["id"]}
    out = write_output(tmp_path / "out", unit_rows)
    with pytest.raises(AggregateError, match=rf"id '{unit_rows[2][3]['id']}' appears 2 times in unit 2 "):
        aggregate(out)


def test_ids_within_units_are_checked_from_the_footers(tmp_path: Path, monkeypatch):
    out = write_output(tmp_path / "out", random_units(seed=12))
    read = []
    real_read_table = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, *a, **k: read.append(
        (Path(path).name, k.get("columns"))) or real_read_table(path, *a, **k))
    aggregate(out)
    assert not [name for name, columns in read if columns == ["id"]], read  # no second read of the ids


def test_copied_or_stray_unit_files_are_refused(tmp_path: Path):
    out = write_output(tmp_path / "out", random_units(seed=9))
    copy = unit_path(out, 7)
    copy.write_bytes(unit_path(out, 4).read_bytes())
    with pytest.raises(AggregateError, match="appear more than once: unit-000004.parquet and unit-000007"):
        aggregate(out)
    unit_path(out, 4).rename(unit_path(out, 8))  # a renamed file, and 4 is missing
    copy.unlink()
    with pytest.raises(AggregateError, match="unit-000008.parquet holds the rows of unit 4"):
        aggregate(out)


def test_files_without_footer_counts_still_aggregate(tmp_path: Path):
    unit_rows = random_units(seed=10)
    out = write_output(tmp_path / "out", unit_rows)
    expected = aggregate(out)
    for unit in (0, 2, 6):  # as written before units carried their counts
        path = unit_path(out, unit)
        footer = read_unit_stats(path)
        table = pq.read_table(path)
        metadata = {k: v for k, v in table.schema.metadata.items() if k != UNIT_STATS_KEY.encode()}
        pq.write_table(table.replace_schema_metadata(metadata), path)
        assert read_unit_stats(path) is None
        # every count but the distinct ids, which only a footer carries (a scan holds one batch)
        assert units.file_stats(path) == {k: v for k, v in footer.items() if k not in {"unit", "n_distinct"}}
    metrics = aggregate(out)
    for key in ("n", "n_errors", "errors_by_type", "n_labelled", "n_scored", "top1", "top5", "ece",
                "macro_top1"):
        assert metrics[key] == expected[key], key


def test_real_labels_stream_over_units(tmp_path: Path):
    unit_rows = random_units(seed=11)
    for n, row in enumerate(row for rows in unit_rows for row in rows):
        row["id"] = f"val/ILSVRC2012_val_{n + 1:08d}.JPEG"
    rng = random.Random(0)
    real = [sorted(rng.sample(range(6), rng.randrange(0, 3))) for _ in range(sum(SIZES))]
    (tmp_path / "real.json").write_text(json.dumps(real))
    out = write_output(tmp_path / "out", unit_rows)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["data"]["real_labels"] = str(tmp_path / "real.json")
    write_json(out / "manifest.json", manifest)
    metrics = aggregate(out)

    rows = [r for r in all_rows(unit_rows) if r["error"] is None]
    judged = [(r["topk_ids"], set(real[int(r["id"][-13:-5]) - 1])) for r in rows]
    judged = [(ids, labels) for ids, labels in judged if labels]
    n = len(judged)
    assert metrics["n_real"] == n
    assert metrics["real_top1"] == sum(ids[0] in labels for ids, labels in judged) / n
    assert metrics["real_top5"] == sum(any(i in labels for i in ids[:5]) for ids, labels in judged) / n


# ---------------------------------------------------------------- compare


def brute_compare(a_units: list[list[dict]], b_units: list[list[dict]]) -> dict:
    """The comparison as the in-memory implementation computed it: dicts of rows by id."""
    def side(unit_rows):
        return {r["id"]: {"target": r["target"], "decoded": decoded(r),
                          "top1": r["topk_ids"][0] if decoded(r) else None,
                          "top1_name": r["topk_labels"][0] if decoded(r) and r["topk_labels"] else None}
                for rows in unit_rows for r in rows}

    a, b = side(a_units), side(b_units)
    seen = {r["top1"]: r["top1_name"] for s in (b, a) for r in s.values()
            if r["top1"] is not None and r["top1_name"]}
    both = [i for i in a if i in b and a[i]["decoded"] and b[i]["decoded"]]
    keys = [a[i]["target"] if a[i]["target"] is not None else a[i]["top1"] for i in both]
    n, differ = Counter(keys), Counter(k for k, i in zip(keys, both) if a[i]["top1"] != b[i]["top1"])
    classes = sorted(({"class_index": k, "name": seen.get(k, f"class {k}"), "n": n[k], "n_differ": d,
                       "rate": d / n[k]} for k, d in differ.items()),
                     key=lambda c: (-c["n_differ"], -c["rate"], c["class_index"]))[:10]
    labelled = [i for i in both if a[i]["target"] is not None and b[i]["target"] is not None]
    right_a = [a[i]["top1"] == a[i]["target"] for i in labelled]
    right_b = [b[i]["top1"] == b[i]["target"] for i in labelled]
    agree = sum(a[i]["top1"] == b[i]["top1"] for i in both)
    common = sum(i in b for i in a)
    return {"n_a": len(a), "n_b": len(b), "n_common": common, "n_both_decoded": len(both), "n_agree": agree,
            "agreement": agree / len(both), "classes": classes,
            "labelled": {"n": len(labelled), "top1_a": sum(right_a) / len(labelled),
                         "top1_b": sum(right_b) / len(labelled),
                         "only_a_right": sum(x and not y for x, y in zip(right_a, right_b)),
                         "only_b_right": sum(y and not x for x, y in zip(right_a, right_b))}}


def check_against_brute_force(result: dict, expected: dict) -> None:
    assert (result["a"]["n"], result["b"]["n"]) == (expected["n_a"], expected["n_b"])
    assert result["n_only_a"] == expected["n_a"] - expected["n_common"]
    assert result["n_only_b"] == expected["n_b"] - expected["n_common"]
    for key in ("n_common", "n_both_decoded", "n_agree", "agreement", "classes", "labelled"):
        assert result[key] == expected[key], key


@pytest.fixture
def two_runs() -> tuple[list[list[dict]], list[list[dict]]]:
    """The same items in the same units, predicted twice; B names two classes its own way, some
    of its units lack rows (errors and ids only in A), and it has one id A lacks."""
    a_units = random_units(seed=12)
    b_units = random_units(seed=13, names=["cat", "dog", "renard", "owl", "", "yak"])
    b_units[1] = b_units[1][:2]
    b_units[4] = b_units[4][5:] + [random_row(random.Random(1), "extra/only-b.png")]
    return a_units, b_units


def test_compare_joins_unit_by_unit_where_the_ids_match(tmp_path: Path, two_runs, monkeypatch):
    a_units, b_units = two_runs
    a, b = write_output(tmp_path / "a", a_units), write_output(tmp_path / "b", b_units)
    by_bucket = []
    original = compare_module.join_by_bucket

    def spy(a_side, b_side, units_a, units_b, tally):
        by_bucket.append((units_a, units_b))
        return original(a_side, b_side, units_a, units_b, tally)

    monkeypatch.setattr(compare_module, "join_by_bucket", spy)
    result = compare(a, b)
    assert by_bucket == [([1, 4], [1, 4])]  # B's units 1 and 4 hold other ids: only they are hashed
    expected = brute_compare(a_units, b_units)
    check_against_brute_force(result, expected)
    assert result["n_only_a"] > 0 and result["n_only_b"] == 1
    names = {c["class_index"]: c["name"] for c in result["classes"]}
    assert names.get(2, "fox") == "fox" and names.get(4, "eel") == "eel"  # A's names come first


def test_compare_different_units_joins_by_bucket(tmp_path: Path, two_runs, monkeypatch):
    a_units, b_units = two_runs
    flat_b = [row for rows in b_units for row in rows]
    regrouped = [flat_b[start:start + 50] for start in range(0, len(flat_b), 50)]
    a = write_output(tmp_path / "a", a_units)
    b = write_output(tmp_path / "b", regrouped, unit_size=50)
    partitioned = []
    original = compare_module._partition

    def spy(side, units, folder, buckets):
        partitioned.append(buckets)
        return original(side, units, folder, buckets)

    monkeypatch.setattr(compare_module, "BUCKET_ROWS", 40)
    monkeypatch.setattr(compare_module, "_partition", spy)
    by_bucket = compare(a, b)
    assert partitioned == [5, 5]  # 193 rows in buckets of about 40
    check_against_brute_force(by_bucket, brute_compare(a_units, regrouped))

    # The same rows in the same units give the same comparison by either path.
    same_layout = write_output(tmp_path / "b2", b_units)
    by_unit = compare(a, same_layout)
    monkeypatch.setattr(compare_module, "paired_units", lambda *_: [])
    assert compare(a, same_layout) == by_unit
    by_unit["b"]["dir"] = by_bucket["b"]["dir"]
    assert by_unit == by_bucket


def test_compare_names_classes_as_before(tmp_path: Path, monkeypatch):
    # Class 5 is a target in A but never A's top-1: its name is B's, the last non-empty one
    # (B's later rows name it ''); class 3 nobody predicts: 'class 3'.
    def row(item_id, target, top1, name):
        ids = [top1, *(c for c in range(5) if c != top1)][:5]
        return {"id": item_id, "label": target, "target": target, "topk_ids": ids,
                "topk_labels": [name, *["x"] * (len(ids) - 1)], "topk_scores": [0.5] * len(ids),
                "error": None}

    a_rows = [row(f"i{n}", 5, 0, "zero") for n in range(12)] + [row(f"j{n}", 3, 1, "one") for n in range(3)]
    b_rows = ([row(f"i{n}", 5, 5, "yak-b") for n in range(4)] + [row(f"i{n}", 5, 5, "") for n in range(4, 12)]
              + [row(f"j{n}", 3, 0, "zero-b") for n in range(3)])
    a = write_output(tmp_path / "a", [a_rows[:9], a_rows[9:]])
    b = write_output(tmp_path / "b", [b_rows[:9], b_rows[9:]])
    by_unit = compare(a, b)
    assert [(c["class_index"], c["name"], c["n_differ"]) for c in by_unit["classes"]] == [
        (5, "yak-b", 12), (3, "class 3", 3)]
    monkeypatch.setattr(compare_module, "paired_units", lambda *_: [])
    assert compare(a, b) == by_unit
