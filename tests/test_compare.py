"""Compare two hand-built output folders whose agreement is known."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch_classify.cli import main
from batch_classify.compare import compare, format_comparison
from batch_classify.manifest import write_json
from batch_classify.writer import write_unit

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
