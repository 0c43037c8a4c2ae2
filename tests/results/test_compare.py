"""Compare two hand-built output folders whose agreement is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import _photo, run_job

from batch_classify.commands.cli import main
from batch_classify.core.text import write_json
from batch_classify.output.writer import write_unit
from batch_classify.results import compare as compare_module
from batch_classify.results.compare import compare, format_comparison

NAMES = ["cat", "dog", "fox"]
TARGETS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
TOP1_A = [0, 0, 1, 1, 1, 1, 2, 2, 0, 2]
TOP1_B = [0, 1, 1, 0, 1, 1, 2, 2, 2, 2]
# B fails on r9, so rows r0-r8 are decoded in both. They agree on r0, r2, r4, r5, r6, r7 (6 of 9)
# and differ on r1, r3 (target cat) and r8 (target fox). On those 9 rows A is right on r0, r1, r4,
# r5, r7 (5) and B on r0, r3, r4, r5, r7, r8 (6): only A right on r1, only B right on r3 and r8.


def make_output(folder: Path, rows: list[tuple], model: str) -> Path:
    """rows: (id, target or None, top-1 or None for an error row)."""
    columns: dict[str, list] = {key: [] for key in
                                ("id", "label", "target", "topk_ids", "topk_labels", "topk_scores", "error")}
    for item, target, top1 in rows:
        ids = [] if top1 is None else [top1, *[c for c in range(3) if c != top1]]
        columns["id"].append(item)
        columns["label"].append(target)
        columns["target"].append(target)
        columns["topk_ids"].append(ids)
        columns["topk_labels"].append([NAMES[i] for i in ids])
        columns["topk_scores"].append([0.7, 0.2, 0.1][: len(ids)])
        columns["error"].append("OSError: truncated" if top1 is None else None)
    write_unit(folder, 0, columns, {})
    write_json(folder / "manifest.json", {
        "dataset": {"path": "/data/animals", "kind": "imagefolder", "n_items": len(rows), "classes": NAMES,
                    "fingerprint": "same"},
        "model": {"name": model, "num_labels": 3, "label_space": "3 outputs: the model's own classes"},
    })
    return folder


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    rows_a = [(f"r{i}", t, p) for i, (t, p) in enumerate(zip(TARGETS, TOP1_A))] + [("only-a", 0, 0)]
    rows_b = [(f"r{i}", t, p) for i, (t, p) in enumerate(zip(TARGETS, TOP1_B))]
    rows_b[9] = ("r9", 2, None)
    rows_b += [("only-b1", 1, 1), ("only-b2", 2, 0)]
    return make_output(tmp_path / "a", rows_a, "model-a"), make_output(tmp_path / "b", rows_b, "model-b")


def test_compare_labelled(pair):
    result = compare(*pair)
    assert (result["n_common"], result["n_only_a"], result["n_only_b"]) == (10, 1, 2)
    assert result["n_both_decoded"] == 9
    assert result["n_agree"] == 6
    assert result["agreement"] == pytest.approx(6 / 9)
    assert result["same_dataset"] is True
    assert result["classes_by"] == "target"
    assert [(c["name"], c["n"], c["n_differ"]) for c in result["classes"]] == [("cat", 4, 2), ("fox", 2, 1)]
    assert result["classes"][0]["rate"] == pytest.approx(0.5)
    labelled = result["labelled"]
    assert labelled["n"] == 9
    assert labelled["top1_a"] == pytest.approx(5 / 9)
    assert labelled["top1_b"] == pytest.approx(6 / 9)
    assert (labelled["only_a_right"], labelled["only_b_right"]) == (1, 2)

    text = format_comparison(result)
    assert "66.67%  (6 of 9)" in text
    assert "only in A: 1, only in B: 2" in text
    assert "A 55.56%   B 66.67%" in text
    assert "model-a" in text and "model-b" in text


def test_compare_unlabelled(tmp_path: Path):
    # No targets: classes are A's top-1. A says cat, cat, dog, dog, fox; B disagrees on the
    # second cat and both dogs.
    a = make_output(tmp_path / "a", [(f"x{i}", None, p) for i, p in enumerate([0, 0, 1, 1, 2])], "a")
    b = make_output(tmp_path / "b", [(f"x{i}", None, p) for i, p in enumerate([0, 2, 0, 2, 2])], "b")
    result = compare(a, b)
    assert result["agreement"] == pytest.approx(2 / 5)
    assert result["labelled"] is None
    assert result["classes_by"] == "top-1 of A"
    assert [(c["name"], c["n"], c["n_differ"]) for c in result["classes"]] == [("dog", 2, 2), ("cat", 2, 1)]
    assert "top-1 accuracy" not in format_comparison(result)


def test_cli_compare(pair, tmp_path: Path, capsys):
    assert main(["compare", str(pair[0]), str(pair[1])]) == 0
    assert "top-1 agreement   66.67%" in capsys.readouterr().out

    (tmp_path / "empty").mkdir()
    assert main(["compare", str(pair[0]), str(tmp_path / "empty")]) == 1
    error = capsys.readouterr().err
    assert "is not a batch-classify output folder" in error and "empty" in error
    assert main(["compare", str(tmp_path / "missing"), str(pair[1])]) == 1
    assert "is not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------- the join: by unit only where the ids match


def write_units(folder: Path, units: list[list[int]], top1, unit_size: int = 4) -> Path:
    """Units of ids 'i<n>' (target n % 3, top-1 ``top1(n)``); the manifest says the same dataset,
    unit count and unit size whatever the units hold, as two runs of one folder would."""
    for unit, items in enumerate(units):
        ids = [[top1(n), *[c for c in range(3) if c != top1(n)]] for n in items]
        write_unit(folder, unit, {
            "id": [f"i{n}" for n in items], "label": [n % 3 for n in items], "target": [n % 3 for n in items],
            "topk_ids": ids, "topk_labels": [[NAMES[c] for c in row] for row in ids],
            "topk_scores": [[0.7, 0.2, 0.1]] * len(items), "error": [None] * len(items)}, {})
    write_json(folder / "manifest.json", {
        "dataset": {"path": "/data/flat", "kind": "images", "n_items": sum(map(len, units)),
                    "n_units": len(units), "classes": NAMES, "fingerprint": "same"},
        "model": {"name": folder.name, "num_labels": 3}, "job": {"unit_size": unit_size}})
    return folder


def expected(units_a: list[list[int]], units_b: list[list[int]], top1_a, top1_b) -> dict:
    a = {n for unit in units_a for n in unit}
    b = {n for unit in units_b for n in unit}
    common = a & b
    return {"n_common": len(common), "n_only_a": len(a - common), "n_only_b": len(b - common),
            "n_agree": sum(top1_a(n) == top1_b(n) for n in common)}


def top1_a(n: int) -> int:
    return n % 3


def top1_b(n: int) -> int:
    return n % 3 if n % 4 else (n + 1) % 3


@pytest.fixture
def joins(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """The units each comparison hash-joins (A's, B's)."""
    calls = []
    original = compare_module.join_by_bucket

    def spy(a, b, units_a, units_b, tally):
        calls.append((units_a, units_b))
        return original(a, b, units_a, units_b, tally)

    monkeypatch.setattr(compare_module, "join_by_bucket", spy)
    return calls


CASES = {
    # labels CSVs listing the same rows in other orders: the same fingerprint, unit count and unit
    # size, but unit u holds other ids on each side
    "same_rows_other_order": ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
                              [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]], [0, 1, 2]),
    # reversed: B's unit u holds A's unit 2 - u, which the digests pair across unit numbers
    "reversed": ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
                 [[11, 10, 9, 8], [7, 6, 5, 4], [3, 2, 1, 0]], []),
    "shuffled": ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
                 [[5, 0, 11, 2], [9, 4, 1, 7], [3, 8, 6, 10]], [0, 1, 2]),
    "other_unit_sizes": ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
                         [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]], [0, 1, 2]),
    # B's unit 0 holds A's unit 2 (in another order): joined as a pair; id 5 is in both elsewhere
    "partial_overlap": ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
                        [[11, 10, 9, 8], [12, 13, 5, 14], [15, 16]], [0, 1]),
    "same_units": ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
                   [[3, 2, 1, 0], [4, 5, 6, 7], [8, 9, 10, 11]], []),
}


@pytest.mark.parametrize("case", CASES)
def test_compare_joins_every_common_id_whatever_the_units(tmp_path: Path, joins, monkeypatch, case):
    units_a, units_b, hashed_a = CASES[case]
    a = write_units(tmp_path / "a", units_a, top1_a)
    b = write_units(tmp_path / "b", units_b, top1_b, unit_size=len(units_b[0]))
    result = compare(a, b)
    want = expected(units_a, units_b, top1_a, top1_b)
    assert {key: result[key] for key in want} == want
    assert result["n_both_decoded"] == want["n_common"]
    if hashed_a:
        assert [units for units, _ in joins] == [hashed_a]
    else:
        assert joins == [([], [])]  # every unit paired: nothing hashed
    monkeypatch.setattr(compare_module, "paired_units", lambda *_: [])
    assert compare(a, b) == result  # the same figures as hashing every row


def test_a_damaged_unit_file_is_named_in_one_line(tmp_path: Path, capsys):
    a = write_units(tmp_path / "a", [[0, 1, 2, 3], [4, 5, 6, 7]], top1_a)
    b = write_units(tmp_path / "b", [[1, 2, 3, 4], [5, 6, 7, 0]], top1_b)
    path = b / "predictions" / "unit-000001.parquet"
    intact = path.read_bytes()
    path.write_bytes(intact[:200])
    assert main(["compare", str(a), str(b)]) == 1
    assert capsys.readouterr().err == (
        f"batch-classify compare: {b}: unit-000001.parquet: cut short: no PAR1 magic at its end (a truncated "
        "or partly written file); run the job again to redo unit 1 (it moves the file aside)\n")
    # a sound footer over a page that cannot be read: found when the rows are
    path.write_bytes(intact)
    metadata = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(intact)
    start = metadata.dictionary_page_offset or metadata.data_page_offset
    data[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    assert main(["compare", str(a), str(b)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"batch-classify compare: {b}: unit-000001.parquet: its rows cannot be read ")
    assert err.endswith("then run the job again to redo unit 1\n") and err.count("\n") == 1


# ---------------------------------------------------------------- two real runs of one flat folder


def test_two_runs_with_labels_csvs_in_other_orders_compare_every_id(tmp_path: Path, tiny_models, joins):
    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(7)
    wnids = ["n01440764", "n02123045", "n04552348"]
    rows = []
    for n in range(11):
        _photo(rng, (36 + 5 * n, 48)).save(folder / f"img{n:02d}.jpg", quality=90)
        rows.append(f"img{n:02d}.jpg,{wnids[n % 3]}")
    (tmp_path / "sorted.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "reversed.csv").write_text("filename,label\n" + "\n".join(rows[::-1]) + "\n")
    common = ["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(folder),
              "--output.unit_size", "3", "--runtime.batch_size", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_job([*common, "--data.labels", str(tmp_path / "sorted.csv"), "--output.dir", str(a)])
    run_job([*common, "--data.labels", str(tmp_path / "reversed.csv"), "--output.dir", str(b)], processes=2)
    manifest_a, manifest_b = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    # The same items (one digest), listed in other orders: other units, so other fingerprints.
    assert manifest_a["dataset"]["items_digest"] == manifest_b["dataset"]["items_digest"]
    assert manifest_a["dataset"]["fingerprint"] != manifest_b["dataset"]["fingerprint"]

    result = compare(a, b)
    assert result["same_dataset"] is True
    assert (result["n_common"], result["n_only_a"], result["n_only_b"]) == (11, 0, 0)
    assert result["n_agree"] == result["n_both_decoded"] == 11  # one model, the same images
    assert result["labelled"]["top1_a"] == result["labelled"]["top1_b"]
    assert joins == [([0, 1, 2, 3], [0, 1, 2, 3])]  # no unit holds the same ids in both
    assert compare(a, a)["n_common"] == 11 and joins[-1] == ([], [])  # a run with itself: by unit
