"""Nothing lost, nothing twice: a killed rank ends the job, and a rerun finishes it exactly."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, job_command, make_corpus, read_rows, run_job
from stall import stall_reads

from batch_classify.core.config import parse_args
from batch_classify.output.manifest import OutputMismatch
from batch_classify.results.aggregate import AggregateError, aggregate
from batch_classify.run.plan import prepare_listing


def _predictions(rows: dict[str, dict]) -> dict[str, tuple]:
    return {k: (r["topk_ids"], [round(s, 5) for s in r["topk_scores"]], r["error"])
            for k, r in rows.items()}


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children():
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


@pytest.fixture()
def job_args(tiny_models, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", seed=3)
    return corpus, ["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(corpus),
                    "--output.unit_size", "2", "--runtime.batch_size", "1"]


def test_sigkill_of_a_rank_then_resume_with_another_world_size(job_args, tmp_path, monkeypatch):
    corpus, args = job_args
    reference = tmp_path / "reference"
    run_job([*args, "--output.dir", str(reference)])

    # Reading the last item (unit 5) stalls: it blocks whichever rank claimed the unit.
    items = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.*"))
    stall = stall_reads(tmp_path, monkeypatch, Path(items[-1]).name)

    out = tmp_path / "out"
    command = job_command([*args, "--output.dir", str(out)], processes=2)
    orphans: list[psutil.Process] = []
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        # Units 0-4 hold items 0-9: wait until they are all committed.
        while len(list((out / "predictions").glob("unit-*.parquet"))) < 5:
            assert launcher.poll() is None, launcher.stdout.read().decode()
            assert time.monotonic() < deadline, "the job never committed its first units"
            time.sleep(0.2)
        rank1 = _rank_process(launcher, 1)
        assert rank1 is not None
        # Rank 1 is killed, whether it holds unit 5 or waits for rank 0 to finish it. Any
        # DataLoader worker of it lives in the rank's own session: end it below, as a real
        # requeue would end the whole allocation.
        orphans = rank1.children(recursive=True)
        rank1.send_signal(signal.SIGKILL)
        # The surviving rank is ended too, well before any collective timeout.
        launcher.wait(timeout=120)
        assert launcher.returncode != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        for orphan in orphans:
            with contextlib.suppress(psutil.Error):
                orphan.kill()
    committed = sorted(p.name for p in (out / "predictions").glob("unit-*.parquet"))
    assert committed == [f"unit-{u:06d}.parquet" for u in range(5)]
    with pytest.raises(AggregateError, match="10 prediction rows but the manifest lists 11"):
        aggregate(out)

    stall.release()
    result = run_job([*args, "--output.dir", str(out)], processes=3)
    assert "resuming: 10 of 11 items already committed" in result.stderr
    rows = read_rows(out)
    assert _predictions(rows) == _predictions(read_rows(reference))
    metrics = json.loads((out / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    for key in ("n", "n_errors", "top1", "top5"):
        assert metrics[key] == expected[key], key


def test_rerun_of_a_finished_job_changes_nothing(job_args, tmp_path):
    _, args = job_args
    out = tmp_path / "out"
    run_job([*args, "--output.dir", str(out)])
    before = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    partial = out / "predictions" / ".unit-000003.parquet.tmp-4242"  # left by a killed writer
    partial.write_bytes(b"PAR1 half a file")
    result = run_job([*args, "--output.dir", str(out)], processes=2)
    assert not partial.exists()
    assert "resuming: 11 of 11" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()} == before


def test_a_different_job_on_a_used_output_dir_is_refused(job_args, tiny_models, tmp_path):
    _, args = job_args
    out = tmp_path / "out"
    run_job([*args, "--output.dir", str(out)])
    # Only the unit size differs: the refusal names it (not the same data.path twice).
    with pytest.raises(OutputMismatch, match=r"a different job \(output.unit_size: 2 in the folder, 3 now\)"):
        prepare_listing(parse_args([*args, "--output.dir", str(out), "--output.unit_size", "3"]), out)
    result = run_job([*args, "--output.dir", str(out), "--model.name", str(tiny_models["beit"])],
                     expect_ok=False)
    assert result.returncode != 0
    assert "holds results of a different job" in result.stderr and "model.name" in result.stderr
    run_job([*args, "--output.dir", str(out), "--model.name", str(tiny_models["beit"]),
             "--output.overwrite", "true"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == str(tiny_models["beit"])
    assert len(read_rows(out)) == 11


def test_aggregate_refuses_duplicate_ids(job_args, tmp_path):
    _, args = job_args
    out = tmp_path / "out"
    run_job([*args, "--output.dir", str(out)])
    shutil.copy(out / "predictions" / "unit-000000.parquet", out / "predictions" / "unit-000099.parquet")
    with pytest.raises(AggregateError, match="appear more than once"):
        aggregate(out)
    (out / "predictions" / "unit-000099.parquet").unlink()
    # A partial (temporary) file left by a killed writer is ignored.
    (out / "predictions" / ".unit-000001.parquet.tmp-123").write_bytes(b"PAR1 partial")
    assert aggregate(out)["n"] == 11


def test_the_same_model_by_a_relative_path_is_the_same_job(job_args, tiny_models, tmp_path):
    _, args = job_args
    out = tmp_path / "out"
    run_job([*args, "--output.dir", str(out)])
    relative = os.path.relpath(tiny_models["efficientnet"], ROOT)  # run_job runs in ROOT
    result = run_job([*args, "--output.dir", str(out), "--model.name", relative])
    assert "resuming: 11 of 11" in result.stderr


def test_configuration_mistakes_are_one_line_without_a_traceback(job_args, tmp_path):
    _, args = job_args
    missing = run_job([*args, "--output.dir", str(tmp_path / "a"), "--data.path", str(tmp_path / "nope")],
                      expect_ok=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and "load_dataset" not in missing.stderr
    no_model = run_job([*args, "--output.dir", str(tmp_path / "b"), "--model.name", str(tmp_path / "m")],
                       expect_ok=False)
    assert no_model.returncode == 2 and f"no folder {tmp_path / 'm'} exists" in no_model.stderr
    assert "Traceback" not in no_model.stderr
    no_real = run_job([*args, "--output.dir", str(tmp_path / "c"), "--data.real_labels",
                       str(tmp_path / "real.json")], expect_ok=False)
    assert no_real.returncode == 2 and "Traceback" not in no_real.stderr
    assert f"batch-classify: data.real_labels {tmp_path / 'real.json'}: no such file" in no_real.stderr
    predictions = tmp_path / "c" / "predictions"
    assert not predictions.exists() or not any(predictions.iterdir())  # stopped before classifying
