"""Objects read at the version listed, URL inputs checked on resume, a deadline per request,
and every read path under the same faults, against moto's S3 server and a Range-capable HTTP
server behind the fault proxy (tests/object_servers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_rows, run_job
from fixtures_wds import jpeg, make_wds, tiny_image
from object_servers import RangeFiles, store_job
from PIL import Image

from batch_classify.core import storage
from batch_classify.core.config import DataConfig
from batch_classify.core.storage import ObjectChanged, StoreError, request_counts, store_for
from batch_classify.inputs.listing import input_changes, load_items, write_listing


def _tar(folder: Path, first_label: int) -> bytes:
    """A tar of 5 noisy samples (over 2 blocks of 64 KiB) labelled first_label...; 100 and 905
    give tars of one size, other bytes."""
    rng = np.random.default_rng(0)
    images = [(f"k{i}", Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)), first_label + i)
              for i in range(5)]
    return make_wds(folder, images, per_tar=5)[0].read_bytes()


def _bucket(s3):
    """The S3 server's filesystem (straight to moto), with the bucket made."""
    fs = s3.filesystem()
    if not fs.exists("bucket"):
        fs.mkdir("bucket")
    return fs


def _said(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("batch-classify: ")]


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)


# ------------------------------------------------------------------ rule: one version per object


def test_a_tar_replaced_between_its_ranged_gets_is_refused_not_mixed(s3, tmp_path, fast):
    old, new = _tar(tmp_path / "a", 100), _tar(tmp_path / "b", 905)
    assert len(old) == len(new) and old != new
    fs = _bucket(s3)
    fs.pipe("bucket/versions/one.tar", old)
    url = "s3://bucket/versions/one.tar"
    store = store_for(url, s3.options(block_size=1 << 16))
    pin = store.find_objects("s3://bucket/versions")[url]
    assert pin.size == len(old) and pin.etag
    s3.faults.set([], "versions/")
    s3.faults.replace_after("versions/one.tar", 1, lambda: fs.pipe("bucket/versions/one.tar", new))
    reader = store.open(url, pin=pin)
    assert reader.read(1 << 16) == old[:1 << 16]  # the first GET, answered before the replacement
    with pytest.raises(ObjectChanged, match=r"s3://bucket/versions/one.tar changed since it was listed "
                       rf"\(ETag {pin.etag}, {len(old)} bytes then, ETag .* now\)"):
        reader.read()
    # Unpinned, the same reader would have gone on in the new version: the pin is what refuses it.
    assert store.open(url).read()[1 << 16:] == new[1 << 16:]
    # A whole read and a batch of whole reads are pinned the same way.
    with pytest.raises(ObjectChanged):
        store.read(url, pin)
    assert isinstance(store.read_many([url], {url: pin})[url], ObjectChanged)


def test_https_reads_are_pinned_by_if_match(tmp_path, fast):
    folder = tmp_path / "site"
    folder.mkdir()
    old, new = _tar(tmp_path / "a", 100), _tar(tmp_path / "b", 905)
    (folder / "one.tar").write_bytes(old)
    server = RangeFiles(folder)
    try:
        url = server.url + "/one.tar"
        store = store_for(url, {"block_size": 1 << 16})
        pin = store.object_info(url)
        assert pin.etag and pin.size == len(old)
        server.faults.replace_after("one.tar", 1, lambda: (folder / "one.tar").write_bytes(new))
        reader = store.open(url, pin=pin)
        assert reader.read(1 << 16) == old[:1 << 16]
        with pytest.raises(ObjectChanged, match="changed since it was listed"):
            reader.read()
    finally:
        server.close()


def test_a_parquet_file_replaced_between_two_of_its_units_is_refused(s3, tmp_path, fast):
    def table(labels: list[int]) -> Path:
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        cells = [{"bytes": jpeg(tiny_image(i, (30, 30))), "path": None} for i in range(6)]
        path = tmp_path / f"t{labels[0]}.parquet"
        pq.write_table(pa.table({"image": pa.array(cells, image_type), "label": labels}), path,
                       row_group_size=2)
        return path
    old, new = table([100 + i for i in range(6)]), table([905 + i for i in range(6)])
    url = s3.upload(old, "bucket", "pversions/t.parquet")
    listing = write_listing(DataConfig(path=url, storage_options=s3.options()), tmp_path / "out", unit_size=2)
    assert listing.n_units == 3
    assert [r.label for r in listing.records(0)] == [100, 101]
    s3.upload(new, "bucket", "pversions/t.parquet")
    with pytest.raises(ObjectChanged, match=f"{url} changed since it was listed"):
        list(listing.records(1))
    change = input_changes(listing, DataConfig(path=url, storage_options=s3.options()))
    assert change is not None and "1 object(s) replaced, e.g. " + url in change.describe()


def test_a_tar_replaced_mid_job_stops_its_unit_uncommitted_and_overwrite_relists(s3, tiny_models, tmp_path):
    fs = _bucket(s3)
    for name in ("00000", "00001"):
        fs.pipe(f"bucket/midjob/{name}.tar", _tar(tmp_path / name, 100 if name == "00000" else 300))
    new = _tar(tmp_path / "new", 905)
    model, out = tiny_models["beit"], tmp_path / "out"
    options = s3.options(block_size=1 << 16)
    s3.faults.set([], "midjob/")
    s3.faults.replace_after("midjob/00001.tar", 1, lambda: fs.pipe("bucket/midjob/00001.tar", new))
    failed = store_job(model, "s3://bucket/midjob", out, options, expect_ok=False)
    assert failed.returncode == 2, failed.stderr[-3000:]
    said = _said(failed)
    assert len(said) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert "s3://bucket/midjob/00001.tar changed since it was listed" in said[0]
    assert "set output.overwrite true to list it again" in said[0]
    rows = read_rows(out)
    assert {row["label"] for row in rows.values()} == set(range(100, 105))  # 00001's unit not committed
    again = store_job(model, "s3://bucket/midjob", out, options, expect_ok=False)
    assert again.returncode == 2 and "object(s) replaced" in _said(again)[0], again.stderr[-2000:]
    run_job(["--model.name", str(model), "--data.path", "s3://bucket/midjob", "--output.dir", str(out),
             "--data.storage_options", json.dumps(options), "--output.overwrite", "true"])
    rows = read_rows(out)
    assert sorted(row["label"] for row in rows.values()) == [*range(100, 105), *range(905, 910)]


def test_a_list_object_and_the_images_it_names_are_pinned_and_checked(corpus, s3, tmp_path, fast):
    url = s3.upload(corpus, "bucket", "list-corpus")
    fs = _bucket(s3)
    names = sorted(path.split("/", 1)[1] for path in fs.find("bucket/list-corpus"))[:4]
    fs.pipe("bucket/list-corpus.txt", ("\n".join(names) + "\n").encode())
    cfg = DataConfig(path="s3://bucket/list-corpus.txt", storage_options=s3.options())
    listing = write_listing(cfg, tmp_path / "out", unit_size=4)
    assert input_changes(listing, cfg) is None
    assert [r.payload for r in listing.records(0)] == [fs.cat(f"bucket/{name}") for name in names]
    first = f"bucket/{names[0]}"
    fs.pipe(first, fs.cat(f"bucket/{names[1]}"))  # the image replaced after listing
    with pytest.raises(ObjectChanged, match=f"s3://{first} changed since it was listed"):
        list(listing.records(0))
    change = input_changes(listing, cfg)
    assert change is not None and f"1 object(s) replaced, e.g. s3://{first}" in change.describe()
    fs.pipe("bucket/list-corpus.txt", ("\n".join(names[:3]) + "\n").encode())  # the list edited
    assert "s3://bucket/list-corpus.txt" in input_changes(listing, cfg).describe()
    assert url


# ------------------------------------------------------------------ rule: resume checks a URL input


def test_a_changed_prefix_refuses_the_resume_in_one_line(s3, corpus, tiny_models, tmp_path):
    url = s3.upload(corpus, "bucket", "resume-corpus")
    fs = _bucket(s3)
    model, out = tiny_models["beit"], tmp_path / "out"
    store_job(model, url, out, s3.options())
    resumed = store_job(model, url, out, s3.options())
    assert "resuming" in resumed.stderr
    first = sorted(fs.find("bucket/resume-corpus"))[0]
    cases = {"added": lambda: fs.pipe(first.rsplit("/", 1)[0] + "/zz-new.jpg", fs.cat(first)),
             "gone": lambda: fs.rm(first)}
    data = fs.cat(first)
    for what, change in cases.items():
        change()
        refused = store_job(model, url, out, s3.options(), expect_ok=False)
        said = _said(refused)
        assert refused.returncode == 2 and len(said) == 1, refused.stderr[-2000:]
        assert f"1 object(s) {what}" in said[0] and "output.overwrite true" in said[0]
        if what == "added":
            fs.rm(first.rsplit("/", 1)[0] + "/zz-new.jpg")
        else:
            fs.pipe(first, data)
    store_job(model, url, out, s3.options())  # restored: resumes


def test_a_tar_of_the_same_size_with_other_bytes_refuses_the_resume(s3, tiny_models, tmp_path):
    fs = _bucket(s3)
    fs.pipe("bucket/same-size/00000.tar", _tar(tmp_path / "a", 100))
    model, out = tiny_models["beit"], tmp_path / "out"
    store_job(model, "s3://bucket/same-size", out, s3.options())
    fs.pipe("bucket/same-size/00000.tar", _tar(tmp_path / "b", 905))
    refused = store_job(model, "s3://bucket/same-size", out, s3.options(), expect_ok=False)
    said = _said(refused)
    assert refused.returncode == 2 and len(said) == 1, refused.stderr[-2000:]
    assert "1 object(s) replaced, e.g. s3://bucket/same-size/00000.tar (ETag" in said[0]


def test_the_resume_check_lists_and_never_reads(s3, tmp_path):
    """The check of a listing of 3000 objects: LIST requests only (counted at the proxy)."""
    fs = _bucket(s3)
    n = 3000
    fs.pipe({f"bucket/many/c{i % 10}/i{i:05d}.jpg": b"x" for i in range(n)})
    cfg = DataConfig(path="s3://bucket/many", storage_options=s3.options())
    listing = write_listing(cfg, tmp_path / "out")
    assert listing.n_items == n
    s3.faults.set([], "many")
    before = len(s3.faults.requests)
    assert input_changes(listing, cfg) is None
    requests = s3.faults.requests[before:]
    assert requests and all(method == "GET" and "list-type=2" in path for method, path, _ in requests)
    assert len(requests) == n // 1000  # one page of 1000 keys per LIST


# ------------------------------------------------------------------ rule: a deadline per request


def test_a_trickling_body_is_cut_off_at_its_deadline_and_retried(in_store, s3, fast):
    url = in_store["wds"] + "/00001.tar"
    local = (in_store["local"] / "wds" / "00001.tar").read_bytes()
    store = store_for(url, s3.options(request_timeout_s=1, min_rate=1 << 20))
    s3.faults.trickle_s = 0.5
    s3.faults.set(["trickle"], "wds/00001.tar")
    assert store.open(url).read() == local
    assert s3.faults.done["trickle"] == 1
    s3.faults.set(["always-trickle"], "wds/00001.tar")
    with pytest.raises(StoreError, match=r"still failing after \d+ tries \(timeout: RequestDeadline"):
        store.open(url).read()
    s3.faults.set([], "wds/00001.tar")


def test_an_always_trickling_tar_fails_its_unit_in_one_line(in_store, s3, tiny_models, tmp_path):
    s3.faults.trickle_s = 0.5
    s3.faults.set(["always-trickle"], "wds/00002.tar")
    failed = store_job(tiny_models["beit"], in_store["wds"], tmp_path / "out",
                       s3.options(request_timeout_s=0.5), expect_ok=False)
    s3.faults.set([], "wds/00002.tar")
    said = _said(failed)
    assert failed.returncode == 2 and len(said) == 1, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    assert "s3://bucket/wds/00002.tar" in said[0] and "no complete answer within" in said[0]
    assert len(read_rows(tmp_path / "out")) == 10  # the other two tars committed


# ------------------------------------------------------------------ rule: every read path, every fault


@pytest.mark.parametrize("fault", ["503", "drop", "stall", "trickle"])
def test_parquet_from_a_bucket_reads_the_rows_of_local_files_under_faults(in_store, s3, fault, fast):
    s3.faults.trickle_s = 0.5
    options = s3.options(request_timeout_s=1)
    local = load_items(DataConfig(path=str(in_store["local"] / "tables")))
    s3.faults.set([fault] * 3, "tables/train-0000")  # the footers' GETs, then row groups'
    remote = load_items(DataConfig(path=in_store["tables"], storage_options=options))
    assert s3.faults.done[fault] == 3
    s3.faults.set([fault, "503", fault], "tables/train-00001")  # a unit's footer and column chunks
    again = load_items(DataConfig(path=in_store["tables"], storage_options=options))
    s3.faults.set([], "tables/")
    for items in (remote, again):
        assert (items.ids, items.labels, items.payloads) == (local.ids, local.labels, local.payloads)


@pytest.mark.parametrize("fault", ["503", "drop", "stall", "trickle", "corrupt"])
def test_images_from_a_bucket_are_the_local_files_under_faults(corpus, s3, fault, fast):
    url = "s3://bucket/fault-corpus"
    if not _bucket(s3).exists("bucket/fault-corpus"):
        s3.upload(corpus, "bucket", "fault-corpus")
    s3.faults.trickle_s = 0.5
    local = load_items(DataConfig(path=str(corpus)))
    s3.faults.set([fault] * 3, r"fault-corpus/n\d+/")
    before = request_counts().get("get", 0)
    remote = load_items(DataConfig(path=url, storage_options=s3.options(request_timeout_s=1)))
    assert s3.faults.done[fault] == 3
    s3.faults.set([], "fault-corpus/")
    assert (remote.ids, remote.labels) == (local.ids, local.labels)
    assert remote.payloads == [Path(path).read_bytes() for path in local.payloads]
    assert request_counts()["get"] - before >= len(local.ids) + 3  # the faulted GETs were tried again


def test_a_store_without_conditional_reads_is_checked_by_a_fresh_head():
    """memory:// stands for the stores whose reads cannot carry a version (hf://, others)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/versions/x.bin", b"a" * 100)
    store = store_for("memory://versions", {})
    [(url, pin)] = store.find_objects("memory://versions").items()
    assert not store.pins_reads(pin)
    assert store.open(url, pin=pin).read() == b"a" * 100
    store.check(url, pin)  # unchanged: passes
    fs.pipe("/versions/x.bin", b"b" * 101)
    with pytest.raises(ObjectChanged, match="100 bytes then, 101 bytes now"):
        store.check(url, pin)
    fs.rm("/versions/x.bin")
    with pytest.raises(ObjectChanged, match="gone now"):
        store.check(url, pin)
