"""Inputs in object stores, against real servers on localhost with real clients: moto's S3 server
(s3fs), a Range-capable HTTP server (fsspec's HTTP filesystem), and a proxy that injects
faults (a connection dropped mid-object, 503 SlowDown, a stall past the client's timeout,
403, 404). The job over objects must give the rows the same job gives over local copies.
The servers and the collection are fixtures of tests/conftest.py (tests/object_servers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_rows, run_job
from fixtures_wds import jpeg
from object_servers import RangeFiles, compared, store_job
from PIL import Image

from batch_classify.core import storage
from batch_classify.core.config import DataConfig
from batch_classify.core.storage import MAX_TRIES, StoreError, fault_kind, is_url, retry_counts, store_for
from batch_classify.inputs.base import InputError
from batch_classify.inputs.listing import load_items, write_listing
from batch_classify.inputs.parquet import FOOTER_BYTES
from batch_classify.pipeline.loader import UnitTasks
from batch_classify.pipeline.shard import UnitQueue

# ------------------------------------------------------------------ the store layer, no job


def test_urls_and_fault_kinds():
    assert is_url("s3://bucket/a.tar") and is_url("https://host/x.tar") and is_url("hf://datasets/x/y")
    assert not is_url("/data/a.tar") and not is_url("file:///data/a.tar") and not is_url("relative/a")
    assert fault_kind(OSError("Please reduce your request rate. SlowDown")) == "SlowDown"
    assert fault_kind(TimeoutError("read")) == "timeout"
    assert fault_kind(ConnectionResetError("reset by peer")) == "connection"
    assert fault_kind(FileNotFoundError("gone")) is None
    assert fault_kind(PermissionError("Access Denied")) is None
    assert fault_kind(ValueError("bad request")) is None


def test_a_tar_is_read_in_large_ranged_gets_resuming_after_faults(in_store, s3, monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    url = in_store["wds"] + "/00001.tar"
    local = (in_store["local"] / "wds" / "00001.tar").read_bytes()
    store = store_for(url, s3.options(block_size=1 << 16))
    s3.faults.set([], "00001.tar")
    before = s3.faults.gets("00001.tar")
    reader = store.open(url)
    assert reader.read() == local
    assert s3.faults.gets("00001.tar") - before == reader.gets == -(-len(local) // (1 << 16))
    counts = retry_counts()
    s3.faults.set(["503", "503", "drop", "stall"], "00001.tar")
    reader = store.open(url)
    first = reader.read(70_000)  # into the second block: the faults hit it, not the first again
    assert first == local[:70_000] and reader.read() == local[70_000:]
    assert dict(s3.faults.done) == {"503": 2, "drop": 1, "stall": 1}
    after = retry_counts()
    retried = {kind: after[kind] - counts.get(kind, 0) for kind in after}
    assert {kind: n for kind, n in retried.items() if n} == {
        "SlowDown": 2, "connection": 1, "timeout": 1}
    s3.faults.set(["always-503"], "00001.tar")
    with pytest.raises(StoreError, match=f"still failing after {MAX_TRIES} tries"):
        store.open(url).read()
    s3.faults.set([], "00001.tar")


def test_parquet_units_read_only_their_row_groups_and_columns(s3, tmp_path):
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)) for _ in range(8)]
    cells = [{"bytes": jpeg(image), "path": None} for image in noise]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "big").mkdir()
    pq.write_table(pa.table({"image": pa.array(cells, image_type), "label": list(range(8))}),
                   tmp_path / "big" / "big.parquet", row_group_size=2)
    url = s3.upload(tmp_path / "big" / "big.parquet", "bucket", "big/big.parquet")
    listing = write_listing(DataConfig(path=url, storage_options=s3.options()), tmp_path / "out", unit_size=2)
    assert listing.n_units == 4
    unit_images = sum(len(cell["bytes"]) for cell in cells[:2])
    size = (tmp_path / "big" / "big.parquet").stat().st_size
    assert size > FOOTER_BYTES + 2 * unit_images  # the footer's read does not reach unit 0's pages
    s3.faults.set([], "big/")
    sent = s3.faults.sent
    assert [record.id for record in listing.records(0, read_images=False)] == ["0", "1"]
    assert s3.faults.sent - sent <= 2 * FOOTER_BYTES + 4096  # the footer, ids and labels: no image bytes
    sent = s3.faults.sent
    assert [record.payload for record in listing.records(0)] == [cell["bytes"] for cell in cells[:2]]
    fetched = s3.faults.sent - sent
    assert unit_images <= fetched <= unit_images + 2 * FOOTER_BYTES + 4096  # not the other 6 images


def test_https_tars_equal_local_ones_through_faults(in_store):
    server = RangeFiles(in_store["local"] / "wds")
    try:
        pattern = server.url + "/{00000..00002}.tar"
        server.faults.set(["503", "drop", "stall"], "00002.tar")
        server.faults.stall_s = 0.1  # fsspec's HTTP timeout is long: the stall only delays here
        remote = load_items(DataConfig(path=pattern, storage_options={"block_size": 1 << 16}))
        local = load_items(DataConfig(path=str(in_store["local"] / "wds")))
        assert remote.kind == local.kind == "webdataset"
        assert (remote.ids, remote.labels, remote.payloads) == (local.ids, local.labels, local.payloads)
        assert server.faults.done["503"] == 1 and server.faults.done["drop"] == 1
        with pytest.raises(InputError, match="1 of the 4 objects it names do not exist"):
            load_items(DataConfig(path=server.url + "/{00000..00003}.tar"))
    finally:
        server.close()


def test_a_missing_object_is_the_unit_error_of_a_missing_file(in_store, s3, tmp_path):
    listing = write_listing(DataConfig(path=in_store["wds"], storage_options=s3.options()), tmp_path)
    assert listing.n_units == 3 and listing.root == in_store["wds"]
    s3.faults.set(["404"], "00001.tar")
    tasks = UnitTasks(UnitQueue(np.array([1])), listing, 4)
    with pytest.raises(InputError, match=r"unit 1 of the input \(s3://bucket/wds/00001.tar\) cannot be "
                       r"read: FileNotFoundError: .*s3://bucket/wds/00001.tar.*no such object \(404\).*run "
                       "the same command again"):
        list(tasks)
    s3.faults.set([], "00001.tar")
    with pytest.raises(InputError, match="no object or prefix of that name"):
        write_listing(DataConfig(path=in_store["wds"] + "-gone", kind="webdataset",
                                 storage_options=s3.options()), tmp_path / "gone")
    with pytest.raises(InputError, match="reads local paths only"):
        write_listing(DataConfig(path=in_store["wds"], kind="hf", storage_options=s3.options()),
                      tmp_path / "hf")


def test_folders_and_lists_of_objects_give_the_items_of_local_ones(corpus, s3, tmp_path):
    url = s3.upload(corpus, "bucket", "corpus")
    s3.faults.set([], "corpus/")
    gets = s3.faults.gets("corpus/n0")
    listing = write_listing(DataConfig(path=url, storage_options=s3.options()), tmp_path / "listed")
    assert listing.kind == "imagefolder" and listing.n_items == 11
    assert s3.faults.gets("corpus/n0") == gets  # one listing of the prefix: no image read
    remote = load_items(DataConfig(path=url, storage_options=s3.options()))
    local = load_items(DataConfig(path=str(corpus)))
    assert (remote.ids, remote.labels) == (local.ids, local.labels)
    assert remote.payloads == [Path(path).read_bytes() for path in local.payloads]
    flat = load_items(DataConfig(path=url, kind="images", storage_options=s3.options()))
    assert flat.ids == local.ids and flat.labels == [None] * 11
    # A list object of keys relative to it and full URLs; one object gone is an error row.
    keys = [f"corpus/{item}" for item in local.ids[:3]] + [f"{url}/{local.ids[3]}", "corpus/gone.jpg"]
    fs = s3.filesystem()
    for path in (tmp_path / "images.txt", "s3://bucket/images.txt"):
        if isinstance(path, Path):  # a local list naming objects by URL
            path.write_text("\n".join(f"{url}/{item}" for item in local.ids[:4]) + "\n")
            expected_ids = [f"{url}/{item}" for item in local.ids[:4]]
        else:
            fs.pipe("bucket/images.txt", ("\n".join(keys) + "\n").encode())
            expected_ids = keys
        cfg = DataConfig(path=str(path), storage_options=s3.options())
        listing = write_listing(cfg, tmp_path / f"list-{isinstance(path, Path)}")
        records = [record for unit in range(listing.n_units) for record in listing.records(unit)]
        assert [record.id for record in records] == expected_ids
        assert [record.payload for record in records[:4]] == remote.payloads[:4]
    assert records[4].payload is None and records[4].error.startswith("FileNotFoundError: ")
    assert "s3://bucket/corpus/gone.jpg: no such object (404)" in records[4].error


# ------------------------------------------------------------------ whole jobs


def test_tars_in_a_bucket_give_the_rows_of_local_copies_through_faults(in_store, s3, tiny_models, tmp_path,
                                                                       local_tars):
    model = tiny_models["beit"]
    s3.faults.set(["503", "503", "drop", "stall"], "wds/00001.tar")
    result = store_job(model, in_store["wds"] + "/{00000..00002}.tar", tmp_path / "s3", s3.options())
    assert dict(s3.faults.done) == {"503": 2, "drop": 1, "stall": 1}
    local, remote = read_rows(local_tars), read_rows(tmp_path / "s3")
    assert len(remote) == 14 and compared(remote) == compared(local)  # none lost, none twice
    for kind in ("SlowDown", "connection", "timeout"):
        said = [line for line in result.stderr.splitlines() if f": {kind} (" in line and "retrying" in line]
        assert len(said) == 1, said
    assert "object store: 4 request(s) retried (2 SlowDown, 1 connection, 1 timeout)" in result.stderr
    assert "ranged GETs of 32 MiB" in result.stderr
    metrics_local = json.loads((local_tars / "metrics.json").read_text())
    metrics_remote = json.loads((tmp_path / "s3" / "metrics.json").read_text())
    for key in ("n", "n_errors", "n_labelled", "n_scored", "top1", "top5", "ece"):
        assert metrics_remote[key] == metrics_local[key], key


def test_parquet_in_a_bucket_gives_the_rows_of_local_copies(in_store, s3, tiny_models, tmp_path):
    model = tiny_models["beit"]
    store_job(model, str(in_store["local"] / "tables"), tmp_path / "local")
    s3.faults.set(["503", "drop"], "tables/train-00001")
    store_job(model, in_store["tables"], tmp_path / "s3", s3.options())
    assert dict(s3.faults.done) == {"503": 1, "drop": 1}
    local, remote = read_rows(tmp_path / "local"), read_rows(tmp_path / "s3")
    assert len(remote) == 14 and compared(remote) == compared(local)


def test_a_forbidden_tar_stops_the_job_with_one_line_and_a_rerun_finishes(in_store, s3, tiny_models,
                                                                         tmp_path):
    model, out = tiny_models["beit"], tmp_path / "s3"
    s3.faults.set(["always-403"], "wds/00002.tar")
    failed = store_job(model, in_store["wds"], out, s3.options(), expect_ok=False)
    s3.faults.set([], "wds/00002.tar")
    assert failed.returncode == 2, failed.stderr[-2000:]
    said = [line for line in failed.stderr.splitlines() if line.startswith("batch-classify: ")]
    assert len(said) == 1 and "s3://bucket/wds/00002.tar" in said[0] and "access denied (403)" in said[0]
    assert "Traceback" not in failed.stderr
    run_job(["--model.name", str(model), "--data.path", in_store["wds"], "--output.dir", str(out),
             "--data.storage_options", json.dumps(s3.options())], processes=2)  # each rank opens the store
    rows = read_rows(out)
    assert len(rows) == 14 and all(row["error"] is None for row in rows.values())


