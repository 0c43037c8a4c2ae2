"""Cluster faults met plainly, on real filesystems: a tmpfs that fills up, a read-only bind mount,
a folder whose permissions forbid writing, and image reads failing with EIO.

The read faults come from an LD_PRELOAD library (faulty_reads.c): the job's own reads of the
named files fail in libc, as on a sick Lustre or NFS client, without a FUSE filesystem (no
libfuse or fusepy here) or device-mapper (the kernel lacks dm and quota support).
Permissions are enforced on root by dropping CAP_DAC_OVERRIDE (setpriv): the Python install
under /root is out of reach of an unprivileged user.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, job_command, read_rows, run_job
from filesystems import compile_shim, mounted, used_bytes, without_capabilities

from batch_classify.commands.cli import main as cli_main
from batch_classify.core.faults import (
    OUTPUT_FAULT_EXIT_STATUS,
    STATUS_FILE_VARIABLE,
    OutputFault,
    describe_read_error,
    is_transient,
    is_transient_message,
    leave_status,
    output_fault,
)
from batch_classify.core.labels import imagenet_classes
from batch_classify.core.layout import REPORT_ASSETS, REPORT_FILES
from batch_classify.output.room import UnitShape, parse_lfs_quota, unit_file_bytes
from batch_classify.output.writer import write_unit
from batch_classify.pipeline.retry import describe, read_with_retries

# Units of 2 items, one image per forward pass: 6 units of the 11-image corpus.
JOB = ["--output.unit_size", "2", "--runtime.batch_size", "1"]
SCORED = ("n", "n_errors", "errors_by_type", "n_labelled", "n_scored", "top1", "top5", "macro_top1", "ece")


def _args(model: Path, data: Path, out: Path, *more: str) -> list[str]:
    return ["--model.name", str(model), "--data.path", str(data), "--output.dir", str(out), *JOB, *more]


def _job_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The job's own error lines ('batch-classify: ...'), from every rank."""
    text = result.stdout + result.stderr
    return [line for line in text.splitlines() if line.startswith("batch-classify:")]


def _no_rank_traceback(result: subprocess.CompletedProcess) -> None:
    text = result.stdout + result.stderr
    assert not re.search(r"\[rank\d+\]: Traceback", text), text
    # Under accelerate launch the launcher adds its own summary of the failed ranks (one
    # ChildFailedError); a single process prints no traceback at all.
    assert text.count("Traceback (most recent call last)") == text.count("ChildFailedError: "), text


def _predictions(rows: dict[str, dict]) -> dict[str, tuple]:
    return {key: (row["topk_ids"], row["topk_scores"], row["error"]) for key, row in rows.items()}


def _metrics(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    return {key: metrics[key] for key in SCORED}


@pytest.fixture(scope="module")
def reference(tiny_models, corpus, tmp_path_factory) -> Path:
    """A clean run of the corpus, in one process."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_job(_args(tiny_models["efficientnet"], corpus, out))
    return out


def _launch(args: list[str], processes: int, status_file: Path | None = None,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if status_file is not None:
        full_env[STATUS_FILE_VARIABLE] = str(status_file)
    return subprocess.run([*(prefix or []), *job_command(args, processes)], capture_output=True, text=True,
                          env=full_env, timeout=300, cwd=ROOT)


# ---------------------------------------------------------------- the output filesystem fills up

def test_disk_full_mid_job_on_two_ranks_then_the_rerun_equals_a_clean_run(reference, tiny_models, corpus,
                                                                           tmp_path):
    with mounted() as mounts:
        disk = mounts.tmpfs(tmp_path / "scratch", "2m")
        out = disk / "out"
        args = _args(tiny_models["efficientnet"], corpus, out, "--output.check_space", "false")
        assert cli_main(["plan", *args, "--runtime.device", "cpu"]) == 0  # the listing, on the tmpfs
        # Room for the job's small files and about two units of ~7 KB, not for all six.
        mounts.resize(disk, used_bytes(disk) + 40 * 1024)
        status = tmp_path / "status"
        result = _launch(args, processes=2, status_file=status)
        lines = _job_lines(result)
        assert len(lines) == 1, result.stdout + result.stderr
        assert status.read_text().strip() == str(OUTPUT_FAULT_EXIT_STATUS) == "74"
        assert result.returncode != 0  # the launcher's own status (torchrun reports a failed rank as 1)
        line = lines[0]
        assert "the output filesystem is full (ENOSPC: No space left on device, at " in line, line
        assert f"filesystem {disk}: " in line
        assert "; free space (or raise the quota) and run the same command again" in line
        _no_rank_traceback(result)
        # No partial file: only whole unit files, as many as the line says.
        names = sorted(p.name for p in (out / "predictions").iterdir())
        assert all(re.fullmatch(r"unit-\d{6}\.parquet", name) for name in names), names
        assert 1 <= len(names) < 6, names
        said = re.search(r"; (\d) of 6 units are committed and safe, and no partial unit file is kept;", line)
        # (a rank the launcher stopped may still have committed a unit after the line was printed)
        assert said and 1 <= int(said.group(1)) <= len(names), line
        assert not (out / "metrics.json").exists()

        mounts.resize(disk, "2m")  # space is made
        again = _launch(args, processes=2)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "resuming: " in again.stderr
        rows = read_rows(out)
        assert len(rows) == 11
        assert _predictions(rows) == _predictions(read_rows(reference))
        assert _metrics(out) == _metrics(reference)
        assert cli_main(["verify", str(out)]) == 0


def test_disk_full_while_the_report_is_written_leaves_metrics_json(reference, tiny_models, corpus, tmp_path):
    with mounted() as mounts:
        disk = mounts.tmpfs(tmp_path / "scratch", "2m")
        out = disk / "out"
        shutil.copytree(reference, out)  # every unit committed; metrics and report still to write
        for name in ("metrics.json", *REPORT_FILES):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / REPORT_ASSETS, ignore_errors=True)
        # Room for metrics.json and the small tables, not for the plot and the contact sheet.
        mounts.resize(disk, used_bytes(disk) + 12 * 1024)
        args = _args(tiny_models["efficientnet"], corpus, out)
        result = run_job(args, expect_ok=False)
        assert result.returncode == OUTPUT_FAULT_EXIT_STATUS, result.stdout + result.stderr
        lines = _job_lines(result)
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "all 6 units are committed and safe and metrics.json is written" in lines[0], lines[0]
        written = json.loads((out / "metrics.json").read_text())
        assert _metrics(out) == _metrics(reference)
        assert "report_files" not in written  # the report is not complete

        mounts.resize(disk, "2m")
        again = run_job(args)
        assert "images    11" in again.stdout
        assert _metrics(out) == _metrics(reference)
        assert json.loads((out / "metrics.json").read_text())["report_files"][0] == "report.md"
        assert (out / "report.md").exists() and (out / "per_class.png").exists()


def test_a_job_that_cannot_fit_is_refused_before_it_starts(tiny_models, corpus, tmp_path):
    with mounted() as mounts:
        disk = mounts.tmpfs(tmp_path / "scratch", "48k")  # room for the listing, not the units
        out = disk / "out"
        result = run_job(_args(tiny_models["efficientnet"], corpus, out), expect_ok=False)
        assert result.returncode == OUTPUT_FAULT_EXIT_STATUS, result.stderr
        lines = _job_lines(result)
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"output.dir {out} has no room for this job: it needs about " in lines[0]
        assert "for 11 items in 6 pending units, and 512.0 KiB for the report" in lines[0]
        assert "set output.check_space false to run anyway" in lines[0]
        assert not any((out / "predictions").iterdir())


# ---------------------------------------------------------------- output.dir cannot be written

def test_a_read_only_output_folder_is_one_line_and_exit_2(tiny_models, corpus, tmp_path):
    source = tmp_path / "writable"
    (source / "existing").mkdir(parents=True)
    with mounted() as mounts:
        read_only = mounts.read_only(source, tmp_path / "read-only")
        # A new folder on the read-only mount, on 2 ranks: one line for the job, every rank exits 2.
        status = tmp_path / "status"
        result = _launch(_args(tiny_models["efficientnet"], corpus, read_only / "out"), processes=2,
                         status_file=status)
        lines = _job_lines(result)
        assert len(lines) == 1, result.stdout + result.stderr
        assert lines[0].startswith(f"batch-classify: output.dir {read_only / 'out'} is on a read-only "
                                   "filesystem (EROFS: Read-only file system)"), lines[0]
        assert "; choose an output.dir on a writable filesystem" in lines[0]
        assert status.read_text().strip() == "2"
        _no_rank_traceback(result)
        # An existing folder there, in one process.
        result = run_job(_args(tiny_models["efficientnet"], corpus, read_only / "existing"), expect_ok=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(_job_lines(result)) == 1 and "read-only filesystem" in result.stderr
        # plan says the same.
        plan = subprocess.run([*job_command([], 1)[:1], "-m", "batch_classify", "plan",
                               *_args(tiny_models["efficientnet"], corpus, read_only / "existing")],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ}, timeout=120)
        assert plan.returncode == 2 and "Traceback" not in plan.stderr, plan.stderr
        assert "batch-classify plan: output.dir" in plan.stderr and "read-only filesystem" in plan.stderr


def test_an_output_folder_that_cannot_be_created_is_one_line_and_exit_2(tiny_models, corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    out = blocker / "out"
    result = run_job(_args(tiny_models["efficientnet"], corpus, out), expect_ok=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = _job_lines(result)
    assert len(lines) == 1 and f"output.dir {out} cannot be created (ENOTDIR: Not a directory)" in lines[0]


def test_a_folder_without_write_permission_is_one_line_and_exit_2(tiny_models, corpus, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "out"
    try:
        result = _launch(_args(tiny_models["efficientnet"], corpus, out), processes=1,
                         prefix=without_capabilities())
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = _job_lines(result)
    assert len(lines) == 1
    assert f"no permission to write output.dir {out} (EACCES: Permission denied)" in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------- reads that fail for a while

def test_images_failing_with_eio_are_retried_then_redone_on_request(reference, tiny_models, corpus, tmp_path):
    shim = compile_shim(tmp_path)
    items = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.*"))
    flaky, down = items[0], [items[5], items[9]]
    gate, log = tmp_path / "mount-is-sick", tmp_path / "failed-reads"
    gate.touch()
    faults = {"LD_PRELOAD": str(shim), "FAULTY_READS_WHILE": str(gate), "FAULTY_READS_LOG": str(log),
              # the flaky image's first 2 reads fail; the others' fail while the mount is sick
              "FAULTY_READS": ",".join([f"{Path(flaky).name}:2", *(Path(d).name for d in down)])}
    out = tmp_path / "out"
    args = _args(tiny_models["efficientnet"], corpus, out, "--runtime.read_retries", "2")
    run_job(args, env=faults)
    failed = log.read_text().split()
    assert failed.count(Path(flaky).name) == 2  # retried, then read
    assert all(failed.count(Path(d).name) == 3 for d in down)  # 1 read + 2 retries
    rows = read_rows(out)
    assert rows[flaky]["error"] is None
    for item in down:
        assert rows[item]["error"].startswith("OSError (transient): [Errno 5] Input/output error"), rows[item]
        assert rows[item]["error"].endswith("(3 reads over 1.5 s)")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["errors_by_type"] == {"OSError (transient)": 2}
    assert "OSError (transient): 2" in (out / "report.md").read_text()

    # The mount recovers; a plain rerun keeps the error rows, retry_errors transient redoes them.
    gate.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    result = run_job([*args, "--runtime.retry_errors", "transient"], env=faults)
    assert "runtime.retry_errors transient: 2 transient error rows in 2 committed unit(s)" in result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    assert sum(before[name] != after[name] for name in before) == 2 and before.keys() == after.keys()
    rows = read_rows(out)  # fails on an id twice
    assert len(rows) == 11 and all(row["error"] is None for row in rows.values())
    assert _predictions(rows) == _predictions(read_rows(reference))
    assert _metrics(out) == _metrics(reference)
    assert cli_main(["verify", str(out)]) == 0
    assert cli_main(["aggregate", str(out)]) == 0


# ---------------------------------------------------------------- the pieces, in one process

@pytest.mark.parametrize(("code", "status", "says"), [
    (errno.ENOSPC, 74, "the output filesystem is full (ENOSPC"),
    (errno.EDQUOT, 74, "the output filesystem is over its quota (EDQUOT"),
    (errno.EROFS, 2, "is on a read-only filesystem (EROFS"),
    (errno.EACCES, 2, "no permission to write output.dir"),
    (errno.EIO, 74, "the output filesystem failed (EIO"),
])
def test_output_faults_are_named_with_their_status(tmp_path, code, status, says):
    fault = output_fault(OSError(code, os.strerror(code), str(tmp_path / "out" / "x")), tmp_path / "out")
    assert isinstance(fault, OutputFault) and fault.exit_status == status and says in fault.what
    assert fault.line("3 of 6 units are committed and safe").count("; ") >= 2


def test_faults_elsewhere_are_not_the_outputs(tmp_path):
    # An input that cannot be read is not the output filesystem's fault; a bug is a bug.
    assert output_fault(OSError(errno.EACCES, "Permission denied", "/data/x.jpg"), tmp_path) is None
    assert output_fault(OSError(errno.EIO, "Input/output error", "/data/x.jpg"), tmp_path) is None
    assert output_fault(ValueError("bug"), tmp_path) is None


def test_a_unit_write_on_a_full_disk_names_its_file_and_leaves_nothing(tmp_path):
    with mounted() as mounts:
        disk = mounts.tmpfs(tmp_path / "tiny", "8k")
        rows = {"id": [f"{i:06d}" * 20 for i in range(2000)], "label": [1] * 2000, "target": [1] * 2000,
                "topk_ids": [[1, 2]] * 2000, "topk_labels": [["a", "b"]] * 2000,
                "topk_scores": [[0.5, 0.25]] * 2000, "error": [None] * 2000}
        with pytest.raises(OSError) as caught:
            write_unit(disk, 3, rows, {})
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.filename.startswith(str(disk / "predictions" / ".unit-000003.parquet.tmp-"))
        assert list((disk / "predictions").iterdir()) == []


def test_transient_reads_are_retried_and_others_are_not():
    failures = [OSError(errno.EIO, "Input/output error"), TimeoutError("timed out")]
    pauses: list[float] = []

    def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "pixels"

    assert read_with_retries(flaky, 3, "x.jpg", sleep=pauses.append) == "pixels"
    assert pauses == [0.5, 1.0]
    with pytest.raises(OSError) as caught:
        read_with_retries(lambda: (_ for _ in ()).throw(OSError(errno.ESTALE, "Stale file handle")), 2,
                          sleep=pauses.append)
    assert describe(caught.value).startswith("OSError (transient): [Errno 116] Stale file handle (3 reads")
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory")
    assert not is_transient(missing) and is_transient(ConnectionResetError())
    calls = []
    with pytest.raises(FileNotFoundError):
        read_with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(missing), 3, sleep=pauses.append)
    assert len(calls) == 1  # a missing file is not retried
    assert describe_read_error(missing) == "FileNotFoundError: [Errno 2] No such file or directory"
    assert is_transient_message("OSError (transient): [Errno 5] Input/output error")
    assert not is_transient_message("UnidentifiedImageError: not an image (transient)")


def test_the_size_estimate_holds_the_unit_files_it_predicts(reference):
    files = sorted((reference / "predictions").glob("unit-*.parquet"))
    metadata = {key.decode(): json.loads(value) for key, value in pq.read_schema(files[0]).metadata.items()
                if key.decode() in ("model", "dataset_fingerprint", "config")}
    shape = UnitShape(5, imagenet_classes()[1], None, metadata)
    per_row, per_file = unit_file_bytes(shape, id_length=len("n01440764/n01440764_0.jpg"))
    actual = sum(path.stat().st_size for path in files)
    estimate = per_row * 11 + per_file * len(files)
    assert actual <= estimate <= 1.5 * actual, (actual, estimate)


def test_lustre_quota_output_is_read():
    assert parse_lfs_quota("  /lustre  1048576  2097152  3145728  -  10  0  0  -\n") == 2097152 * 1024
    assert parse_lfs_quota("  /lustre  1048576*  0  0  -  10  0  0  -\n") is None


def test_the_first_rank_to_stop_names_the_status(tmp_path, monkeypatch):
    status = tmp_path / "status"
    monkeypatch.setenv(STATUS_FILE_VARIABLE, str(status))
    leave_status(74)
    leave_status(75)  # a peer the launcher stopped afterwards
    assert status.read_text() == "74\n"
