"""``batch-classify bench`` runs every stage and reports them (no speed is asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import ROOT

STAGES = {"model", "pipeline", "job", "hf_pipeline", "seed_loop"}


def run_bench(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "-m", "batch_classify", "bench"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch",
                   "--config_file", str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"),
                   "--num_processes", str(processes), "-m", "batch_classify", "bench"]
    return subprocess.run([*command, "--runtime.device", "cpu", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _predicted_ids(job_dir) -> list[str]:
    return [i for path in sorted((job_dir / "predictions").glob("*.parquet"))
            for i in pq.read_table(path).column("id").to_pylist()]


def test_bench_runs_all_five_stages_on_the_same_images(tiny_models, corpus, tmp_path):
    bench_dir = tmp_path / "bench"
    result = run_bench(["--model.name", str(tiny_models["mobilenet_v1"]), "--data.path", str(corpus),
                        "--bench.dir", str(bench_dir), "--bench.limit", "8",
                        "--runtime.batch_size", "4", "--bench.large_photos", "3",
                        "--bench.large_sizes", "640x480,200x150"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((bench_dir / "bench.json").read_text())
    assert set(report["stages"]) == STAGES
    assert len(report["stages"]["model"]["rounds"]) == 4  # the model alone: median of 4 rounds
    for name, stage in report["stages"].items():
        assert stage["images"] == 8, name
        assert stage["images_per_s"] > 0 and stage["seconds"] > 0, name
    assert set(report["ratios"]) >= {"job/model", "job/hf_pipeline", "job/seed_loop"}
    assert report["ratios"]["job/model"] == pytest.approx(
        report["stages"]["job"]["images_per_s"] / report["stages"]["model"]["images_per_s"], rel=0.01)
    settings = report["settings"]
    assert settings["batch_size"] == 4 and settings["precision"] == "fp32"
    assert "fast input path" in settings["input_path_and_model"]
    assert report["versions"]["torch"] and report["device"]
    # The job stage really ran the job: 8 predictions, each image once.
    ids = _predicted_ids(bench_dir / "job")
    assert len(ids) == len(set(ids)) == 8
    for name in ("model", "pipeline", "job", "hf_pipeline", "seed_loop"):
        assert name in result.stdout
    # Large photos made from the bench's images: the workers' decode with reduction and without.
    large = report["large_photos"]
    assert set(large) == {"640x480", "200x150"}
    for figures in large.values():
        assert figures["images"] == 3
        for setting in ("off", "auto"):
            assert figures[setting]["cpu_ms_per_image"] > 0
            assert figures[setting]["pipeline_images_per_s"] > 0
    assert "large photos 640x480 (3 JPEGs)" in result.stdout


def test_bench_in_the_jobs_layout_counts_every_rank(tiny_models, corpus, tmp_path):
    bench_dir = tmp_path / "bench2"
    result = run_bench(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(corpus),
                        "--bench.dir", str(bench_dir), "--bench.stages", "model,pipeline,job",
                        "--runtime.batch_size", "2", "--runtime.decode", "device",
                        "--bench.rounds", "3"], processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((bench_dir / "bench.json").read_text())
    assert report["world_size"] == 2
    assert len(report["stages"]["model"]["rounds"]) == 3
    assert report["settings"]["decode"] == "device"
    assert "JPEGs decoded on cpu" in report["settings"]["input_path_and_model"]
    assert set(report["stages"]) == {"model", "pipeline", "job"}
    assert "large_photos" not in report  # not among the stages asked for
    assert all(stage["images"] == 11 for stage in report["stages"].values())
    ids = _predicted_ids(bench_dir / "job")
    assert len(ids) == len(set(ids)) == 11


@pytest.mark.parametrize(("option", "named"), [
    (["--bench.stages", "model,warp"], "warp"),
    (["--bench.rounds", "0"], "bench.rounds"),
    (["--bench.limit", "0"], "bench.limit"),
    (["--bench.large_sizes", "4032by3024"], "bench.large_sizes"),
    (["--bench.large_photos", "-1"], "bench.large_photos"),
    (["--runtime.preprocess", "turbo"], "runtime.preprocess"),
])
def test_bench_rejects_bad_options_naming_them(tiny_models, corpus, tmp_path, option, named):
    result = run_bench(["--model.name", str(tiny_models["mobilenet_v1"]), "--data.path", str(corpus),
                        "--bench.dir", str(tmp_path / "b"), *option])
    assert result.returncode == 2
    assert "configuration error" in result.stderr and named in result.stderr


@pytest.mark.parametrize("option", [["--bench.limit", "5"], ["--bench.stages=model"]])
def test_several_models_refuse_the_one_model_options(tiny_models, corpus, tmp_path, option):
    models = f"[{tiny_models['mobilenet_v1']}, {tiny_models['beit']}]"
    result = run_bench(["--model.name", models, "--data.path", str(corpus),
                        "--bench.dir", str(tmp_path / "b"), *option])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"configuration error: {option[0].split('=')[0]}: options of the one-model bench" in result.stderr
    assert not (tmp_path / "b").exists()  # refused before anything ran


def test_several_models_bench_one_pass_against_separate_jobs(tiny_models, corpus, tmp_path):
    bench_dir = tmp_path / "bench"
    names = json.dumps([str(tiny_models["mobilenet_v1"]), str(tiny_models["beit"])])
    result = run_bench(["--model.name", names, "--data.path", str(corpus), "--bench.dir", str(bench_dir),
                        "--runtime.batch_size", "4", "--bench.large_photos", "2",
                        "--bench.large_sizes", "1600x1200"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((bench_dir / "bench_models.json").read_text())
    photos = report["large_photos"]["1600x1200"]  # the pass's one decode, off against auto
    assert photos["images"] == 2 and "one reduced decode for 2 models" in photos["auto_decode"]
    for setting in ("off", "auto"):
        assert photos[setting]["cpu_ms_per_image"] > 0 and photos[setting]["pipeline_images_per_s"] > 0
    assert "large photos 1600x1200 (2 JPEGs), the pass's decode" in result.stdout
    assert len(report["separate_jobs"]) == 2 and len(report["one_pass_rounds"]) == 2
    rounds = [r["seconds"] for r in report["one_pass_rounds"]]  # before and after the separate jobs
    assert min(rounds) <= report["one_pass"]["seconds"] <= max(rounds)
    assert report["ratio_separate_over_one_pass"] > 0 and "separate / one pass" in result.stdout
    for index in range(2):
        assert len(_predicted_ids(bench_dir / f"alone-{index}")) == 11
    assert len(_predicted_ids(bench_dir / "pass" / "beit")) == 11


@pytest.mark.parametrize(("workers", "sizes"), [(0, [8]), (4, [2, 2, 2, 2]), (3, [3, 3, 2])])
def test_the_large_photo_loader_rate_gives_every_worker_a_batch(monkeypatch, workers, sizes):
    from batch_classify.bench import large_photos
    from batch_classify.pipeline.distributed import Resources

    seen = []
    monkeypatch.setattr(large_photos, "make_loader", lambda dataset, batches, *a: seen.extend(batches) or [])
    large_photos.loader_rate(None, [f"p{i}.jpg" for i in range(8)], 10**8, batch_size=16,
                             resources=Resources(None, threads=2, workers=workers))
    assert [len(batch) for batch in seen] == sizes
