"""Label spaces: ImageNet-1k identity, the 1001-class background offset, names, and refusals."""

from __future__ import annotations

import json

import pytest
from conftest import read_rows, run_job

from batch_classify.labels import (
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
    assert labels.first_logit == 1 and labels.imagenet and len(labels.names) == 1000
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


def test_parse_imagenet_label():
    assert parse_imagenet_label("n01440764", "x") == 0 and parse_imagenet_label(" 999 ", "x") == 999
    with pytest.raises(ValueError, match="where"):
        parse_imagenet_label("-1", "where")


def test_unmappable_model_still_writes_predictions(tmp_path, corpus):
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification, MobileNetV1ImageProcessor

    model_dir = tmp_path / "three-classes"
    config = MobileNetV1Config(image_size=32, depth_multiplier=0.25, initializer_range=0.3,
                               id2label={0: "red", 1: "green", 2: "blue"})
    MobileNetV1ForImageClassification(config).save_pretrained(model_dir)
    MobileNetV1ImageProcessor(size={"shortest_edge": 36},
                              crop_size={"height": 32, "width": 32}).save_pretrained(model_dir)
    out = tmp_path / "out"
    run_job(["--model.name", str(model_dir), "--data.path", str(corpus), "--output.dir", str(out)])
    rows = read_rows(out)
    assert len(rows) == 11
    assert all(set(r["topk_labels"]) == {"red", "green", "blue"} for r in rows.values())
    assert all(r["label"] is not None and r["target"] is None for r in rows.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] is None
    assert "do not map onto it" in metrics["accuracy_unavailable"]
