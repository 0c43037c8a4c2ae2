"""Outputs in an object store (output.dir s3://...), against moto's S3 server on localhost behind
a proxy that can slow uploads: a job killed mid-run leaves only whole unit files there, a
resume from another staging folder finishes with nothing lost or doubled, and a second job is
refused by the first one's lease. The fixtures are in tests/conftest.py."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from background import Background
from conftest import read_rows, run_job
from object_servers import compared

from batch_classify.commands.cli import main as cli_main
from batch_classify.output import remote as remote_module
from batch_classify.output.remote import LEASE, OutputElsewhere, attach


def test_outputs_in_a_bucket_survive_a_kill_with_nothing_lost_doubled_or_partial(
        in_store, s3, tiny_models, tmp_path, monkeypatch, local_tars):
    model, url = tiny_models["beit"], "s3://outputs/run"
    fs = s3.filesystem()
    if not fs.exists("outputs"):
        fs.mkdir("outputs")
    args = ["--model.name", str(model), "--data.path", str(in_store["local"] / "wds"), "--output.dir", url,
            "--output.storage_options", json.dumps(s3.options()),
            "--output.staging", str(tmp_path / "staging")]
    s3.faults.put_delay_s, s3.faults.put_pattern = 1.5, re.compile("/outputs/run/predictions/")
    try:
        job = Background(args, processes=1)
        deadline = time.monotonic() + 120
        while not fs.glob("outputs/run/predictions/unit-*.parquet", refresh=True):
            assert time.monotonic() < deadline and job.process.poll() is None, "".join(job.log)
            time.sleep(0.1)
        os.killpg(job.process.pid, signal.SIGKILL)
        job.process.wait()
    finally:
        s3.faults.put_delay_s = 0.0
    committed = fs.glob("outputs/run/predictions/*", refresh=True)
    assert 1 <= len(committed) < 3, committed  # killed mid-run
    for key in committed:  # every object there is a whole unit file
        assert pq.read_table(io.BytesIO(fs.cat_file(key))).num_rows == 5
    assert fs.exists("outputs/run/.lease.json")  # the killed job's
    # Resumed from another staging folder (another machine): what the bucket holds is its start.
    args[-1] = str(tmp_path / "staging-2")
    resumed = run_job(args)
    assert "resuming" in resumed.stderr and "taking over the lease" in resumed.stderr
    assert not fs.exists("outputs/run/.lease.json")
    for name in ("manifest.json", "metrics.json", "config.yaml", "input/listing.json", "input/units.parquet"):
        assert fs.exists(f"outputs/run/{name}"), name
    copy = tmp_path / "copy"
    fs.get("outputs/run/predictions", str(copy / "predictions"), recursive=True)
    rows = read_rows(copy)  # fails on an id written twice
    assert compared(rows) == compared(read_rows(local_tars))
    monkeypatch.setenv("BATCH_CLASSIFY_STORAGE_OPTIONS", json.dumps(s3.options()))
    monkeypatch.setenv("BATCH_CLASSIFY_CACHE", str(tmp_path / "cache"))
    assert cli_main(["verify", url]) == 0
    assert cli_main(["aggregate", url]) == 0
    assert cli_main(["compare", url, str(local_tars)]) == 0


def test_a_second_job_on_an_output_in_a_bucket_is_refused(s3, tmp_path, monkeypatch):
    fs = s3.filesystem()
    if not fs.exists("outputs"):
        fs.mkdir("outputs")
    fs.pipe(f"outputs/held/{LEASE}", json.dumps({"host": "node-7", "pid": 4242, "since": 0}).encode())
    remote = attach("s3://outputs/held", s3.options(), str(tmp_path / "staging"))
    with pytest.raises(OutputElsewhere, match=r"in use by another job \(pid 4242 on node-7 since 1970"):
        remote.acquire()
    fs.rm(f"outputs/held/{LEASE}")
    remote.acquire()
    assert json.loads(fs.cat(f"outputs/held/{LEASE}"))["pid"] == os.getpid()
    other = attach("s3://outputs/held", s3.options(), str(tmp_path / "other"))
    with monkeypatch.context() as patch:  # a job on another host, while this one holds the lease
        patch.setattr(remote_module.socket, "gethostname", lambda: "elsewhere")
        with pytest.raises(OutputElsewhere, match="in use by another job"):
            other.acquire()
    remote.release()
    assert not fs.exists(f"outputs/held/{LEASE}")


def test_a_unit_the_store_refuses_is_one_line_and_stays_committed_in_staging(s3, tmp_path, monkeypatch):
    from batch_classify.core import storage
    from batch_classify.output.remote import OutputStoreError

    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    fs = s3.filesystem()
    if not fs.exists("outputs"):
        fs.mkdir("outputs")
    remote = attach("s3://outputs/refused", s3.options(), str(tmp_path / "staging"))
    unit = remote.local / "predictions" / "unit-000000.parquet"
    unit.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"]}), unit)  # a whole Parquet file (no other is sent)
    s3.faults.set(["always-503"], "/outputs/refused/", methods=("PUT",))
    try:
        with pytest.raises(OutputStoreError, match=(
                r"output.dir s3://outputs/refused: unit-000000.parquet could not be committed there "
                r"\(StoreError: .*still failing after 6 tries.*SlowDown.*\); it is committed in the "
                r"staging folder .*the same command run again sends it")):
            remote.publish(unit, create_only=True)
    finally:
        s3.faults.set([], methods=("GET",))
    assert not fs.exists("outputs/refused/predictions/unit-000000.parquet")  # nothing partial either
    assert remote.push() == 1
    assert fs.cat("outputs/refused/predictions/unit-000000.parquet") == unit.read_bytes()
