"""Label spaces: ImageNet-1k identity, the 1001-class background offset, names, and refusals."""

from __future__ import annotations

import json

import pytest
from conftest import read_rows, run_job
from tiny_models import save_tiny_classifier

from batch_classify.core.labels import (
    class_subset,
    imagenet_classes,
    label_targets,
    model_labels,
    parse_imagenet_label,
    wnid_to_index,
)


def test_imagenet_table_is_the_sorted_wnid_order():
    wnids, names = imagenet_classes()
    assert len(wnids) == len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[999] == "n15075141"
    assert names[281].startswith("tabby") and wnid_to_index()["n02123045"] == 281


def test_background_first_1001_is_shifted():
    id2label = {0: "background", **{i + 1: name for i, name in enumerate(imagenet_classes()[1])}}
    labels = model_labels(id2label, 1001)
    assert labels.keep == tuple(range(1, 1001)) and labels.ids == tuple(range(1000))
    assert labels.imagenet and len(labels.names) == 1000
    assert labels.names[281].startswith("tabby")


def test_other_label_spaces():
    assert model_labels({}, 1000).imagenet
    assert not model_labels({0: "cat", 1: "dog"}, 2).imagenet
    # 1001 outputs without a background class are not ImageNet-1k.
    assert not model_labels({i: f"c{i}" for i in range(1001)}, 1001).imagenet


def test_named_dataset_classes_map_by_name_or_say_why_not():
    model = model_labels({0: "Dog", 1: "cat", 2: "bird"}, 3)
    assert label_targets(("cat", "dog"), model) == ([1, 0], None)
    targets, reason = label_targets(("cat", "zebra"), model)
    assert targets is None and "'zebra'" in reason
    targets, reason = label_targets(None, model)
    assert targets is None and "ImageNet-1k" in reason
    assert label_targets(None, model_labels({}, 1000)) == (list(range(1000)), None)


def test_a_model_whose_classes_are_imagenet_names_is_mapped_by_name():
    # Three ImageNet classes in the model's own order, named three different ways.
    labels = model_labels({0: "warplane, military plane", 1: "n01440764", 2: "tabby"}, 3)
    assert labels.imagenet and labels.ids == (wnid_to_index()["n04552348"], 0, 281)
    targets, reason = label_targets(None, labels)
    assert reason is None and targets[0] == 0 and targets[281] == 281 and targets[1] is None
    # An ambiguous name ('crane' is a bird and a machine) is not guessed.
    assert not model_labels({0: "crane", 1: "tabby"}, 2).imagenet


def test_class_subset_restricts_scoring():
    assert len(class_subset("imagenet-r")) == len(class_subset("imagenet-a")) == 200
    assert set(class_subset("imagenet-r")) != set(class_subset("imagenet-a"))
    subset = model_labels({}, 1000).restrict((5, 281, 7), "mine")
    assert subset.keep == subset.ids == (5, 7, 281) and "3 classes of mine" in subset.note
    background = model_labels({0: "background", **{i + 1: f"c{i}" for i in range(1000)}}, 1001)
    assert background.restrict((0, 999), "x").keep == (1, 1000)
    with pytest.raises(ValueError, match="ImageNet-1k outputs"):
        model_labels({0: "red", 1: "blue"}, 2).restrict((0,), "x")
    with pytest.raises(ValueError, match="not 'imagenet-a'"):
        class_subset("/no/such/file")


def test_parse_imagenet_label():
    assert parse_imagenet_label("n01440764", "x") == 0 and parse_imagenet_label(" 999 ", "x") == 999
    with pytest.raises(ValueError, match="where"):
        parse_imagenet_label("-1", "where")


def test_unmappable_model_still_writes_predictions(tmp_path, corpus):
    model_dir = save_tiny_classifier(tmp_path / "three-classes", {0: "red", 1: "green", 2: "blue"})
    out = tmp_path / "out"
    run_job(["--model.name", str(model_dir), "--data.path", str(corpus), "--output.dir", str(out)])
    rows = read_rows(out)
    assert len(rows) == 11
    assert all(set(r["topk_labels"]) == {"red", "green", "blue"} for r in rows.values())
    assert all(r["label"] is not None and r["target"] is None for r in rows.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] is None
    assert "do not map onto it" in metrics["accuracy_unavailable"]


def test_job_with_a_class_subset_file(tmp_path, tiny_models, corpus):
    wnids = sorted(p.name for p in corpus.iterdir())
    subset_file = tmp_path / "subset.txt"
    subset_file.write_text("# the corpus's classes\n" + "\n".join(wnids) + "\n")
    out = tmp_path / "out"
    run_job(["--model.name", str(tiny_models["mobilenet_v1"]), "--data.path", str(corpus),
             "--output.dir", str(out), "--data.class_subset", str(subset_file)])
    allowed = {wnid_to_index()[w] for w in wnids}
    rows = read_rows(out)
    assert all(set(r["topk_ids"]) == allowed for r in rows.values())  # top-k of 3 classes
    metrics = json.loads((out / "metrics.json").read_text())
    top1 = sum(r["topk_ids"][0] == r["label"] for r in rows.values()) / len(rows)
    assert metrics["top1"] == pytest.approx(top1) and metrics["top5"] is None
    assert "scored on the 3 classes" in metrics["model"]["label_space"]
    assert "scored on the 3 classes" in (out / "report.md").read_text()


def test_job_with_a_model_mapped_by_name(tmp_path, corpus):
    names = {0: "warplane, military plane", 1: "tabby, tabby cat", 2: "tench, Tinca tinca", 3: "goldfish"}
    model_dir = save_tiny_classifier(tmp_path / "four-classes", names)
    out = tmp_path / "out"
    run_job(["--model.name", str(model_dir), "--data.path", str(corpus), "--output.dir", str(out)])
    rows = read_rows(out)
    mapped = {wnid_to_index()["n04552348"], 281, 0, 1}
    assert all(set(r["topk_ids"]) == mapped and r["target"] == r["label"] for r in rows.values())
    metrics = json.loads((out / "metrics.json").read_text())
    top1 = sum(r["topk_ids"][0] == r["label"] for r in rows.values()) / len(rows)
    assert metrics["top1"] == pytest.approx(top1) and metrics["accuracy_unavailable"] is None
