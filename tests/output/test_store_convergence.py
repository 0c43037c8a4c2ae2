"""A job whose output is in a bucket leaves the bucket holding what it committed, whatever
happened there: a unit object damaged in the bucket is replaced on resume, and a job killed
while its listing or its report goes up is finished by a resume from another staging folder
(another machine). moto's S3 server behind the fault proxy; the fixtures are in conftest.py."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time

import pyarrow.parquet as pq
from background import Background
from conftest import read_rows, run_job
from object_servers import compared

from batch_classify.commands.cli import main as cli_main


def _args(s3, tiny_models, in_store, url: str, staging) -> list[str]:
    fs = s3.filesystem()
    if not fs.exists("outputs"):
        fs.mkdir("outputs")
    return ["--model.name", str(tiny_models["beit"]), "--data.path", str(in_store["local"] / "wds"),
            "--output.dir", url, "--output.storage_options", json.dumps(s3.options()),
            "--output.staging", str(staging)]


def _killed_once(s3, args: list[str], slow: str, appeared: str) -> None:
    """The job run with the PUTs matching ``slow`` slowed down, and killed (SIGKILL, its whole
    process group) as soon as an object matching ``appeared`` is in the bucket."""
    fs = s3.filesystem()
    s3.faults.put_delay_s, s3.faults.put_pattern = 1.5, re.compile(slow)
    try:
        job = Background(args, processes=1)
        deadline = time.monotonic() + 180
        while not any(re.search(appeared, key) for key in fs.find("outputs", refresh=True)):
            assert time.monotonic() < deadline and job.process.poll() is None, "".join(job.log)
            time.sleep(0.05)
        os.killpg(job.process.pid, signal.SIGKILL)
        job.process.wait()
    finally:
        s3.faults.put_delay_s, s3.faults.put_pattern = 0.0, re.compile("$^")


def _bucket_rows(s3, prefix: str, tmp_path) -> dict:
    copy = tmp_path / "copy"
    s3.filesystem().get(f"{prefix}/predictions", str(copy / "predictions"), recursive=True)
    return read_rows(copy)


def test_a_unit_object_damaged_in_the_bucket_is_replaced_on_resume(
        s3, tiny_models, in_store, local_tars, tmp_path, monkeypatch):
    url, key = "s3://outputs/damaged", "outputs/damaged/predictions/unit-000001.parquet"
    args = _args(s3, tiny_models, in_store, url, tmp_path / "staging")
    run_job(args)
    fs = s3.filesystem()
    good = fs.cat(key)
    damaged = good.replace(b'{"unit": 1, ', b'{"unit": 7, ', 1)  # same size, one byte other
    assert damaged != good and len(damaged) == len(good)
    fs.pipe(key, damaged)
    monkeypatch.setenv("BATCH_CLASSIFY_STORAGE_OPTIONS", json.dumps(s3.options()))
    monkeypatch.setenv("BATCH_CLASSIFY_CACHE", str(tmp_path / "cache"))
    assert cli_main(["verify", url]) != 0
    # The same staging folder, which holds the good file at that size: the pull notices the change.
    resumed = run_job(args)
    assert "unit-000001.parquet" in resumed.stderr and "replacing it" in resumed.stderr, resumed.stderr
    repaired = fs.cat(key)
    assert len(repaired) > 0 and pq.read_table(io.BytesIO(repaired)).num_rows == 5
    assert json.loads(pq.read_schema(io.BytesIO(repaired)).metadata[b"unit"])["unit"] == 1
    assert cli_main(["verify", url]) == 0  # its staging folder (the cache) pulls the repaired object
    assert compared(_bucket_rows(s3, "outputs/damaged", tmp_path)) == compared(read_rows(local_tars))


def test_a_job_killed_while_its_listing_goes_up_is_resumed_from_another_staging_folder(
        s3, tiny_models, in_store, local_tars, tmp_path):
    url = "s3://outputs/listing-kill"
    args = _args(s3, tiny_models, in_store, url, tmp_path / "staging")
    _killed_once(s3, args, "/outputs/listing-kill/input/", r"^outputs/listing-kill/input/")
    fs = s3.filesystem()
    up = {key.rsplit("/", 1)[-1] for key in fs.find("outputs/listing-kill/input", refresh=True)}
    assert "listing.json" not in up or {"units.parquet", "state.parquet"} <= up, up
    args[-1] = str(tmp_path / "staging-2")
    run_job(args)
    fs.invalidate_cache()
    for name in ("listing.json", "units.parquet", "state.parquet"):
        assert fs.exists(f"outputs/listing-kill/input/{name}"), name
    assert compared(_bucket_rows(s3, "outputs/listing-kill", tmp_path)) == compared(read_rows(local_tars))


def test_a_job_killed_while_its_report_goes_up_is_completed_by_a_resume_from_elsewhere(
        s3, tiny_models, in_store, tmp_path):
    url = "s3://outputs/report-kill"
    args = _args(s3, tiny_models, in_store, url, tmp_path / "staging")
    report = r"outputs/report-kill/(report|per_class|confusions|least_confident|mistakes|predicted)"
    _killed_once(s3, args, "/" + report, "^" + report)
    fs = s3.filesystem()
    assert not fs.exists("outputs/report-kill/report.html")  # killed before the page went up
    args[-1] = str(tmp_path / "staging-2")
    resumed = run_job(args)
    assert "report.html" in resumed.stdout + resumed.stderr
    fs.invalidate_cache()
    metrics = json.loads(fs.cat("outputs/report-kill/metrics.json"))
    expected = {*metrics["report_files"], "timing.json", "metrics.json", "report.html", "report.md",
                "per_class.csv"}
    for name in expected:
        assert fs.exists(f"outputs/report-kill/{name}"), name
    for key in fs.find("outputs/report-kill", refresh=True):
        assert fs.info(key)["size"] > 0, key


def test_a_full_staging_disk_sends_no_partial_file_and_counts_the_units_in_the_bucket(
        s3, tiny_models, in_store, tmp_path):
    from filesystems import mounted, used_bytes

    from batch_classify.core.faults import OUTPUT_FAULT_EXIT_STATUS
    from batch_classify.output.remote import attach

    url = "s3://outputs/full"
    args = _args(s3, tiny_models, in_store, url, tmp_path / "first")
    run_job(args)
    fs = s3.filesystem()
    for key in fs.find("outputs/full", refresh=True):  # the units are there, the report is not
        if "/predictions/" not in key and "/input/" not in key and not key.endswith(
                ("manifest.json", "config.yaml", ".batch-classify")):
            fs.rm(key)
    with mounted() as mounts:
        disk = mounts.tmpfs(tmp_path / "scratch", "2m")
        staging = disk / "staging"
        attach(url, s3.options(), str(staging)).pull()  # what the job would pull: already here
        mounts.resize(disk, used_bytes(disk) + 12 * 1024)  # no room for the report
        args[-1] = str(staging)
        result = run_job(args, expect_ok=False)
    assert result.returncode == OUTPUT_FAULT_EXIT_STATUS, result.stdout + result.stderr
    text = result.stdout + result.stderr
    lines = [line for line in text.splitlines() if line.startswith("batch-classify:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"the staging folder {staging} of output.dir {url} is full (ENOSPC" in lines[0], lines[0]
    assert f"units committed in {url}: 3 of 3" in lines[0], lines[0]
    fs.invalidate_cache()
    for key in fs.find("outputs/full"):
        assert fs.info(key)["size"] > 0, key  # no empty (or partial) file was sent
    assert not fs.exists("outputs/full/per_class.csv") and not fs.exists("outputs/full/report.md")


def test_every_rank_checks_the_lease_before_each_unit_it_sends(
        s3, tiny_models, in_store, local_tars, tmp_path):
    from batch_classify.output.remote import HELD_FILE, LEASE

    url = "s3://outputs/two-ranks"
    args = _args(s3, tiny_models, in_store, url, tmp_path / "staging")
    s3.faults.requests.clear()
    run_job(args, processes=2)
    heads = [path for method, path, _ in s3.faults.requests if method == "HEAD" and path.endswith(LEASE)]
    assert len(heads) >= 3, heads  # one before each of the 3 units, whichever rank sent it
    fs = s3.filesystem()
    assert not fs.exists(f"outputs/two-ranks/{LEASE}") and not (tmp_path / "staging" / HELD_FILE).exists()
    rows, local = _bucket_rows(s3, "outputs/two-ranks", tmp_path), read_rows(local_tars)
    assert {i: r["topk_ids"] for i, r in rows.items()} == {i: r["topk_ids"] for i, r in local.items()}
