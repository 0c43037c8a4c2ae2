"""Zero-shot labels with tiny CLIP and SigLIP models: the job against transformers' pipeline."""

from __future__ import annotations

import json

import pytest
from conftest import read_rows, run_job
from PIL import Image
from tiny_models import save_tiny_clip, save_tiny_siglip
from transformers import pipeline

from batch_classify.core.labels import imagenet_classes
from batch_classify.models.zero_shot import (
    ZeroShotError,
    resolve_classes,
    resolve_templates,
    zero_shot_labels,
)

CLASSES = ["tench", "tabby cat", "warplane", "dog", "tree"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def dual_encoders(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("dual")
    return {"clip": save_tiny_clip(base / "clip"), "siglip": save_tiny_siglip(base / "siglip")}


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_top_k_and_scores_equal_the_pipeline_on_two_ranks(name, dual_encoders, corpus, tmp_path):
    out = tmp_path / "out"
    # The processor's own pixels on both sides: the comparison is then of the scoring alone.
    run_job(["--model.name", str(dual_encoders[name]), "--data.path", str(corpus), "--output.dir", str(out),
             "--model.classes", json.dumps(CLASSES), "--model.templates", TEMPLATE,
             "--output.top_k", "3", "--runtime.batch_size", "3", "--runtime.preprocess", "processor"],
            processes=2)
    rows = read_rows(out)
    assert len(rows) == 11
    classify = pipeline("zero-shot-image-classification", model=str(dual_encoders[name]), device="cpu")
    for item_id, row in rows.items():
        expected = classify(Image.open(corpus / item_id).convert("RGB"), candidate_labels=CLASSES,
                            hypothesis_template=TEMPLATE)[:3]
        assert row["topk_labels"] == [e["label"] for e in expected], item_id
        assert row["topk_ids"] == [CLASSES.index(e["label"]) for e in expected]
        assert row["topk_scores"] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    zero_shot = manifest["model"]["zero_shot"]
    assert zero_shot["n_classes"] == 5 and zero_shot["n_templates"] == 1
    assert zero_shot["scores"] == ("sigmoid" if name == "siglip" else "softmax")
    metrics = json.loads((out / "metrics.json").read_text())
    # ImageNet-labelled folders, the job's own classes: accuracy is unavailable, not wrong.
    assert metrics["top1"] is None and "classes of its own" in metrics["accuracy_unavailable"]


def test_imagenet_classes_with_the_80_templates_are_scored_by_index(dual_encoders, corpus, tmp_path):
    out = tmp_path / "out"
    run_job(["--model.name", str(dual_encoders["clip"]), "--data.path", str(corpus), "--output.dir", str(out),
             "--model.classes", "imagenet-1k", "--model.templates", "openai-imagenet"])
    rows = read_rows(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_scored"] == 11 and metrics["top1"] is not None and metrics["top5"] is not None
    names = resolve_classes("imagenet-1k", "m")
    for row in rows.values():
        assert all(0 <= i < 1000 for i in row["topk_ids"])
        assert row["topk_labels"] == [names[i] for i in row["topk_ids"]]
        assert sum(row["topk_scores"]) <= 1.0 + 1e-6


def test_class_and_template_sources(tmp_path):
    names = resolve_classes("imagenet-1k", "m")
    assert len(names) == 1000 and names[0] == "tench"
    assert names[657] == names[744] == "missile" and names[836] == names[837] == "sunglasses"
    labels = zero_shot_labels(names, from_imagenet=True)
    assert labels.imagenet and labels.ids == tuple(range(1000)) and len(imagenet_classes()[0]) == 1000
    assert len(resolve_templates("openai-imagenet")) == 80
    assert resolve_templates(None) == ["a photo of a {}."]
    (tmp_path / "classes.txt").write_text("cat\n\n# a comment\ndog\n")
    assert resolve_classes(str(tmp_path / "classes.txt"), "m") == ["cat", "dog"]
    (tmp_path / "templates.txt").write_text("a {}.\nart of a {}.\n")
    assert resolve_templates(str(tmp_path / "templates.txt")) == ["a {}.", "art of a {}."]
    with pytest.raises(ZeroShotError, match="model.classes"):
        resolve_classes(None, "openai/clip-vit-base-patch32")
    with pytest.raises(ZeroShotError, match="exactly one"):
        resolve_templates(["a photo"])


def test_classes_for_a_classifier_are_refused_without_a_traceback(tiny_models, corpus, tmp_path):
    result = run_job(["--model.name", str(tiny_models["beit"]), "--data.path", str(corpus),
                      "--output.dir", str(tmp_path / "out"), "--model.classes", "[cat, dog]"],
                     expect_ok=False)
    assert result.returncode == 2 and "CLIP-family" in result.stderr and "Traceback" not in result.stderr
