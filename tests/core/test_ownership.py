"""The job writes and deletes only what it created: never the data, never a stranger's files."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, make_corpus, run_job

from batch_classify.core.layout import MARKER
from batch_classify.core.ownership import OutputLocationError, claim, remove_listing, remove_predictions


def plan(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``batch-classify plan`` in a fresh process (it loads no model)."""
    return subprocess.run([sys.executable, "-m", "batch_classify", "plan", "--model.name", "unused",
                           *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_line_refusal(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("batch-classify")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_an_output_folder_above_the_data_is_refused_and_the_images_survive(tmp_path):
    """The reproduction: data in proj/input, output.dir proj. Listing used to clear proj/input."""
    make_corpus(tmp_path / "proj" / "input")
    before = tree(tmp_path / "proj")
    one_line_refusal(plan("--data.path", "proj/input", "--output.dir", "proj", cwd=tmp_path),
                     "contains data.path")
    assert tree(tmp_path / "proj") == before


@pytest.mark.parametrize("where", ["equal", "inside", "inside-through-a-link", "above-a-tar"])
def test_output_folders_that_overlap_the_data_are_refused_before_anything_is_written(tmp_path, where):
    data = make_corpus(tmp_path / "data")
    data_path, output = data, data / "outputs" / "run1"
    if where == "equal":
        output = data
    elif where == "inside-through-a-link":
        (tmp_path / "link").symlink_to(data / "n01440764")
        output = tmp_path / "link" / "run1"
    elif where == "above-a-tar":
        with tarfile.open(data / "n01440764" / "shard.tar", "w") as tar:
            tar.add(data / "n01440764" / "n01440764_0.jpg", "a.jpg")
        data_path, output = data / "n01440764" / "shard.tar", data
    before = tree(data)
    one_line_refusal(plan("--data.path", data_path, "--output.dir", output), "output.dir")
    assert tree(data) == before  # not even a lock file


def test_an_output_folder_beside_the_data_is_fine(tmp_path):
    data = make_corpus(tmp_path / "data")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(data / "n01440764" / "n01440764_0.jpg", "a.jpg")
    assert plan("--data.path", data, "--output.dir", tmp_path / "data-out").returncode == 0
    result = plan("--data.path", tmp_path / "shard.tar", "--output.dir", tmp_path / "tar-out")
    assert result.returncode == 0, result.stderr


def test_a_folder_holding_files_the_job_would_overwrite_is_refused(tmp_path):
    data = make_corpus(tmp_path / "data")
    output = tmp_path / "project"
    (output / "input").mkdir(parents=True)
    (output / "input" / "notes.txt").write_text("mine")
    (output / "report.md").write_text("my report")
    one_line_refusal(plan("--data.path", data, "--output.dir", output), "'input'", "'report.md'")
    assert tree(output) == {"input/notes.txt": b"mine", "report.md": b"my report"}


def test_a_folder_of_other_files_is_adopted_and_its_files_kept(tmp_path):
    data = make_corpus(tmp_path / "data")
    output = tmp_path / "project"
    output.mkdir()
    (output / "slurm-123.out").write_text("a log")
    assert plan("--data.path", data, "--output.dir", output).returncode == 0
    assert (output / MARKER).is_file() and (output / "slurm-123.out").read_text() == "a log"
    # Adopted: a second plan with other settings lists again, in its own folder.
    result = plan("--data.path", data, "--output.dir", output, "--output.unit_size", "3")
    assert result.returncode == 0, result.stderr
    assert (output / "slurm-123.out").read_text() == "a log"


def test_an_input_file_where_the_job_writes_is_refused(tmp_path):
    data = make_corpus(tmp_path / "data")
    output = tmp_path / "out"
    (output / "input").mkdir(parents=True)
    (output / MARKER).write_text("")
    labels = output / "input" / "labels.csv"
    labels.write_text("x.jpg,0\n")
    one_line_refusal(plan("--data.path", data, "--output.dir", output, "--data.labels", labels),
                     "labels.csv")
    assert labels.read_text() == "x.jpg,0\n"


def test_folders_are_removed_only_where_every_entry_is_the_jobs(tmp_path):
    output = tmp_path / "out"
    claim(output)
    predictions = output / "predictions"
    predictions.mkdir()
    (predictions / "unit-000000.parquet").write_bytes(b"x")
    (predictions / ".unit-000001.parquet.tmp-77").write_bytes(b"x")
    (predictions / "keep.parquet").write_bytes(b"mine")
    with pytest.raises(OutputLocationError, match="keep.parquet"):
        remove_predictions(predictions)
    assert (predictions / "keep.parquet").read_bytes() == b"mine"
    (predictions / "keep.parquet").unlink()
    remove_predictions(predictions)
    assert not predictions.exists()

    stranger = tmp_path / "stranger"  # no marker: never deleted, whatever it holds
    (stranger / "input").mkdir(parents=True)
    (stranger / "input" / "units.parquet").write_bytes(b"x")
    with pytest.raises(OutputLocationError, match="not a batch-classify output folder"):
        remove_listing(stranger / "input")
    assert (stranger / "input" / "units.parquet").exists()

    (output / "input").symlink_to(stranger / "input")  # a link is never followed into
    with pytest.raises(OutputLocationError, match="link"):
        remove_listing(output / "input")
    assert (stranger / "input" / "units.parquet").exists()


def test_a_job_refuses_to_write_into_its_data(tiny_models, tmp_path):
    data = make_corpus(tmp_path / "data")
    before = tree(data)
    result = run_job(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(data),
                      "--output.dir", str(data / "n01440764" / "out")], expect_ok=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lies inside data.path" in result.stderr
    assert tree(data) == before
