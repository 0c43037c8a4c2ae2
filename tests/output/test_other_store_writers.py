"""Conditional writes and the lease on gs:// and az:// against their emulators on localhost
(fake-gcs-server with gcsfs: ifGenerationMatch; Azurite with adlfs: If-Match / If-None-Match on
the ETag; fixtures in tests/conftest.py): a create only where absent, a replace and a delete only
at the version named, a fresh HEAD after a write, and one winner of a lease takeover race."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading

import pytest

from batch_classify.core import storage
from batch_classify.core.storage import (
    VersionChanged,
    delete_if_match,
    fresh_info,
    put_if_absent,
    put_if_match,
    store_for,
    version_tag,
)
from batch_classify.output import remote as remote_module
from batch_classify.output.remote import LEASE, OutputElsewhere, attach


@pytest.fixture(scope="module", params=["gcs", "azure"])
def emulated(request):
    """One emulator (the module's tests run once for each)."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)


def _bucket(emulated, name: str = "outputs"):
    fs = emulated.filesystem()
    if not fs.exists(name):
        fs.mkdir(name)
    return fs


def _dead_pid() -> int:
    """A pid of this host that no longer runs (a child that has exited and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_creates_replaces_and_deletes_happen_only_at_the_version_named(emulated, fast):
    fs = _bucket(emulated)
    url = f"{emulated.scheme}://outputs/conditional/a.json"
    store = store_for(url, emulated.options())
    first = put_if_absent(store, url, b"first")
    with pytest.raises(FileExistsError):
        put_if_absent(store, url, b"second")
    seen = fresh_info(store, url)
    assert seen is not None and seen["size"] == 5
    assert first is None or first == version_tag(seen)
    tag = version_tag(seen)
    assert tag
    newer = put_if_match(store, url, b"replaced", tag)
    now = fresh_info(store, url)
    assert now is not None and now["size"] == 8 and version_tag(now) not in (None, tag)
    assert newer == version_tag(now)  # the store's answer names the new version
    assert fs.cat_file("outputs/conditional/a.json") == b"replaced"
    with pytest.raises(VersionChanged, match=f"{url}: refused, the object is not at the version seen"):
        put_if_match(store, url, b"stale", tag)
    assert fs.cat_file("outputs/conditional/a.json") == b"replaced"
    with pytest.raises(VersionChanged):  # gone: not the version named either
        put_if_match(store, f"{emulated.scheme}://outputs/conditional/none.json", b"x", tag)
    store.fs.ls("outputs/conditional", detail=True)  # the client's listing cache holds this version
    fs.pipe_file("outputs/conditional/a.json", b"from elsewhere")  # another client's write
    now = fresh_info(store, url)
    assert now is not None and now["size"] == 14 and version_tag(now) != newer
    delete_if_match(store, url, version_tag(now))
    assert fresh_info(store, url) is None
    delete_if_match(store, url, version_tag(now))  # already gone: no error


def test_a_delete_at_a_stale_version_is_refused(emulated, fast):
    if emulated.scheme == "gs":
        pytest.skip("fake-gcs-server ignores ifGenerationMatch on DELETE (real GCS honours it: 412)")
    _bucket(emulated)
    url = f"{emulated.scheme}://outputs/conditional/b.json"
    store = store_for(url, emulated.options())
    put_if_absent(store, url, b"first")
    stale = version_tag(fresh_info(store, url))
    put_if_match(store, url, b"second", stale)
    with pytest.raises(VersionChanged):
        delete_if_match(store, url, stale)
    assert fresh_info(store, url) is not None


def test_two_jobs_taking_over_a_dead_jobs_lease_at_once_leave_exactly_one_running(emulated, tmp_path,
                                                                                   monkeypatch):
    fs = _bucket(emulated)
    dead = {"host": socket.gethostname(), "pid": _dead_pid(), "since": 0, "token": "dead"}
    fs.pipe_file(f"outputs/race/{LEASE}", json.dumps(dead).encode())
    # Both read the dead job's lease before either replaces it: the replace decides.
    both_read, real_gone, seen = threading.Barrier(2, timeout=30), remote_module._gone, threading.local()

    def gone_once_both_have_read(holder):
        if not getattr(seen, "done", False):
            seen.done = True
            both_read.wait()
        return real_gone(holder)

    monkeypatch.setattr(remote_module, "_gone", gone_once_both_have_read)
    url = f"{emulated.scheme}://outputs/race"
    jobs = [attach(url, emulated.options(), str(tmp_path / f"staging-{i}")) for i in range(2)]
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
    winners = [i for i in range(2) if outcome.get(i) is None and i in outcome]
    assert len(winners) == 1, outcome
    winner, loser = jobs[winners[0]], jobs[1 - winners[0]]
    refusal = outcome[1 - winners[0]]
    assert isinstance(refusal, OutputElsewhere) and not loser.held, refusal
    assert f"in use by another job (pid {os.getpid()} on {socket.gethostname()}" in str(refusal)
    fs.invalidate_cache()
    lease = json.loads(fs.cat_file(f"outputs/race/{LEASE}"))
    assert lease["token"] == winner.lease[1] and lease["staging"] == str(winner.local)
    winner.release()
    fs.invalidate_cache()
    assert not fs.exists(f"outputs/race/{LEASE}")


def _parquet(tag: str) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({"id": [f"{tag}{i}" for i in range(3)]}), sink)
    return sink.getvalue()


def test_a_unit_object_there_is_kept_when_whole_and_replaced_when_damaged(emulated, tmp_path, fast):
    """A unit's create-only PUT refused: a fresh HEAD, not the listing cache, says what is there;
    the same bytes are kept (no PUT), other bytes of the same size replaced at the version found."""
    fs = _bucket(emulated)
    job = attach(f"{emulated.scheme}://outputs/units", emulated.options(), str(tmp_path / "staging"))
    folder = job.local / "predictions"
    folder.mkdir(parents=True)
    for unit in (0, 1):
        (folder / f"unit-00000{unit}.parquet").write_bytes(_parquet(str(unit)))
    job.publish(folder / "unit-000001.parquet", create_only=True)
    job.store.fs.ls("outputs/units/predictions")  # the client's listing cache: unit 0 absent
    key = "outputs/units/predictions/unit-000000.parquet"
    committed = (folder / "unit-000000.parquet").read_bytes()
    fs.pipe_file(key, committed)  # from elsewhere (a PUT whose answer was lost)
    there = version_tag(fs.info(key))
    job.publish(folder / "unit-000000.parquet", create_only=True)
    fs.invalidate_cache()
    assert version_tag(fs.info(key)) == there  # the same bytes: left as they are
    damaged = bytearray(committed)
    damaged[len(damaged) // 2] ^= 0xFF  # same size, one byte other
    fs.pipe_file(key, bytes(damaged))
    job.publish(folder / "unit-000000.parquet", create_only=True)
    fs.invalidate_cache()
    assert fs.cat_file(key) == committed
