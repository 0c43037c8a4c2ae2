"""Inputs in object stores, against real servers on localhost with real clients: moto's S3 server
(s3fs), a Range-capable HTTP server (fsspec's HTTP filesystem), and a proxy that injects
faults (a connection dropped mid-object, 503 SlowDown, a stall past the client's timeout,
403, 404). The job over objects must give the rows the same job gives over local copies."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_rows, run_job
from fixtures_wds import jpeg, make_wds, tiny_image
from PIL import Image

from batch_classify.core import storage
from batch_classify.core.config import DataConfig
from batch_classify.core.storage import (
    MAX_TRIES,
    StoreError,
    fault_kind,
    is_url,
    retry_counts,
    store_for,
)
from batch_classify.inputs.base import InputError
from batch_classify.inputs.listing import load_items, write_listing
from batch_classify.inputs.parquet import FOOTER_BYTES
from batch_classify.pipeline.loader import UnitTasks
from batch_classify.pipeline.shard import UnitQueue

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")
pytest.importorskip("aiohttp", reason="the http extra (aiohttp) is not installed")

from object_servers import RangeFiles, S3Server  # noqa: E402

logging.getLogger("werkzeug").setLevel(logging.ERROR)
COMPARED = ("id", "label", "target", "topk_ids", "topk_scores", "error")


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.close()


@pytest.fixture(scope="module")
def collection(tmp_path_factory, s3) -> dict:
    """The same tars and Parquet files on local disk and in the bucket."""
    root = tmp_path_factory.mktemp("collection")
    images = [(f"s{i:03d}", tiny_image(i, (40 + i, 36)), (i * 37) % 1000) for i in range(14)]
    make_wds(root / "wds", images, per_tar=5)
    (root / "tables").mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for shard in range(2):
        rows = images[shard * 7:(shard + 1) * 7]
        table = pa.table({"image": pa.array([{"bytes": jpeg(image), "path": None} for _, image, _ in rows],
                                            image_type),
                          "label": [label for _, _, label in rows], "key": [key for key, _, _ in rows]})
        pq.write_table(table, root / "tables" / f"train-{shard:05d}.parquet", row_group_size=3)
    return {"local": root, "wds": s3.upload(root / "wds", "bucket", "wds"),
            "tables": s3.upload(root / "tables", "bucket", "tables")}


@pytest.fixture(scope="module")
def local_tars(collection, tiny_models, tmp_path_factory) -> Path:
    """The job's output over the local copies of the tars."""
    out = tmp_path_factory.mktemp("local-tars") / "out"
    _job(tiny_models["beit"], str(collection["local"] / "wds"), out)
    return out


def _compared(rows: dict[str, dict]) -> dict[str, tuple]:
    return {key: tuple(json.dumps(row[name]) for name in COMPARED) for key, row in rows.items()}


def _job(model: Path, data: str, out: Path, options: dict | None = None, expect_ok: bool = True):
    args = ["--model.name", str(model), "--data.path", data, "--output.dir", str(out)]
    if options is not None:
        args += ["--data.storage_options", json.dumps(options)]
    return run_job(args, expect_ok=expect_ok)


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


def test_a_tar_is_read_in_large_ranged_gets_resuming_after_faults(collection, s3, monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    url = collection["wds"] + "/00001.tar"
    local = (collection["local"] / "wds" / "00001.tar").read_bytes()
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
    assert {kind: after.get(kind, 0) - counts.get(kind, 0) for kind in after} == {
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


def test_https_tars_equal_local_ones_through_faults(collection):
    server = RangeFiles(collection["local"] / "wds")
    try:
        pattern = server.url + "/{00000..00002}.tar"
        server.faults.set(["503", "drop", "stall"], "00002.tar")
        server.faults.stall_s = 0.1  # fsspec's HTTP timeout is long: the stall only delays here
        remote = load_items(DataConfig(path=pattern, storage_options={"block_size": 1 << 16}))
        local = load_items(DataConfig(path=str(collection["local"] / "wds")))
        assert remote.kind == local.kind == "webdataset"
        assert (remote.ids, remote.labels, remote.payloads) == (local.ids, local.labels, local.payloads)
        assert server.faults.done["503"] == 1 and server.faults.done["drop"] == 1
        with pytest.raises(InputError, match="1 of the 4 objects it names do not exist"):
            load_items(DataConfig(path=server.url + "/{00000..00003}.tar"))
    finally:
        server.close()


def test_a_missing_object_is_the_unit_error_of_a_missing_file(collection, s3, tmp_path):
    listing = write_listing(DataConfig(path=collection["wds"], storage_options=s3.options()), tmp_path)
    assert listing.n_units == 3 and listing.root == collection["wds"]
    s3.faults.set(["404"], "00001.tar")
    tasks = UnitTasks(UnitQueue(np.array([1])), listing, 4)
    with pytest.raises(InputError, match=r"unit 1 of the input \(s3://bucket/wds/00001.tar\) cannot be "
                       r"read: FileNotFoundError: .*s3://bucket/wds/00001.tar.*no such object \(404\).*run "
                       "the same command again"):
        list(tasks)
    s3.faults.set([], "00001.tar")
    with pytest.raises(InputError, match="no object or prefix of that name"):
        write_listing(DataConfig(path=collection["wds"] + "-gone", kind="webdataset",
                                 storage_options=s3.options()), tmp_path / "gone")
    with pytest.raises(InputError, match="reads local paths only"):
        write_listing(DataConfig(path=collection["wds"], kind="hf", storage_options=s3.options()),
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


def test_tars_in_a_bucket_give_the_rows_of_local_copies_through_faults(collection, s3, tiny_models, tmp_path,
                                                                       local_tars):
    model = tiny_models["beit"]
    s3.faults.set(["503", "503", "drop", "stall"], "wds/00001.tar")
    result = _job(model, collection["wds"] + "/{00000..00002}.tar", tmp_path / "s3", s3.options())
    assert dict(s3.faults.done) == {"503": 2, "drop": 1, "stall": 1}
    local, remote = read_rows(local_tars), read_rows(tmp_path / "s3")
    assert len(remote) == 14 and _compared(remote) == _compared(local)  # none lost, none twice
    for kind in ("SlowDown", "connection", "timeout"):
        said = [line for line in result.stderr.splitlines() if f": {kind} (" in line and "retrying" in line]
        assert len(said) == 1, said
    assert "object store: 4 request(s) retried (2 SlowDown, 1 connection, 1 timeout)" in result.stderr
    assert "ranged GETs of 32 MiB" in result.stderr
    metrics_local = json.loads((local_tars / "metrics.json").read_text())
    metrics_remote = json.loads((tmp_path / "s3" / "metrics.json").read_text())
    for key in ("n", "n_errors", "n_labelled", "n_scored", "top1", "top5", "ece"):
        assert metrics_remote[key] == metrics_local[key], key


def test_parquet_in_a_bucket_gives_the_rows_of_local_copies(collection, s3, tiny_models, tmp_path):
    model = tiny_models["beit"]
    _job(model, str(collection["local"] / "tables"), tmp_path / "local")
    s3.faults.set(["503", "drop"], "tables/train-00001")
    _job(model, collection["tables"], tmp_path / "s3", s3.options())
    assert dict(s3.faults.done) == {"503": 1, "drop": 1}
    local, remote = read_rows(tmp_path / "local"), read_rows(tmp_path / "s3")
    assert len(remote) == 14 and _compared(remote) == _compared(local)


def test_a_forbidden_tar_stops_the_job_with_one_line_and_a_rerun_finishes(collection, s3, tiny_models,
                                                                         tmp_path):
    model, out = tiny_models["beit"], tmp_path / "s3"
    s3.faults.set(["always-403"], "wds/00002.tar")
    failed = _job(model, collection["wds"], out, s3.options(), expect_ok=False)
    s3.faults.set([], "wds/00002.tar")
    assert failed.returncode == 2, failed.stderr[-2000:]
    said = [line for line in failed.stderr.splitlines() if line.startswith("batch-classify: ")]
    assert len(said) == 1 and "s3://bucket/wds/00002.tar" in said[0] and "access denied (403)" in said[0]
    assert "Traceback" not in failed.stderr
    run_job(["--model.name", str(model), "--data.path", collection["wds"], "--output.dir", str(out),
             "--data.storage_options", json.dumps(s3.options())], processes=2)  # each rank opens the store
    rows = read_rows(out)
    assert len(rows) == 14 and all(row["error"] is None for row in rows.values())


def test_outputs_in_a_bucket_survive_a_kill_with_nothing_lost_doubled_or_partial(
        collection, s3, tiny_models, tmp_path, monkeypatch, local_tars):
    import signal

    from test_preemption import Background

    from batch_classify.commands.cli import main as cli_main

    model, url = tiny_models["beit"], "s3://outputs/run"
    fs = s3.filesystem()
    if not fs.exists("outputs"):
        fs.mkdir("outputs")
    args = ["--model.name", str(model), "--data.path", str(collection["local"] / "wds"), "--output.dir", url,
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
    assert _compared(rows) == _compared(read_rows(local_tars))
    monkeypatch.setenv("BATCH_CLASSIFY_STORAGE_OPTIONS", json.dumps(s3.options()))
    monkeypatch.setenv("BATCH_CLASSIFY_CACHE", str(tmp_path / "cache"))
    assert cli_main(["verify", url]) == 0
    assert cli_main(["aggregate", url]) == 0
    assert cli_main(["compare", url, str(local_tars)]) == 0


def test_a_second_job_on_an_output_in_a_bucket_is_refused(s3, tmp_path, monkeypatch):
    from batch_classify.output import remote as remote_module
    from batch_classify.output.remote import LEASE, OutputElsewhere, attach

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
