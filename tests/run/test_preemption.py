"""Stop signals, the output lock, the error-fraction guard and `verify`, done for real."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from background import Background
from conftest import make_corpus, read_rows, run_job
from fixtures_images import write_bad_images
from stall import Stall, stall_reads

from batch_classify.commands.cli import main as cli_main
from batch_classify.core.preemption import PREEMPTED_EXIT_STATUS


def _stalled_corpus(tmp_path: Path, monkeypatch, blocked_index: int) -> tuple[Path, Stall]:
    """The 11-image corpus, reading item ``blocked_index`` stalls until the test releases it."""
    corpus = make_corpus(tmp_path / "corpus", seed=5)
    items = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.*"))
    return corpus, stall_reads(tmp_path, monkeypatch, Path(items[blocked_index]).name)


# Both loaders: a DataLoader worker process (the GPU default) and decode threads (the CPU one).
@pytest.mark.parametrize(("signal_number", "workers"), [(signal.SIGTERM, "1"), (signal.SIGUSR1, "0")])
def test_stop_signal_commits_finished_units_and_exits_75(tmp_path, tiny_models, signal_number,
                                                         workers, monkeypatch):
    # One process; unit size 2. Item 4 (first of unit 2) blocks until the test releases it.
    corpus, stall = _stalled_corpus(tmp_path, monkeypatch, blocked_index=4)
    out = tmp_path / "out"
    base = ["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(corpus),
            "--output.unit_size", "2", "--runtime.batch_size", "1", "--runtime.num_workers", workers]
    args = [*base, "--output.dir", str(out)]
    job = Background(args, processes=1)
    try:
        job.wait_for_units(out, 2)
        job.process.send_signal(signal_number)
        job.wait_for_line(f"received {signal.Signals(signal_number).name}")
        assert stall.reached
        stall.release()
    finally:
        status = job.finish()
    assert status == PREEMPTED_EXIT_STATUS
    # Units 0 and 1 were committed; unit 2 was cut short after item 4 and is not written.
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "unit-000000.parquet", "unit-000001.parquet"]
    assert not (out / "metrics.json").exists()

    result = run_job(args, processes=2)
    assert "resuming: 4 of 11 items already committed" in result.stderr
    rows = read_rows(out)
    assert len(rows) == 11 and all(r["error"] is None for r in rows.values())
    reference = tmp_path / "reference"
    run_job([*base, "--output.dir", str(reference)])
    expected = read_rows(reference)
    assert {k: r["topk_ids"] for k, r in rows.items()} == {k: r["topk_ids"] for k, r in expected.items()}


def test_a_rank_stuck_in_a_hung_read_still_stops(tmp_path, tiny_models, monkeypatch):
    # Decode threads (the CPU default). Item 4's read never returns, as on a stale network
    # mount: the signalled rank must still commit what it finished and exit, not hang.
    corpus, stall = _stalled_corpus(tmp_path, monkeypatch, blocked_index=4)
    out = tmp_path / "out"
    job = Background(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(corpus),
                      "--output.dir", str(out), "--output.unit_size", "2",
                      "--runtime.batch_size", "1", "--runtime.num_workers", "0"], processes=1)
    try:
        job.wait_for_units(out, 2)
        time.sleep(1)  # the decode thread is now stuck opening item 4
        assert stall.reached
        job.process.send_signal(signal.SIGTERM)
        status = job.finish(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the rank did not stop while a read hung")
    assert status == PREEMPTED_EXIT_STATUS
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "unit-000000.parquet", "unit-000001.parquet"]


def test_sigterm_to_the_launcher_stops_every_rank(tmp_path, tiny_models, monkeypatch):
    # Two ranks; item 6 (unit 3) blocks until released. Units go to whichever rank is free, so
    # the other rank runs the others meanwhile (all but one the blocked rank may have read ahead).
    corpus, stall = _stalled_corpus(tmp_path, monkeypatch, blocked_index=6)
    out = tmp_path / "out"
    args = ["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(corpus),
            "--output.dir", str(out), "--output.unit_size", "2", "--runtime.batch_size", "1"]
    job = Background(args, processes=2)
    try:
        job.wait_for_units(out, 4)
        time.sleep(1)
        job.process.send_signal(signal.SIGTERM)
        job.wait_for_line("WARNING batch_classify.core.preemption: received SIGTERM")
        # The blocked rank either reads the item, then stops, or is ended by the launcher once
        # the other has stopped: either way unit 3 (items 6-7) is never committed.
        stall.release()
        status = job.finish()
    finally:
        job.finish()
    assert status != 0
    committed = {int(p.name[5:11]) for p in (out / "predictions").iterdir()}
    assert 3 not in committed and {0, 1, 2} <= committed and len(committed) >= 4
    assert cli_main(["verify", str(out)]) == 1

    run_job(args, processes=2)
    assert len(read_rows(out)) == 11
    assert cli_main(["verify", str(out)]) == 0


def test_a_second_job_on_a_directory_in_use_refuses(tmp_path, tiny_models, monkeypatch):
    corpus, stall = _stalled_corpus(tmp_path, monkeypatch, blocked_index=0)
    out = tmp_path / "out"
    args = ["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(corpus),
            "--output.dir", str(out)]
    first = Background(args, processes=1)
    try:
        first.wait_for_line("DataLoader worker")  # the first job holds the lock by now
        second = run_job(args, expect_ok=False)
        assert second.returncode != 0
        assert "is in use by another job (pid" in second.stderr
        stall.release()
        assert first.finish() == 0
    finally:
        first.finish()
    assert json.loads((out / "metrics.json").read_text())["n"] == 11


def test_mostly_garbage_input_stops_with_a_clear_message(tmp_path, tiny_models):
    folder = tmp_path / "garbage"
    folder.mkdir()
    bad = sum(len(write_bad_images(folder / f"batch{i}")) for i in range(30))
    make_corpus(folder / "good")
    out = tmp_path / "out"
    result = run_job(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(folder),
                      "--data.kind", "images", "--output.dir", str(out),
                      "--runtime.max_error_fraction", "0.5"], expect_ok=False)
    assert result.returncode != 0
    assert "could not be decoded" in result.stderr and "runtime.max_error_fraction (0.5)" in result.stderr
    assert "Traceback" not in result.stderr  # a mistake in the input, not a bug
    # Without the guard the same input completes, every bad file a row.
    run_job(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(folder),
             "--data.kind", "images", "--output.dir", str(tmp_path / "all")])
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert metrics["n"] == bad + 11 and metrics["n_errors"] == bad
