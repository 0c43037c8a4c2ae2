"""gs:// and az:// against their emulators on localhost (fake-gcs-server with gcsfs, Azurite with
adlfs; fixtures in tests/conftest.py): the store layer reads, lists and writes as it does on S3,
the clients refuse what a pinned read or a create-only write must refuse, and the job over the
tars and the Parquet files of the collection gives the rows of the local run, with output.dir in
the same store written whole and resumed."""

from __future__ import annotations

import json

import pytest
from conftest import read_rows, run_job
from object_servers import compared, store_job

from batch_classify.core.storage import store_for

STORES = ["gcs", "azure"]


@pytest.fixture(scope="module", params=STORES)
def emulated(request):
    """One emulator (the module's tests run once for each)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def collection(emulated, in_store) -> dict:
    """in_store's local tars and Parquet files copied into the emulator's bucket."""
    local = in_store["local"]
    return {"local": local, "wds": emulated.upload(local / "wds", "collection", "wds"),
            "tables": emulated.upload(local / "tables", "collection", "tables")}


@pytest.fixture(scope="module")
def local_tables(in_store, tiny_models, tmp_path_factory):
    """The job's output over the local copies of the Parquet files (tars batch otherwise: the
    scores differ in their last bits)."""
    out = tmp_path_factory.mktemp("local-tables") / "out"
    store_job(tiny_models["beit"], str(in_store["local"] / "tables"), out)
    return out


# ------------------------------------------------------------------ the store layer, no job


def test_the_store_lists_and_reads_objects_in_ranges(emulated, collection):
    local = collection["local"] / "wds"
    store = store_for(collection["wds"], emulated.options(block_size=1 << 16))
    found = store.find(collection["wds"])
    assert found == {f"{collection['wds']}/{p.name}": p.stat().st_size for p in sorted(local.glob("*.tar"))}
    url, data = next(iter(found)), (local / "00000.tar").read_bytes()
    assert store.read_range(url, 100, 1100) == data[100:1100]
    reader = store.open(url)
    assert reader.read() == data and reader.gets == -(-len(data) // (1 << 16))
    assert store.read_many([url]) == {url: data}
    with pytest.raises(FileNotFoundError, match="no such object"):
        store.read(f"{collection['wds']}/none.tar")
    if emulated.scheme == "gs":  # a GCS endpoint of its own is reached by gcsfs's plain JSON-API client
        from gcsfs.core import GCSFileSystem
        assert type(store.fs) is GCSFileSystem


def test_the_client_refuses_a_second_create_and_a_stale_version(emulated, tmp_path):
    """What create-only writes, conditional replaces and reads pinned to a listed version rest on,
    through the calls a store's code makes (docs/object-stores.md names them)."""
    fs = emulated.filesystem()
    if not fs.exists("conditions"):
        fs.mkdir("conditions")
    path = "conditions/a.bin"
    fs.pipe_file(path, b"first" * 10)
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"second", mode="create")
    assert fs.cat_file(path) == b"first" * 10
    listed = fs.find("conditions", detail=True)[path]
    assert listed["size"] == 50
    fs.pipe_file(path, b"other" * 10)  # replaced after the listing, same size
    fs.invalidate_cache()
    now = fs.info(path)
    if emulated.scheme == "gs":
        old, new = listed["generation"], now["generation"]
        assert old and new and old != new
        assert fs.cat_file(path, start=0, end=5, generation=new) == b"other"
        with pytest.raises(FileNotFoundError):  # the listed generation, not the bytes there now
            fs.cat_file(path, start=0, end=5, generation=old)
    else:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError
        from fsspec.asyn import sync

        old, new = listed["etag"], now["etag"]
        assert old and new and old != new

        async def ranged(etag: str) -> bytes:
            async with fs.service_client.get_blob_client("conditions", "a.bin") as blob:
                stream = await blob.download_blob(offset=0, length=5, etag=etag,
                                                  match_condition=MatchConditions.IfNotModified)
                return await stream.readall()

        assert sync(fs.loop, ranged, new) == b"other"
        with pytest.raises(ResourceModifiedError):
            sync(fs.loop, ranged, old)
        with pytest.raises(ResourceModifiedError):  # a replace conditional on the version seen
            fs.pipe_file(path, b"stale", etag=old, match_condition=MatchConditions.IfNotModified)
        fs.pipe_file(path, b"fresh", etag=new, match_condition=MatchConditions.IfNotModified)
        assert fs.cat_file(path) == b"fresh"


# ------------------------------------------------------------------ jobs


def test_tars_there_with_output_there_give_the_local_rows_and_resume(emulated, collection, tiny_models,
                                                                      local_tars, tmp_path):
    url = f"{emulated.scheme}://outputs/run"
    fs = emulated.filesystem()
    if not fs.exists("outputs"):
        fs.mkdir("outputs")
    args = ["--model.name", str(tiny_models["beit"]), "--data.path", collection["wds"],
            "--data.storage_options", json.dumps(emulated.options()), "--output.dir", url,
            "--output.storage_options", json.dumps(emulated.options()),
            "--output.staging", str(tmp_path / "staging")]
    first = run_job(args)
    fs.invalidate_cache()
    for name in ("manifest.json", "metrics.json", "config.yaml", "input/listing.json", "input/units.parquet"):
        assert fs.exists(f"outputs/run/{name}"), name
    assert not fs.exists("outputs/run/.lease.json")
    units = sorted(fs.glob("outputs/run/predictions/unit-*.parquet"))
    assert len(units) == 3
    fs.get("outputs/run/predictions", str(tmp_path / "copy" / "predictions"), recursive=True)
    assert compared(read_rows(tmp_path / "copy")) == compared(read_rows(local_tars))
    # A unit object lost from the store, resumed from another staging folder (another machine).
    fs.rm_file(units[0])
    args[-1] = str(tmp_path / "staging-2")
    resumed = run_job(args)
    assert "resuming" in resumed.stderr, resumed.stderr
    fs.invalidate_cache()
    assert sorted(fs.glob("outputs/run/predictions/unit-*.parquet")) == units
    fs.get("outputs/run/predictions", str(tmp_path / "copy-2" / "predictions"), recursive=True)
    assert compared(read_rows(tmp_path / "copy-2")) == compared(read_rows(local_tars))  # none twice
    secret = getattr(emulated, "account_key", None)
    if secret:  # the key reached the jobs through the environment only: no file or log holds it
        for log in (first, resumed):
            assert secret not in log.stdout + log.stderr
        for file in tmp_path.rglob("*"):
            assert not file.is_file() or secret.encode() not in file.read_bytes(), file


def test_parquet_there_gives_the_local_rows(emulated, collection, tiny_models, local_tables, tmp_path):
    store_job(tiny_models["beit"], collection["tables"], tmp_path / "out", emulated.options())
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 14 and compared(rows) == compared(read_rows(local_tables))
