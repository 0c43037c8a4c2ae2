"""The layout rules of local folders, held for prefixes and objects in a store (moto's S3 server):
folder markers are no folders or images, output.dir may not overlap data.path, a list names
each object once in any spelling, and keys holding any character are read as written."""

from __future__ import annotations

import json
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
from conftest import read_rows, run_job
from fixtures_wds import jpeg, tiny_image
from object_servers import store_job

from batch_classify.core.config import DataConfig
from batch_classify.core.ownership import OutputLocationError, check_url_location
from batch_classify.core.storage import canonical_url, is_folder_marker
from batch_classify.inputs.base import InputError
from batch_classify.inputs.listing import load_items, write_listing

BUCKET = "layout"


@pytest.fixture(scope="module")
def bucket(s3):
    """A boto3 client on the bucket (it writes any key as given, where s3fs might not)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3.direct, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    return client


def put(client, key: str, body: bytes = b"") -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=body)


def records(cfg: DataConfig, folder: Path) -> list:
    listing = write_listing(cfg, folder)
    return [record for unit in range(listing.n_units) for record in listing.records(unit)]


def test_the_folder_marker_predicate():
    assert is_folder_marker("b/val/", 0) and is_folder_marker("b/val_$folder$", 0)
    assert not is_folder_marker("b/val/", 3) and not is_folder_marker("b/val.jpg", 0)


# ------------------------------------------------------------------ folder markers


def marked(client, corpus: Path, prefix: str, markers: str) -> str:
    """corpus under prefix with zero-byte markers for its folders: "slash" (``val/``, what storage
    consoles create) or "hadoop" (``val_$folder$``), at every level and one folder holding only
    its marker."""
    folders = {prefix, f"{prefix}/empty"}
    for file in sorted(corpus.rglob("*")):
        if file.is_file():
            key = f"{prefix}/{file.relative_to(corpus).as_posix()}"
            put(client, key, file.read_bytes())
            folders.update(key.rsplit("/", i)[0] for i in range(1, key.count("/")))
    for folder in folders:
        put(client, folder + "/" if markers == "slash" else folder + "_$folder$")
    return f"s3://{BUCKET}/{prefix}"


@pytest.mark.parametrize("markers", ["slash", "hadoop"])
def test_folder_markers_leave_a_class_per_prefix_folder_labelled(corpus, s3, bucket, markers):
    url = marked(bucket, corpus, f"marked-{markers}/val", markers)
    local = load_items(DataConfig(path=str(corpus)))
    for path in (url, url + "/"):
        remote = load_items(DataConfig(path=path, storage_options=s3.options()))
        assert remote.kind == "imagefolder"  # not unlabelled images: accuracy stays available
        assert (remote.ids, remote.labels) == (local.ids, local.labels)
    flat = load_items(DataConfig(path=url, kind="images", storage_options=s3.options()))
    assert flat.ids == local.ids  # a marker is no image, at any level


def test_folder_markers_are_no_shards(in_store, s3, bucket, tmp_path):
    """Tars and Parquet files under prefixes with markers: the shards of the unmarked prefixes."""
    for kind, source in (("webdataset", "wds"), ("parquet", "tables")):
        for file in sorted((in_store["local"] / source).iterdir()):
            put(bucket, f"marked-{kind}/{source}/{file.name}", file.read_bytes())
        for marker in (f"marked-{kind}/{source}/", f"marked-{kind}/{source}/sub/", f"marked-{kind}/",
                       f"marked-{kind}/{source}/sub/part.parquet/", f"marked-{kind}/{source}/sub/t.tar/",
                       f"marked-{kind}/{source}_$folder$", f"marked-{kind}/{source}/part_$folder$"):
            put(bucket, marker)
        url = f"s3://{BUCKET}/marked-{kind}/{source}"
        mine = records(DataConfig(path=url, storage_options=s3.options()), tmp_path / kind)
        theirs = records(DataConfig(path=in_store[source], storage_options=s3.options()), tmp_path / source)
        assert [(r.id, r.label, r.payload) for r in mine] == [(r.id, r.label, r.payload) for r in theirs]
        assert len(mine) == 14


# ------------------------------------------------------------------ output.dir and data.path


@pytest.mark.parametrize(("output", "data"), [
    ("s3://b/val/report", "s3://b/val"),  # inside
    ("s3://b/val", "s3://b/val/"),  # the same prefix
    ("s3a://b//val/", "s3://b/val"),  # the same, spelt otherwise
    ("s3://b", "s3://b/val"),  # above: the bucket
    ("s3://b/x/../val/out", "s3://b/val"),
    ("gcs://b/data/out", "gs://b/data/{000..009}.tar"),  # a pattern's prefix
    ("s3://b/shards", "s3://b/shards/a.tar"),  # above one object
])
def test_an_output_dir_overlapping_data_path_in_a_store_is_refused(output, data):
    root = data.split("{")[0].rsplit("/", 1)[0] if "{" in data else data
    with pytest.raises(OutputLocationError, match="choose an output.dir outside the data"):
        check_url_location(output, root)


@pytest.mark.parametrize(("output", "data"), [
    ("s3://b/val-report", "s3://b/val"), ("s3://b/valx", "s3://b/val"), ("s3://c/val", "s3://b/val"),
    ("gs://b/val/out", "s3://b/val"), ("s3://b/out", "s3://b/list.txt"),
])
def test_an_output_dir_beside_data_path_is_accepted(output, data):
    check_url_location(output, data)


def test_canonical_urls():
    assert canonical_url("s3a://b//x/./y/") == canonical_url("s3://b/x/y") == "s3://b/x/y"
    assert canonical_url("abfs://c/k/../j") == "az://c/j"
    assert canonical_url("https://Host/a//b") == "https://host/a//b"  # a server may tell these apart
    with pytest.raises(ValueError, match="above the bucket"):
        canonical_url("s3://b/../c/x")


def test_a_job_is_refused_before_it_writes_into_the_data(corpus, s3, bucket, tiny_models, tmp_path):
    """output.dir in the data's prefix, and a staging folder inside a local data.path: one line,
    exit 2, nothing written into the bucket or the data folder."""
    url = marked(bucket, corpus, "guarded/val", "slash")
    before = sorted(s3.filesystem().find(f"{BUCKET}/guarded"))
    model = tiny_models["beit"]
    options = json.dumps(s3.options())
    failed = run_job(["--model.name", str(model), "--data.path", url, "--data.storage_options", options,
                      "--output.dir", f"s3a://{BUCKET}//guarded/val/report/", "--output.storage_options",
                      options, "--output.staging", str(tmp_path / "staging")], expect_ok=False)
    said = [line for line in failed.stderr.splitlines() if line.startswith("batch-classify: ")]
    assert failed.returncode == 2 and len(said) == 1, failed.stderr[-2000:]
    assert "lies inside data.path" in said[0]
    assert "Traceback" not in failed.stderr and not (tmp_path / "staging").exists()
    assert sorted(s3.filesystem().find(f"{BUCKET}/guarded")) == before
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(jpeg(tiny_image(1, (40, 40))))
    failed = run_job(["--model.name", str(model), "--data.path", str(data), "--output.dir",
                      f"s3://{BUCKET}/guarded-out", "--output.storage_options", options,
                      "--output.staging", str(data / "stage")], expect_ok=False)
    said = [line for line in failed.stderr.splitlines() if line.startswith("batch-classify: ")]
    assert failed.returncode == 2 and len(said) == 1, failed.stderr[-2000:]
    assert "output.staging" in said[0] and "lies inside data.path" in said[0]
    assert sorted(p.name for p in data.iterdir()) == ["a.jpg"]


# ------------------------------------------------------------------ lists of objects


def test_a_list_object_names_each_object_once_in_any_spelling(s3, bucket, tmp_path):
    images = {f"l/x/i{i}.jpg": jpeg(tiny_image(i, (30 + i, 30))) for i in range(3)}
    for key, body in images.items():
        put(bucket, key, body)
    listed = f"s3://{BUCKET}/l/list.txt"
    cfg = DataConfig(path=listed, storage_options=s3.options())
    for first, again in (("x/i0.jpg", f"s3://{BUCKET}/l/x/i0.jpg"), ("./x/i1.jpg", "x//i1.jpg"),
                         (f"s3a://{BUCKET}/l/x/i2.jpg", "y/../x/i2.jpg"), ("x/i0.jpg", "x/i0.jpg")):
        put(bucket, "l/list.txt", f"# two names of one object\nx/other.jpg\n{first}\n\n{again}\n".encode())
        with pytest.raises(InputError) as refused:
            records(cfg, tmp_path / "refused")
        said = str(refused.value)
        assert "\n" not in said and said.endswith("list each object once") and repr(again) in said
        assert ("is listed twice (again on line 5), first on line 3" if first == again
                else f"line 5 {again!r} and line 3 {first!r} name the same object") in said
    # Other spellings of distinct objects read those objects, each once; the ids are the lines.
    lines = ["./x/i0.jpg", "x//i1.jpg", f"s3a://{BUCKET}/l/y/../x/i2.jpg"]
    put(bucket, "l/list.txt", "\n".join(lines).encode())
    got = records(cfg, tmp_path / "read")
    assert [record.id for record in got] == lines
    assert [record.payload for record in got] == list(images.values())
    put(bucket, "l/list.txt", b"x/i0.jpg\n../../../etc/passwd\n")
    with pytest.raises(InputError, match=r"line 2: '../../../etc/passwd' names no object \(.*above the "):
        records(cfg, tmp_path / "above")


def test_a_local_list_naming_one_file_twice_is_refused_alike(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "i0.jpg").write_bytes(b"")
    (tmp_path / "list.txt").write_text("x/i0.jpg\n./x/i0.jpg\n")
    with pytest.raises(InputError, match="line 2 './x/i0.jpg' and line 1 'x/i0.jpg' name the same file; "
                                         "list each file once"):
        records(DataConfig(path=str(tmp_path / "list.txt")), tmp_path / "out")


# ------------------------------------------------------------------ keys holding any character


CHARS = ["n01514668/q?x.JPEG", "n01514668/h#x.JPEG", "n01514668/sp ace%20.JPEG",
         "n01514668/caf\u00e9-\u732b.JPEG", "n01514668/q?version=1.JPEG", "n01440764/100%.JPEG",
         "n01440764/a+b&c=d;e.JPEG"]
"""Keys holding characters that URLs and clients treat specially."""
PATHS = ["n01514668/a/../up.JPEG", "n01514668/./dot.JPEG", "n01514668/d//double.JPEG",
         "n01440764/.hidden/../x.JPEG"]
"""Keys holding parts that a path would resolve."""
ODD = [*CHARS, *PATHS, "n01440764/plain.JPEG"]


def test_keys_holding_any_character_are_listed_and_read_as_written(s3, bucket, tmp_path):
    bodies = {key: jpeg(tiny_image(i, (32 + i, 30))) for i, key in enumerate(ODD)}
    for key, body in bodies.items():
        put(bucket, f"odd/{key}", body)
    url = f"s3://{BUCKET}/odd"
    lines = [*(f"odd/{key}" for key in CHARS[:4]), *(f"{url}/{key}" for key in CHARS[4:])]
    put(bucket, "odd-list.txt", "\n".join(lines).encode())  # the same keys named by a list object
    items = load_items(DataConfig(path=url, storage_options=s3.options()))
    listed = sorted(key for key in ODD if "/.hidden/" not in key)  # a hidden part hides, as locally
    assert items.kind == "imagefolder" and items.ids == listed  # none dropped
    assert items.payloads == [bodies[key] for key in listed]  # none a 404
    assert items.labels == [0 if key.startswith("n01440764") else 7 for key in listed]
    got = records(DataConfig(path=f"s3://{BUCKET}/odd-list.txt", storage_options=s3.options()),
                  tmp_path / "list")
    assert [record.id for record in got] == lines
    assert [record.payload for record in got] == [bodies[key] for key in CHARS]


def test_a_key_the_client_reads_as_a_version_is_refused_in_one_line(s3, bucket, tmp_path):
    """s3fs reads '?versionId=' in any path as the start of a version id: such a key is refused,
    naming it, for a prefix, a list object and a tar."""
    body = jpeg(tiny_image(3, (30, 30)))
    put(bucket, "versioned/n01440764/a.JPEG", body)
    put(bucket, "versioned/n01440764/b?versionId=7.JPEG", body)
    put(bucket, "versioned-list.txt", b"versioned/n01440764/a.JPEG\nversioned/n01440764/b?versionId=7.JPEG\n")
    put(bucket, "versioned-tars/t?versionId=1.tar", b"\0" * 1024)
    url = f"s3://{BUCKET}/versioned"
    for kind in ("imagefolder", "images"):
        with pytest.raises(InputError, match=rf"the object {url}/n01440764/b\?versionId=7\.JPEG cannot be "
                                             r"read: its key holds '\?versionId=', which the s3:// client"):
            records(DataConfig(path=url, kind=kind, storage_options=s3.options()), tmp_path / kind)
    with pytest.raises(InputError, match=r"line 2: 'versioned/n01440764/b\?versionId=7\.JPEG' cannot be "):
        records(DataConfig(path=f"{url}-list.txt", storage_options=s3.options()), tmp_path / "list")
    with pytest.raises(InputError, match=r"versioned-tars/t\?versionId=1\.tar cannot be read"):
        records(DataConfig(path=f"s3://{BUCKET}/versioned-tars", storage_options=s3.options()),
                tmp_path / "tars")


def test_a_key_with_no_class_prefix_is_refused_in_one_line(s3, bucket, tmp_path):
    put(bucket, "noclass/n01440764/a.JPEG", jpeg(tiny_image(1, (30, 30))))
    put(bucket, "noclass/../b.JPEG", jpeg(tiny_image(2, (30, 30))))
    cfg = DataConfig(path=f"s3://{BUCKET}/noclass", kind="imagefolder", storage_options=s3.options())
    with pytest.raises(InputError, match=r"noclass/\.\./b\.JPEG lies in no class prefix \(its first part "
                                         r"is '\.\.'\); rename it, or use data\.kind: images"):
        records(cfg, tmp_path / "refused")
    flat = load_items(DataConfig(path=f"s3://{BUCKET}/noclass", kind="images", storage_options=s3.options()))
    assert flat.ids == ["../b.JPEG", "n01440764/a.JPEG"] and all(flat.payloads)


def test_tars_and_members_holding_odd_characters(s3, bucket, tmp_path):
    names = ["a?b.tar", "c#d.tar", "sp ace.tar", "\u00fcber.tar", "x/../y.tar"]
    for i, name in enumerate(names):
        buffer = BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            members = ((f"k?{i}.jpg", jpeg(tiny_image(i, (30, 30)))), (f"k?{i}.cls", str(i).encode()))
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, BytesIO(data))
        put(bucket, f"oddtars/{name}", buffer.getvalue())
    got = records(DataConfig(path=f"s3://{BUCKET}/oddtars", kind="webdataset", storage_options=s3.options()),
                  tmp_path / "tars")
    assert sorted((record.id, record.label) for record in got) == sorted(
        (f"{name}/k?{i}", i) for i, name in enumerate(names))
    assert all(record.error is None for record in got)


def test_a_job_over_marked_prefixes_and_odd_keys_scores_every_image(corpus, s3, bucket, tiny_models,
                                                                   tmp_path):
    url = marked(bucket, corpus, "job/val", "slash")
    bodies = {key: jpeg(tiny_image(i, (40 + i, 36))) for i, key in enumerate(ODD)}
    for key, body in bodies.items():
        put(bucket, f"job/val/{key}", body)
    store_job(tiny_models["beit"], url, tmp_path / "out", s3.options())
    rows = read_rows(tmp_path / "out")
    local = load_items(DataConfig(path=str(corpus)))
    assert sorted(rows) == sorted([*local.ids, *(key for key in ODD if "/.hidden/" not in key)])
    assert all(row["error"] is None and row["label"] is not None for row in rows.values())
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_labelled"] == len(rows) and metrics["top1"] is not None
