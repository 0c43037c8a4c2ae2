"""WebDataset collections end to end: shards as units, bad shards as rows, stop and resume at
other world sizes, and the same figures as the same images in an ImageNet folder."""

from __future__ import annotations

import json
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from background import Background
from conftest import _photo, read_rows, run_job
from fixtures_wds import flawed_tars, make_wds
from stall import stall_reads

from batch_classify.commands.cli import main as cli_main
from batch_classify.core.labels import imagenet_classes
from batch_classify.core.preemption import PREEMPTED_EXIT_STATUS
from batch_classify.inputs.base import InputError
from batch_classify.inputs.listing import read_listing
from batch_classify.pipeline.loader import UnitTasks
from batch_classify.pipeline.shard import UnitQueue
from batch_classify.results.verify import verify

WNIDS = imagenet_classes()[0]
CLASSES = [0, 1, 281, 404, 817]  # tench, goldfish, tabby, airliner, sports car
METRIC_KEYS = ("n", "n_errors", "errors_by_type", "n_labelled", "n_scored", "top1", "top5",
               "macro_top1", "ece")


def _images(count: int, seed: int) -> list[tuple[str, object, int]]:
    rng = np.random.default_rng(seed)
    return [(f"s{seed}-{i:04d}", _photo(rng, (20 + i % 7, 24 + i % 5)), CLASSES[i % len(CLASSES)])
            for i in range(count)]


@pytest.fixture()
def collection(tmp_path):
    """8 tars of 30 labelled photos, the six flawed tars, and zzz.tar (12 photos)."""
    root = tmp_path / "wds"
    make_wds(root, _images(240, seed=1), per_tar=30)
    flawed_tars(root / "flawed")
    make_wds(tmp_path / "later", _images(12, seed=2), per_tar=12)[0].rename(root / "zzz.tar")
    return root


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _wait_for_units(out: Path, count: int, job: Background, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(list((out / "predictions").glob("unit-*.parquet"))) < count:
        assert job.process.poll() is None, "job ended early:\n" + "".join(job.log)
        assert time.monotonic() < deadline, "units never committed"
        time.sleep(0.1)


def _predictions(rows: dict[str, dict]) -> dict[str, tuple]:
    return {k: (r["label"], r["topk_ids"], None if r["topk_scores"] is None else
                [round(s, 5) for s in r["topk_scores"]], r["error"]) for k, r in rows.items()}


def test_stopped_on_two_ranks_resumed_on_one_finished_on_three(collection, tiny_models, tmp_path,
                                                               monkeypatch):
    root = collection
    out = tmp_path / "out"
    args = ["--model.name", str(tiny_models["mobilenet_v1"]), "--data.path", str(root),
            "--runtime.batch_size", "4", "--output.dir", str(out)]
    n_units = 8 + 6 + 1
    # Listed first (plan); then reading zzz.tar stalls, blocking whoever reads it until the
    # test lets it through.
    assert cli_main(["plan", *args]) == 0
    stall = stall_reads(tmp_path, monkeypatch, "zzz.tar")

    # 2 ranks, stopped part-way.
    job = Background(args, processes=2)
    try:
        _wait_for_units(out, 3, job)
        job.process.send_signal(signal.SIGTERM)
        assert job.finish() != 0
    finally:
        job.finish()
    first = {p.name for p in (out / "predictions").glob("unit-*.parquet")}
    assert 3 <= len(first) < n_units and f"unit-{n_units - 1:06d}.parquet" not in first

    # 1 rank: everything but the blocked tar, then stopped while it waits for it.
    job = Background(args, processes=1)
    try:
        _wait_for_units(out, n_units - 1, job)
        time.sleep(0.5)
        job.process.send_signal(signal.SIGTERM)
        assert job.finish() == PREEMPTED_EXIT_STATUS
    finally:
        job.finish()
    assert cli_main(["verify", str(out)]) == 1  # one unit missing, and verify says so

    # 3 ranks finish it once the tar is readable.
    assert stall.reached
    stall.release()
    run_job(args, processes=3)
    rows = read_rows(out)  # fails on an id written twice
    assert cli_main(["verify", "--recount", str(out)]) == 0

    reference = tmp_path / "reference"
    run_job([*args[:-1], str(reference)])
    expected = read_rows(reference)
    assert _predictions(rows) == _predictions(expected)
    metrics = json.loads((out / "metrics.json").read_text())
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    for key in METRIC_KEYS:  # scores differ in the last bits with the ranks' thread counts
        assert metrics[key] == pytest.approx(reference_metrics[key], rel=1e-6), key

    # Every sample the test wrote is a row, under <tar>/<key>, with its label.
    written = {f"{tar:05d}.tar/s1-{i:04d}": CLASSES[i % len(CLASSES)]
               for i in range(240) for tar in [i // 30]}
    written |= {f"zzz.tar/s2-{i:04d}": CLASSES[i % len(CLASSES)] for i in range(12)}
    assert {k: rows[k]["label"] for k in written} == written
    assert all(rows[k]["error"] is None for k in written)
    # Each flawed tar is there as rows too, errors by name.
    flawed = {k: r for k, r in rows.items() if k.startswith("flawed/")}
    assert sorted(r["error"].split(":")[0] for r in flawed.values() if r["error"]) == [
        "DuplicateMember", "EmptyShard", "MissingImage", "NotATar", "SplitSample", "TruncatedShard"]
    assert len(rows) == len(written) + len(flawed)
    assert metrics["n_errors"] == 6 and metrics["n"] == len(rows)


def test_the_same_figures_as_the_same_images_in_an_imagenet_folder(tiny_models, tmp_path):
    root = tmp_path / "wds"
    tars = make_wds(root, _images(90, seed=3), per_tar=40)
    folder = tmp_path / "folder"
    keys = {}
    for tar in tars:
        members = _members(tar)
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                label = int(members[f"{key}.cls"])
                (folder / WNIDS[label]).mkdir(parents=True, exist_ok=True)
                (folder / WNIDS[label] / name).write_bytes(data)
                keys[f"{tar.name}/{key}"] = f"{WNIDS[label]}/{name}"
    model = ["--model.name", str(tiny_models["mobilenet_v1"]), "--runtime.batch_size", "8"]
    run_job([*model, "--data.path", str(root), "--output.dir", str(tmp_path / "a")], processes=2)
    run_job([*model, "--data.path", str(folder), "--output.dir", str(tmp_path / "b")])
    shards, files = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    assert len(shards) == len(files) == 90
    for shard_id, file_id in keys.items():
        assert shards[shard_id]["topk_ids"] == files[file_id]["topk_ids"]
        assert shards[shard_id]["target"] == files[file_id]["target"]
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
    per_class = [(tmp_path / side / "per_class.csv").read_text() for side in ("a", "b")]
    assert per_class[0] == per_class[1]


def test_plan_lists_tars_without_reading_them(tmp_path, tiny_models, capsys):
    root = tmp_path / "wds"
    make_wds(root, _images(20, seed=4), per_tar=5)
    pattern = str(root / "{00000..00002}.tar")  # a brace pattern: 3 of the 4 tars
    out = tmp_path / "out"
    assert cli_main(["plan", "--model.name", str(tiny_models["beit"]), "--data.path", pattern,
                     "--output.dir", str(out)]) == 0
    listing = json.loads((out / "input" / "listing.json").read_text())
    assert listing["kind"] == "webdataset" and listing["n_units"] == 3 and listing["n_items"] is None
    run_job(["--model.name", str(tiny_models["beit"]), "--data.path", pattern, "--output.dir", str(out)])
    rows = read_rows(out)
    assert sorted({k.split("/")[0] for k in rows}) == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(rows) == 15
    capsys.readouterr()
    (out / "predictions" / "unit-000001.parquet").unlink()  # as if preempted before it committed
    assert cli_main(["plan", "--model.name", str(tiny_models["beit"]), "--data.path", pattern,
                     "--output.dir", str(out)]) == 0
    said = capsys.readouterr().out
    assert "listing   reused" in said and "2 of 3 units committed, 1 pending" in said


def test_a_tar_gone_after_listing_stops_the_job_with_one_line_and_a_rerun_retries_it(tmp_path, tiny_models):
    root = tmp_path / "wds"
    tars = make_wds(root, _images(10, seed=5), per_tar=5)
    out = tmp_path / "out"
    args = ["--model.name", str(tiny_models["beit"]), "--data.path", str(root), "--output.dir", str(out)]
    assert cli_main(["plan", *args]) == 0
    moved = tmp_path / "elsewhere.tar"
    tars[1].rename(moved)  # a mount gone, a shard being copied: not a reason to list again
    failed = run_job(args, processes=2, expect_ok=False)
    assert failed.returncode != 0
    said = [line for line in failed.stderr.splitlines() if line.startswith("batch-classify: ")]
    assert said and all(f"{tars[1]} no longer exists" in line and "mount it and run again" in line
                        for line in said), failed.stderr  # one line from each rank
    assert "src/batch_classify/" not in failed.stderr, failed.stderr
    assert not list((out / "predictions").glob("unit-*.parquet"))  # found before anything ran
    # Gone after the start check, while the job runs: the rank that reads it stops the job
    # with one line naming the unit, and a rerun retries it.
    listing = read_listing(out)
    tasks = UnitTasks(UnitQueue(np.array([1])), listing, 4)
    with pytest.raises(InputError, match=r"unit 1 of the input \(00001.tar\) cannot be read: "
                       r"FileNotFoundError.*run the same command again once it is readable"):
        list(tasks)
    moved.rename(tars[1])
    run_job(args)
    rows = read_rows(out)
    assert len(rows) == 10 and all(row["error"] is None for row in rows.values())
    assert cli_main(["verify", str(out)]) == 0
    damaged = out / "predictions" / "unit-000001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a committed file cut short since
    result = verify(out)
    assert not result.complete and len(result.unreadable_files) == 1
    assert result.unreadable_files[0].startswith("unit-000001.parquet: cut short: no PAR1 magic at its end")
    assert cli_main(["verify", str(out)]) == 1  # a report, not a traceback
