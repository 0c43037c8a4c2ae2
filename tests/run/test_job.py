"""End-to-end runs of the job on tiny checkpoints, with 1, 2 and 3 real processes."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_rows, run_job
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from batch_classify.core.labels import wnid_to_index


def snippet_top1(model_dir, image_path, background_first: bool) -> int:
    """The seed's snippet: processor(image) then model(**inputs).logits.argmax(-1)."""
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    image = Image.open(image_path).convert("RGB")
    inputs = processor(image, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    if background_first:  # ImageNet-1k class i is logit i+1
        return int(logits[0, 1:].argmax(-1))
    return int(logits.argmax(-1))


@pytest.mark.parametrize("name", ["beit", "mobilenet_v1", "efficientnet"])
def test_top1_matches_the_checkpoints_own_snippet(name, tiny_models, corpus, tmp_path):
    out = tmp_path / "out"
    run_job(["--model.name", str(tiny_models[name]), "--data.path", str(corpus),
             "--output.dir", str(out), "--runtime.batch_size", "4"])
    rows = read_rows(out)
    images = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.*"))
    assert sorted(rows) == images
    for item_id, row in rows.items():
        assert row["error"] is None
        expected = snippet_top1(tiny_models[name], corpus / item_id, name == "mobilenet_v1")
        assert row["topk_ids"][0] == expected, item_id
        assert row["label"] == wnid_to_index()[item_id.split("/")[0]]
        assert len(row["topk_ids"]) == len(row["topk_labels"]) == len(row["topk_scores"]) == 5
        assert row["topk_scores"] == sorted(row["topk_scores"], reverse=True)
        assert 0.0 < row["topk_scores"][0] <= 1.0
    metrics = json.loads((out / "metrics.json").read_text())
    top1 = sum(r["topk_ids"][0] == r["label"] for r in rows.values()) / len(rows)
    top5 = sum(r["label"] in r["topk_ids"] for r in rows.values()) / len(rows)
    assert metrics["n"] == len(images) and metrics["n_errors"] == 0
    assert metrics["top1"] == pytest.approx(top1) and metrics["top5"] == pytest.approx(top5)
    assert metrics["images_per_second"] > 0
    if name == "mobilenet_v1":
        # 1001 outputs with background first: reported names skip 'background'.
        assert all("background" not in label for r in rows.values() for label in r["topk_labels"])


def test_one_two_and_three_processes_agree(tiny_models, corpus, tmp_path):
    results = {}
    for processes in (1, 2, 3):
        out = tmp_path / f"out{processes}"
        # 2 ranks with a DataLoader worker process each (the GPU layout), else decode threads
        workers = ["--runtime.num_workers", "1"] if processes == 2 else []
        run_job(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(corpus),
                 "--output.dir", str(out), "--runtime.batch_size", "2", *workers],
                processes=processes)
        metrics = json.loads((out / "metrics.json").read_text())
        results[processes] = (read_rows(out), metrics)
    rows1, metrics1 = results[1]
    assert len(rows1) == 11
    for processes in (2, 3):
        rows, metrics = results[processes]
        assert sorted(rows) == sorted(rows1)
        for item_id, row in rows.items():
            assert row["topk_ids"] == rows1[item_id]["topk_ids"]
            assert row["topk_scores"] == pytest.approx(rows1[item_id]["topk_scores"], abs=1e-5)
        for key in ("n", "n_errors", "top1", "top5", "n_labelled"):
            assert metrics[key] == metrics1[key], key
    # Three ranks took part; units go to whichever rank is free, so who ran what varies.
    timing = json.loads((tmp_path / "out3" / "timing.json").read_text())
    assert len(timing["items_per_rank"]) == 3 and sum(timing["items_per_rank"]) == 11


def test_parquet_metadata_and_saved_config(tiny_models, corpus, tmp_path):
    out = tmp_path / "out"
    run_job(["--model.name", str(tiny_models["beit"]), "--data.path", str(corpus),
             "--output.dir", str(out), "--output.top_k", "3"])
    table = pq.read_table(next((out / "predictions").glob("*.parquet")))
    metadata = {k.decode(): json.loads(v) for k, v in table.schema.metadata.items()}
    assert metadata["model"]["name"] == str(tiny_models["beit"])
    assert len(metadata["model"]["weights_sha256"]) == 64
    assert metadata["config"]["output"]["top_k"] == 3
    assert all(len(ids) == 3 for ids in table.column("topk_ids").to_pylist())
    saved = (out / "config.yaml").read_text()
    assert "top_k: 3" in saved and str(corpus) in saved
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top5"] is None and "top_k" in metrics["top5_unavailable"]


def test_unlabelled_folder_is_labelling_mode(tiny_models, corpus, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in corpus.rglob("*.jpg"):
        (flat / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    result = run_job(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(flat),
                      "--output.dir", str(out)])
    rows = read_rows(out)
    assert len(rows) == len(list(flat.iterdir()))
    assert all(row["label"] is None and row["target"] is None for row in rows.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] is None and metrics["accuracy_unavailable"] == "the dataset has no labels"
    assert "top-1     n/a" in result.stdout
