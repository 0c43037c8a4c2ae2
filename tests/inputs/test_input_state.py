"""A listing is bound to the input it listed; folders are walked once per file, at any depth."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from conftest import ROOT, make_corpus, read_rows, run_job
from PIL import Image

from batch_classify.commands.cli import main as cli_main
from batch_classify.core.config import DataConfig
from batch_classify.inputs.folders import walk_images
from batch_classify.inputs.listing import read_listing, write_listing
from batch_classify.inputs.state import StateRecorder, check_state


def plan(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch_classify", "plan", "--model.name", "unused",
                           *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def jpeg(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), (shade, 90, 200 - shade)).save(path)
    return path


def test_a_relative_data_path_resumes_from_any_working_directory(tmp_path):
    make_corpus(tmp_path / "work" / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert plan("--data.path", "data", "--output.dir", "out", cwd=tmp_path / "work").returncode == 0
    result = plan("--data.path", tmp_path / "work" / "data", "--output.dir", tmp_path / "work" / "out",
                  cwd=elsewhere)
    assert result.returncode == 0 and "reused" in result.stdout, result.stderr
    listing = read_listing(tmp_path / "work" / "out")
    assert os.path.isabs(listing.root)
    os.chdir(elsewhere)  # records resolve from the stored root, not the working directory
    payloads = [r.payload for u in range(listing.n_units) for r in listing.records(u)]
    assert len(payloads) == 11 and all(os.path.isfile(p) for p in payloads)


def test_a_changed_folder_is_found_and_a_resume_refused_until_relisted(tiny_models, tmp_path):
    """Images added to or removed from a folder between runs; verify --recount sees the input."""
    data = make_corpus(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(data),
            "--output.dir", str(out), "--output.unit_size", "4"]
    run_job(args)
    assert cli_main(["verify", "--recount", str(out)]) == 0

    added = jpeg(data / "n02123045" / "new.jpg")
    assert cli_main(["verify", "--recount", str(out)]) == 1  # the filesystem, not the listing
    refused = run_job(args, expect_ok=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "n02123045 was modified after it was listed" in refused.stderr
    assert "output.overwrite" in refused.stderr  # the way to list it again
    assert len(read_rows(out)) == 11  # nothing touched

    run_job([*args, "--output.overwrite", "true"])
    assert len(read_rows(out)) == 12 and "n02123045/new.jpg" in read_rows(out)
    assert cli_main(["verify", "--recount", str(out)]) == 0

    added.unlink()
    refused = run_job(args, expect_ok=False)
    assert refused.returncode == 2 and "was modified after it was listed" in refused.stderr


def test_every_kind_of_input_change_is_named(tmp_path):
    """Folder entries, a labels file's bytes, a shard's size, a list file; one stat each."""
    folder = tmp_path / "flat"
    for i in range(3):
        jpeg(folder / f"{i}.jpg", i)
    labels = tmp_path / "labels.csv"
    labels.write_text("0.jpg,0\n1.jpg,1\n2.jpg,2\n")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(folder / "0.jpg", "x.jpg")
    file_list = tmp_path / "list.txt"
    file_list.write_text("flat/0.jpg\n")

    state = StateRecorder()
    list(walk_images(folder, state))
    state.content(labels)
    state.file(tmp_path / "a.tar")
    state.file(file_list)
    state.write(tmp_path / "state.parquet")
    assert check_state(tmp_path / "state.parquet") is None

    labels.write_text("0.jpg,0\n1.jpg,1\n2.jpg,3\n")  # same size, other bytes
    with tarfile.open(tmp_path / "a.tar", "a") as tar:
        tar.add(folder / "1.jpg", "y.jpg")
    file_list.write_text("flat/1.jpg\n")
    times = folder.stat()
    jpeg(folder / "3.jpg")
    # A change within the folder's timestamp granularity: the mtime alone would miss it.
    os.utime(folder, ns=(times.st_atime_ns, times.st_mtime_ns))
    change = check_state(tmp_path / "state.parquet")
    assert change.n == 4
    text = change.describe()
    assert "holds 4 entries, 3 when listed" in text and "labels.csv was edited" in text
    assert "a.tar" in text and "(and 1 more)" in text  # a tar grows in 10 KiB records: its mtime tells


def test_an_edited_labels_file_or_a_new_shard_is_listed_again(tmp_path):
    folder = tmp_path / "flat"
    for i in range(3):
        jpeg(folder / f"{i}.jpg", i)
    labels = tmp_path / "labels.csv"
    labels.write_text("0.jpg,0\n1.jpg,1\n2.jpg,2\n")
    out = tmp_path / "out"
    assert plan("--data.path", folder, "--data.labels", labels, "--output.dir", out).returncode == 0
    labels.write_text("0.jpg,5\n1.jpg,1\n2.jpg,2\n")
    result = plan("--data.path", folder, "--data.labels", labels, "--output.dir", out)
    assert "written" in result.stdout and "labels.csv was edited" in result.stderr
    records = read_listing(out).records(0)
    assert [(r.id, r.label) for r in records] == [("0.jpg", 5), ("1.jpg", 1), ("2.jpg", 2)]

    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("a", "b"):
        with tarfile.open(shards / f"{name}.tar", "w") as tar:
            tar.add(folder / "0.jpg", f"{name}.jpg")
    assert plan("--data.path", shards, "--output.dir", tmp_path / "wds").returncode == 0
    shutil.copy(shards / "a.tar", shards / "c.tar")
    result = plan("--data.path", shards, "--output.dir", tmp_path / "wds")
    assert "1 file(s) added, e.g. c.tar" in result.stderr and "units     3" in result.stdout


def test_symlinks_are_followed_once_and_loops_end(tmp_path):
    root = tmp_path / "root"
    jpeg(root / "a" / "1.jpg")
    jpeg(root / "a" / "2.jpg")
    (root / "b").symlink_to(root / "a")             # the same folder twice
    (root / "a" / "loop").symlink_to(root)           # back to the top
    (root / "c").mkdir()
    (root / "c" / "same.jpg").symlink_to(root / "a" / "1.jpg")  # a file listed under its own name
    outside = jpeg(tmp_path / "outside" / "o.jpg")
    (root / "c" / "o1.jpg").symlink_to(outside)      # two links to one file outside the root
    (root / "c" / "o2.jpg").symlink_to(outside)
    (root / "c" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")  # kept: its read names the fault
    jpeg(tmp_path / "elsewhere" / "e.jpg")
    (root / "d").symlink_to(tmp_path / "elsewhere")  # a folder outside, reached once
    notes: list[str] = []
    listed = list(walk_images(root, notes=notes))
    assert listed == ["a/1.jpg", "a/2.jpg", "c/gone.jpg", "c/o1.jpg", "d/e.jpg"]
    assert "2 folder(s) reached twice" in notes[0] and "2 linked file(s)" in notes[0]


def test_deeply_nested_folders_are_walked_without_recursion(tmp_path):
    deep = tmp_path / "deep"
    deep.mkdir()
    path = deep
    for _ in range(1200):  # deeper than Python's recursion limit
        path = path / "d"
        path.mkdir()
    try:
        jpeg(path / "x.jpg")
        jpeg(deep / "top.jpg")
        listing = write_listing(DataConfig(path=str(deep), kind="images"), tmp_path / "out")
        ids = [r.id for u in range(listing.n_units) for r in listing.records(u)]
        assert ids == ["d/" * 1200 + "x.jpg", "top.jpg"]
    finally:
        (path / "x.jpg").unlink(missing_ok=True)
        while path != deep:  # shutil.rmtree recurses on Python 3.11: remove it bottom-up
            path.rmdir()
            path = path.parent
