"""One writer per output in a store, and a bucket that converges to what the job committed: the
lease taken over only at the version seen, a lost lease stopping its job, a refused create
answered by a fresh HEAD, a unit object with other bytes replaced at the version found, no
file sent unless whole, completion markers sent after what they mark, and a pull that notices
an object changed in the store. Against moto's S3 server behind the fault proxy
(tests/object_servers.py); job-level cases are in test_store_convergence.py."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_classify.core import storage
from batch_classify.output import remote as remote_module
from batch_classify.output.remote import LEASE, LeaseLost, NotWhole, OutputElsewhere, attach


def _bucket(s3):
    fs = s3.filesystem()
    if not fs.exists("outputs"):
        fs.mkdir("outputs")
    return fs


def _parquet(n: int = 3, tag: str = "a") -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": [f"{tag}{i}" for i in range(n)]}), sink)
    return sink.getvalue()


def _dead_pid() -> int:
    """A pid of this host that no longer runs (a child that has exited and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _methods(s3, path: str) -> list[str]:
    return [method for method, seen, _ in s3.faults.requests if seen.split("?")[0].endswith(path)]


def test_two_jobs_taking_over_a_dead_jobs_lease_at_once_leave_exactly_one_running(s3, tmp_path, monkeypatch):
    fs = _bucket(s3)
    dead = {"host": socket.gethostname(), "pid": _dead_pid(), "since": 0, "token": "dead"}
    fs.pipe(f"outputs/race/{LEASE}", json.dumps(dead).encode())
    # Both read the dead job's lease before either replaces it: the replace decides.
    both_read, real_gone, seen = threading.Barrier(2, timeout=30), remote_module._gone, threading.local()

    def gone_once_both_have_read(holder):
        if not getattr(seen, "done", False):
            seen.done = True
            both_read.wait()
        return real_gone(holder)

    monkeypatch.setattr(remote_module, "_gone", gone_once_both_have_read)
    jobs = [attach("s3://outputs/race", s3.options(), str(tmp_path / f"staging-{i}")) for i in range(2)]
    outcome: dict[int, BaseException | None] = {}

    def take(index: int) -> None:
        try:
            jobs[index].acquire()
            outcome[index] = None
        except BaseException as error:  # the loser's, compared below
            outcome[index] = error

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [i for i in range(2) if outcome[i] is None]
    assert len(winners) == 1, outcome
    winner, loser = jobs[winners[0]], jobs[1 - winners[0]]
    refusal = outcome[1 - winners[0]]
    assert isinstance(refusal, OutputElsewhere) and not loser.held
    assert f"in use by another job (pid {os.getpid()} on {socket.gethostname()}" in str(refusal)
    assert "\n" not in str(refusal)
    lease = json.loads(fs.cat(f"outputs/race/{LEASE}"))
    assert lease["token"] == winner.lease[1] and lease["staging"] == str(winner.local)
    winner.release()
    assert not fs.exists(f"outputs/race/{LEASE}")


def test_a_job_whose_lease_was_taken_stops_before_sending_more_and_leaves_the_new_lease(s3, tmp_path):
    fs = _bucket(s3)
    job = attach("s3://outputs/lost", s3.options(), str(tmp_path / "staging"))
    job.acquire()
    unit = job.local / "predictions" / "unit-000000.parquet"
    unit.parent.mkdir(parents=True)
    unit.write_bytes(_parquet())
    job.publish(unit, create_only=True)  # while it holds the lease: sent
    # Someone deleted the lease by hand, and a job on another host took the output.
    other = {"host": "node-9", "pid": 77, "since": 0, "token": "other"}
    fs.pipe(f"outputs/lost/{LEASE}", json.dumps(other).encode())
    second = job.local / "predictions" / "unit-000001.parquet"
    second.write_bytes(_parquet(tag="b"))
    with pytest.raises(LeaseLost, match=r"no longer holds the lease .*it is now held by pid 77 on node-9.*"
                                         r"unit-000001.parquet is committed in the staging folder"):
        job.publish(second, create_only=True)
    assert not fs.exists("outputs/lost/predictions/unit-000001.parquet")
    assert not job.held
    job.release()  # not its lease any more: left alone
    assert json.loads(fs.cat(f"outputs/lost/{LEASE}"))["token"] == "other"
    # A rank in another process finds the lease in the staging folder and checks it the same way.
    rank = remote_module.RemoteOutput(job.url, job.local, s3.options())
    with pytest.raises(LeaseLost):
        rank.publish(second, create_only=True)


def test_release_deletes_the_lease_only_at_the_version_this_job_wrote(s3, tmp_path):
    fs = _bucket(s3)
    job = attach("s3://outputs/release", s3.options(), str(tmp_path / "staging"))
    job.acquire()
    # Replaced meanwhile with a body naming the same job (same token): the version differs.
    body = fs.cat(f"outputs/release/{LEASE}")
    fs.pipe(f"outputs/release/{LEASE}", body + b" ")
    s3.faults.requests.clear()
    job.release()
    assert fs.exists(f"outputs/release/{LEASE}")  # the conditional DELETE was refused
    assert "DELETE" in _methods(s3, f"/outputs/release/{LEASE}")


def test_a_refused_create_is_answered_by_a_fresh_head_not_the_listing_cache(s3, tmp_path):
    fs = _bucket(s3)
    job = attach("s3://outputs/fresh", s3.options(), str(tmp_path / "staging"))
    folder = job.local / "predictions"
    folder.mkdir(parents=True)
    for unit in (0, 1):
        (folder / f"unit-00000{unit}.parquet").write_bytes(_parquet(tag=str(unit)))
    job.publish(folder / "unit-000001.parquet", create_only=True)
    job.store.fs.ls("outputs/fresh/predictions")  # the client's listing cache: unit 0 absent
    # Unit 0 lands in the bucket from elsewhere (a PUT whose answer was lost, another staging
    # folder): the same bytes are kept as they are; other bytes are replaced.
    fs.pipe("outputs/fresh/predictions/unit-000000.parquet", (folder / "unit-000000.parquet").read_bytes())
    s3.faults.requests.clear()
    job.publish(folder / "unit-000000.parquet", create_only=True)
    assert _methods(s3, "/outputs/fresh/predictions/unit-000000.parquet") == ["PUT", "HEAD"]
    damaged = bytearray((folder / "unit-000000.parquet").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, one byte other
    fs.pipe("outputs/fresh/predictions/unit-000000.parquet", bytes(damaged))
    s3.faults.requests.clear()
    job.publish(folder / "unit-000000.parquet", create_only=True)
    committed = (folder / "unit-000000.parquet").read_bytes()
    assert fs.cat("outputs/fresh/predictions/unit-000000.parquet") == committed
    assert _methods(s3, "/outputs/fresh/predictions/unit-000000.parquet") == ["PUT", "HEAD", "PUT"]


def test_a_replace_is_refused_at_any_version_but_the_one_named(s3):
    fs = _bucket(s3)
    store = storage.store_for("s3://outputs/versions", s3.options())
    url = "s3://outputs/versions/object"
    first = storage.put_if_absent(store, url, b"one")
    with pytest.raises(FileExistsError):
        storage.put_if_absent(store, url, b"two")
    second = storage.put_if_match(store, url, b"two", first)
    with pytest.raises(storage.VersionChanged):
        storage.put_if_match(store, url, b"three", first)
    with pytest.raises(storage.VersionChanged):
        storage.delete_if_match(store, url, first)
    assert fs.cat("outputs/versions/object") == b"two"
    assert storage.fresh_info(store, url)["size"] == 3
    storage.delete_if_match(store, url, second)
    assert storage.fresh_info(store, url) is None
    with pytest.raises(storage.VersionChanged):  # gone: not at the version named either
        storage.put_if_match(store, url, b"four", second)


def test_no_staging_file_is_sent_unless_whole(s3, tmp_path):
    fs = _bucket(s3)
    job = attach("s3://outputs/whole", s3.options(), str(tmp_path / "staging"))
    job.acquire()
    (job.local / "predictions").mkdir(parents=True)
    whole = _parquet()
    (job.local / "predictions" / "unit-000000.parquet").write_bytes(whole)
    (job.local / "predictions" / "unit-000001.parquet").write_bytes(whole[:-7])  # cut short
    body = bytearray(whole)
    body[-12:-8] = b"\xff\xff\xff\x7f"  # the footer's length: magic at both ends, a footer that lies
    (job.local / "predictions" / "unit-000002.parquet").write_bytes(bytes(body))
    (job.local / "per_class.csv").write_bytes(b"")  # a write that a full disk ended
    (job.local / "manifest.json").write_text("{}")
    with pytest.raises(NotWhole, match="was not sent there: ") as refused:
        job.push()
    assert "\n" not in str(refused.value)
    sent = {key.rsplit("/", 1)[-1] for key in fs.find("outputs/whole")}
    assert sent == {"unit-000000.parquet", "manifest.json", LEASE}, sent
    for bad in ("unit-000001.parquet", "unit-000002.parquet"):
        with pytest.raises(NotWhole):
            job.publish(job.local / "predictions" / bad, create_only=True)
    job.release()


def test_completion_markers_go_up_after_what_they_mark(s3, tmp_path):
    fs = _bucket(s3)
    job = attach("s3://outputs/order", s3.options(), str(tmp_path / "staging"))
    job.acquire()
    files = {"input/listing.json": b"{}", "input/units.parquet": _parquet(),
             "input/listing.parquet": _parquet(), "input/state.parquet": _parquet(), "manifest.json": b"{}",
             "config.yaml": b"a: 1\n", "predictions/unit-000000.parquet": _parquet(), "metrics.json": b"{}",
             "timing.json": b"{}", "report.md": b"# r\n", "report.html": b"<p>", "report_files/t.jpg": b"jpg",
             "per_class.csv": b"c\n", ".batch-classify": b"{}"}
    for rel, data in files.items():
        (job.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (job.local / rel).write_bytes(data)
    s3.faults.requests.clear()
    assert job.push(end=False) == 8  # the job's start: the listing, manifest, config and units only
    assert job.push() == 6
    puts = [path.split("?")[0].removeprefix("/outputs/order/") for method, path, _ in s3.faults.requests
            if method == "PUT" and LEASE not in path]
    position = {rel: puts.index(rel) for rel in files}
    assert position[".batch-classify"] == 0  # the marker first: the folder is a job's
    for table in ("input/units.parquet", "input/listing.parquet", "input/state.parquet"):
        assert position[table] < position["input/listing.json"]
    assert position["manifest.json"] < position["predictions/unit-000000.parquet"]
    assert max(position.values()) == position["metrics.json"] and min(position.values()) == 0
    assert all(position[rel] > position["predictions/unit-000000.parquet"] for rel in
               ("timing.json", "report.md", "report.html", "report_files/t.jpg", "per_class.csv"))
    assert job.push() == 0  # nothing changed: nothing sent again (versions compared, no GET)
    job.release()
    assert not fs.exists(f"outputs/order/{LEASE}")


def test_a_pull_notices_an_object_changed_in_the_store_at_the_same_size(s3, tmp_path):
    fs = _bucket(s3)
    job = attach("s3://outputs/pulled", s3.options(), str(tmp_path / "staging"))
    job.acquire()
    (job.local / "predictions").mkdir(parents=True)
    unit = job.local / "predictions" / "unit-000000.parquet"
    unit.write_bytes(_parquet(tag="x"))
    job.push()
    job.release()
    assert job.pull() == 0  # what it sent is what is there
    fs.pipe("outputs/pulled/predictions/unit-000000.parquet", _parquet(tag="y"))  # same size
    other = attach("s3://outputs/pulled", s3.options(), str(tmp_path / "staging"))
    assert other.pull() == 1
    assert unit.read_bytes() == _parquet(tag="y")
    # Without a version noted (another staging folder's file), the MD5 of the bytes decides.
    (tmp_path / "staging" / ".versions.json").unlink()
    fresh = remote_module.RemoteOutput(job.url, job.local, s3.options())
    assert fresh.pull() == 0
    unit.write_bytes(_parquet(tag="z"))
    assert remote_module.RemoteOutput(job.url, job.local, s3.options()).pull() == 1
    assert unit.read_bytes() == _parquet(tag="y")


def test_plan_on_an_output_in_a_store_holds_the_lease_while_it_sends_the_listing(
        s3, corpus, tiny_models, tmp_path, monkeypatch):
    from batch_classify.commands.cli import main as cli_main

    fs, url = _bucket(s3), "s3://outputs/planned"
    monkeypatch.setenv("BATCH_CLASSIFY_CACHE", str(tmp_path / "cache"))
    args = ["plan", "--model.name", str(tiny_models["beit"]), "--data.path", str(corpus),
            "--output.dir", url, "--output.storage_options", json.dumps(s3.options()),
            "--runtime.device", "cpu"]
    # Another live job writes there: plan sends nothing and says who holds it.
    other = attach(url, s3.options(), str(tmp_path / "other"))
    other.acquire()
    try:
        assert cli_main([*args, "--output.staging", str(tmp_path / "a")]) == 2
        assert not fs.exists("outputs/planned/input/listing.json")
    finally:
        other.release()
    s3.faults.requests.clear()
    assert cli_main([*args, "--output.staging", str(tmp_path / "b")]) == 0
    puts = [path for method, path, _ in s3.faults.requests if method == "PUT"]
    assert puts[0].endswith("/" + LEASE)  # taken before anything is sent
    assert any(path.endswith("/input/listing.json") for path in puts)
    assert fs.exists("outputs/planned/input/units.parquet")
    assert not fs.exists(f"outputs/planned/{LEASE}")  # given back
