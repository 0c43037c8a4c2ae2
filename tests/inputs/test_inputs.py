"""Every input kind resolves to the same ordered items, ids and labels a user expects."""

from __future__ import annotations

import io
import json

import datasets
import pytest
from conftest import read_rows, run_job
from PIL import Image

from batch_classify.core.config import DataConfig
from batch_classify.core.labels import wnid_to_index
from batch_classify.inputs.base import InputError
from batch_classify.inputs.listing import load_items
from batch_classify.inputs.registry import detect_kind


def data(path, **kwargs) -> DataConfig:
    return DataConfig(path=str(path), **kwargs)


def tiny_png(colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 9), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_wnid_folders_map_to_the_imagenet_index(corpus):
    items = load_items(data(corpus))
    assert items.kind == "imagefolder" and items.classes is None
    assert items.ids == sorted(items.ids) and len(items) == 11
    for item_id, label in zip(items.ids, items.labels):
        assert label == wnid_to_index()[item_id.split("/")[0]]
    assert items.ids[0].startswith("n01440764/")


def test_named_class_folders_map_in_sorted_order(tmp_path):
    for name in ("zebra", "apple", "mango"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(tiny_png())
    items = load_items(data(tmp_path))
    assert items.classes == ("apple", "mango", "zebra")
    assert dict(zip(items.ids, items.labels)) == {"apple/a.png": 0, "mango/a.png": 1,
                                                  "zebra/a.png": 2}


def test_unlabelled_folder_is_searched_recursively(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "top.jpg").write_bytes(tiny_png())
    (tmp_path / "deep" / "er" / "x.PNG").write_bytes(tiny_png())
    (tmp_path / "notes.txt").write_text("not an image")
    items = load_items(data(tmp_path))
    assert items.kind == "images" and items.ids == ["deep/er/x.PNG", "top.jpg"]
    assert items.labels == [None, None] and not items.labelled


def test_file_list_paths_are_relative_to_the_list(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("b.png", "a.png"):
        (tmp_path / "imgs" / name).write_bytes(tiny_png())
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\nimgs/b.png\n\nimgs/a.png\n")
    items = load_items(data(listing))
    assert items.kind == "file_list" and items.ids == ["imgs/b.png", "imgs/a.png"]
    assert items.open(0) == str(tmp_path / "imgs" / "b.png")


@pytest.mark.parametrize("header", [True, False])
def test_flat_folder_with_labels_csv_of_indices_and_wnids(tmp_path, header):
    folder = tmp_path / "val"
    folder.mkdir()
    for name in ("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG", "extra.JPEG"):
        (folder / name).write_bytes(tiny_png())
    labels = tmp_path / "labels.csv"
    rows = ["ILSVRC2012_val_00000001.JPEG,65", "ILSVRC2012_val_00000002.JPEG,n02123045",
            "missing.JPEG,1"]
    labels.write_text(("filename,label\n" if header else "") + "\n".join(rows) + "\n")
    items = load_items(data(folder, labels=str(labels)))
    assert items.ids == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG",
                         "missing.JPEG"]
    assert items.labels == [65, wnid_to_index()["n02123045"], 1]
    assert any("not in the labels file" in note for note in items.notes)


def test_kaggle_loc_val_solution(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "ILSVRC2012_val_00008726.JPEG").write_bytes(tiny_png())
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\n"
                      "ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295\n")
    items = load_items(data(folder, labels=str(labels)))
    assert items.ids == ["ILSVRC2012_val_00008726.JPEG"]
    assert items.labels == [wnid_to_index()["n02119789"]]


def test_devkit_ground_truth_is_refused_with_the_reason(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.JPEG").write_bytes(tiny_png())
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("490\n361\n171\n")
    with pytest.raises(InputError, match="devkit's own order"):
        load_items(data(tmp_path / "val", labels=str(truth)))


@pytest.mark.parametrize(("label", "message"), [("1000", "outside"), ("n99999999", "not one of"),
                                                ("cat", "neither")])
def test_bad_labels_are_named_with_their_row(tmp_path, label, message):
    (tmp_path / "val").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text(f"a.png,1\nb.png,{label}\n")
    with pytest.raises(ValueError, match=f"row 2.*{message}"):
        load_items(data(tmp_path / "val", labels=str(labels)))


def test_missing_path_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_items(data(tmp_path / "nope", kind="images"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        load_items(data(tmp_path / "empty"))


def test_images_outside_class_folders_are_refused(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.png").write_bytes(tiny_png())
    (tmp_path / "stray.png").write_bytes(tiny_png())
    with pytest.raises(InputError, match="outside the class"):
        load_items(data(tmp_path, kind="imagefolder"))


def make_hf_dataset(tmp_path, n=7):
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=["n01440764", "n02123045"]),
        "key": datasets.Value("string"),
    })
    rows = {"image": [{"bytes": tiny_png((i * 30, 90, 200 - i * 20)), "path": None} for i in range(n)],
            "label": [i % 2 for i in range(n)],
            "key": [f"photo-{i}" for i in range(n)]}
    return datasets.Dataset.from_dict(rows, features=features)


def test_hf_save_to_disk_with_wnid_classlabel(tmp_path):
    make_hf_dataset(tmp_path).save_to_disk(tmp_path / "ds")
    config = data(tmp_path / "ds")
    assert detect_kind(config) == "hf"
    items = load_items(config)
    assert items.ids == [str(i) for i in range(7)]
    assert items.labels[:2] == [wnid_to_index()["n01440764"], wnid_to_index()["n02123045"]]
    with Image.open(items.open(3)) as image:
        assert image.size == (12, 9)
    # The image column stays encoded: decoding happens in the DataLoader workers.
    assert all(isinstance(payload, bytes) for payload in items.payloads)


def test_hf_parquet_with_id_column_and_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    paths = []
    for i in range(3):
        path = tmp_path / "imgs" / f"{i}.png"
        path.write_bytes(tiny_png())
        paths.append(str(path))
    dataset = datasets.Dataset.from_dict({"file": paths, "name": ["a", "b", "c"],
                                          "label": [3, 1, 999]})
    dataset.to_parquet(str(tmp_path / "table.parquet"))
    items = load_items(data(tmp_path / "table.parquet", image_column="file", id_column="name"))
    assert items.ids == ["a", "b", "c"] and items.labels == [3, 1, 999]
    assert items.open(1) == paths[1]


def test_hf_missing_column_is_named(tmp_path):
    make_hf_dataset(tmp_path).save_to_disk(tmp_path / "ds")
    with pytest.raises(InputError, match="data.image_column 'picture'"):
        load_items(data(tmp_path / "ds", image_column="picture"))
    with pytest.raises(InputError, match="data.label_column 'target'"):
        load_items(data(tmp_path / "ds", label_column="target"))


def test_job_on_a_hugging_face_dataset(tmp_path, tiny_models):
    make_hf_dataset(tmp_path).save_to_disk(tmp_path / "ds")
    out = tmp_path / "out"
    run_job(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(tmp_path / "ds"),
             "--data.id_column", "key", "--output.dir", str(out)], processes=2)
    rows = read_rows(out)
    assert sorted(rows) == sorted(f"photo-{i}" for i in range(7))
    assert all(row["error"] is None and len(row["topk_ids"]) == 5 for row in rows.values())
    assert rows["photo-1"]["label"] == wnid_to_index()["n02123045"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 7 and metrics["n_labelled"] == 7 and metrics["top1"] is not None


def test_parquet_shards_are_read_a_row_group_run_at_a_time(tmp_path, tiny_models):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch_classify.inputs.listing import write_listing

    folder = tmp_path / "shards"
    folder.mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for shard in range(2):
        images = [{"bytes": tiny_png((40 * i, 90, 30 * shard)), "path": None} for i in range(6)]
        table = pa.table({"image": pa.array(images, image_type), "label": [i % 3 for i in range(6)]})
        pq.write_table(table, folder / f"train-{shard:05d}.parquet", row_group_size=2)
    listing = write_listing(data(folder), tmp_path / "listing", unit_size=4)
    # Whole row groups of 2 rows, up to 4 rows a unit, never across files.
    assert listing.kind == "parquet" and listing.n_items == 12 and listing.n_units == 4
    records = [r for u in range(listing.n_units) for r in listing.records(u)]
    assert [r.id for r in records] == [str(i) for i in range(12)]  # the row index over all files
    assert [r.label for r in records] == [i % 3 for i in range(6)] * 2
    assert all(isinstance(r.payload, bytes) for r in records)
    out = tmp_path / "out"
    run_job(["--model.name", str(tiny_models["beit"]), "--data.path", str(folder), "--output.dir", str(out),
             "--output.unit_size", "4"], processes=2)
    rows = read_rows(out)
    assert sorted(rows, key=int) == [str(i) for i in range(12)]
    assert all(r["error"] is None for r in rows.values())


def test_a_path_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_items(data(tmp_path / "no" / "such" / "folder"))


@pytest.mark.parametrize(("n_items", "batch_size", "expected"), [
    (200, 16, 16),  # 1/64 of 200 is 4 items: one batch of 16 instead
    (1000, 16, 16),
    (1000, 5, 20),  # 16, rounded up to whole batches
    (10**6, 64, 1024),  # 977 per unit for 1024 units, rounded up
    (10**9, 64, 10_048),  # the cap, rounded up
    (10**9, 1, 10_000),
])
def test_automatic_units_hold_whole_batches(n_items, batch_size, expected):
    from batch_classify.inputs.base import auto_unit_size

    assert auto_unit_size(n_items, batch_size) == expected


def test_plan_lists_in_the_batch_size_the_job_will_use(tmp_path):
    from batch_classify.core.config import parse_args
    from batch_classify.run.plan import listing_batch_size, plan

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(70):
        (folder / f"{i:03d}.png").write_bytes(tiny_png((i, 0, 0)))
    base = ["--model.name", "unused", "--output.dir", str(tmp_path / "out"), "--data.path", str(folder),
            "--data.kind", "images"]
    assert listing_batch_size(parse_args(base + ["--runtime.device", "cpu"])) == 16
    # auto may run on a GPU node after plan ran on a login node: the GPU default, a
    # multiple of the CPU's, suits both
    assert listing_batch_size(parse_args(base)) == 64
    plan(parse_args(base + ["--runtime.batch_size", "12"]))
    info = json.loads((tmp_path / "out" / "input" / "listing.json").read_text())
    assert info["unit_size"] == 12 and info["n_units"] == 6  # ceil(70 / 64) = 2 -> 12


def _parquet_shards(folder, n_files=2, rows=12, group=4):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for shard in range(n_files):
        images = [{"bytes": tiny_png((20 * i, 90, 40 * shard)), "path": None} for i in range(rows)]
        table = pa.table({"image": pa.array(images, image_type), "label": [i % 3 for i in range(rows)],
                          "key": [f"s{shard}-{i}" for i in range(rows)]})
        pq.write_table(table, folder / f"train-{shard:05d}.parquet", row_group_size=group)


def _garble_column(path, group: int, column: str) -> None:
    """Overwrite one column chunk of one row group: listing (footers only) cannot notice."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata.row_group(group)
    chunk = next(metadata.column(i) for i in range(metadata.num_columns)
                 if metadata.column(i).path_in_schema.split(".")[0] == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 16] = b"\xff" * 16  # the page header: not a thrift struct any more
    path.write_bytes(bytes(data))


def test_a_corrupt_parquet_row_group_is_error_rows_and_the_job_goes_on(tmp_path, tiny_models):
    from batch_classify.results.verify import verify

    folder = tmp_path / "shards"
    _parquet_shards(folder)
    _garble_column(folder / "train-00000.parquet", 1, "image")  # rows 4-7 of 24
    out = tmp_path / "out"
    result = run_job(["--model.name", str(tiny_models["beit"]), "--data.path", str(folder),
                      "--data.id_column", "key", "--output.dir", str(out), "--output.unit_size", "8"],
                     processes=2)
    rows = read_rows(out)
    ids = [f"s{s}-{i}" for s in range(2) for i in range(12)]
    assert sorted(rows) == sorted(ids)  # the id column still reads: the rows keep their ids
    broken = {f"s0-{i}" for i in range(4, 8)}
    for item_id, row in rows.items():
        if item_id in broken:
            assert row["error"].startswith("CorruptShard: train-00000.parquet row group 1 (rows 4-7): ")
            assert row["topk_ids"] is None
        else:
            assert row["error"] is None and len(row["topk_ids"]) == 5, item_id
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 24 and metrics["errors_by_type"] == {"CorruptShard": 4}
    assert "CorruptShard" in result.stdout + result.stderr  # named in the log, not only in rows
    check = verify(out, recount=True)  # a recount reads the ids alone, and finds the same
    assert check.complete and not check.recount_mismatches


def test_corrupt_parquet_rows_keep_their_index_ids_or_name_the_file(tmp_path):
    from batch_classify.inputs.listing import write_listing

    folder = tmp_path / "shards"
    _parquet_shards(folder, n_files=1)
    path = folder / "train-00000.parquet"
    _garble_column(path, 0, "image")
    _garble_column(path, 2, "key")
    by_row = write_listing(data(folder), tmp_path / "rows", unit_size=12)
    records = list(by_row.records(0))
    assert [r.id for r in records] == [str(i) for i in range(12)]  # the row index, as when fine
    # group 2's broken column is the key, which this listing does not read
    assert [r.error is not None for r in records] == [True] * 4 + [False] * 8
    by_key = write_listing(data(folder, id_column="key"), tmp_path / "keys", unit_size=12)
    ids = [r.id for r in by_key.records(0)]
    # group 0: the key column still reads; group 2: it is the broken one, so file@row
    assert ids == [f"s0-{i}" for i in range(8)] + [f"train-00000.parquet@{i}" for i in range(8, 12)]


def test_the_kind_is_told_from_the_top_level_and_one_folder_down(tmp_path):
    import os

    from fixtures_wds import write_tar

    png = tiny_png()
    tree = tmp_path / "tree"  # class folders of images: an ImageNet-style tree
    for name in ("n01440764", "n01443537"):
        (tree / name).mkdir(parents=True)
        (tree / name / "a.png").write_bytes(png)
    assert detect_kind(data(tree)) == "imagefolder"
    hub = tmp_path / "hub"  # a hub download: data/train-*.parquet
    (hub / "data").mkdir(parents=True)
    (hub / "data" / "train-00000.parquet").write_bytes(b"")
    assert detect_kind(data(hub)) == "parquet"
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(png)
    assert detect_kind(data(flat)) == "images"
    # Upper-case suffixes and symlinked tars are tars; a link keeps its own name as its id prefix.
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "A.TAR", [("k1.png", png)])
    os.symlink(write_tar(tmp_path / "elsewhere.tar", [("k2.png", png)]), shards / "b.tar")
    assert detect_kind(data(shards)) == "webdataset"
    items = load_items(data(shards))
    assert items.ids == ["A.TAR/k1", "b.tar/k2"]


def test_a_parquet_file_without_the_first_files_columns_is_refused_when_listing(tmp_path):
    import pyarrow.parquet as pq

    folder = tmp_path / "shards"
    _parquet_shards(folder, n_files=1)
    table = pq.read_table(folder / "train-00000.parquet").drop_columns(["label"])
    pq.write_table(table, folder / "train-00001.parquet")
    with pytest.raises(InputError, match=r"train-00001.parquet has no column label \(the first file, "
                                         r"train-00000.parquet, has it\)"):
        load_items(data(folder))


def test_a_file_list_that_is_not_utf8_is_a_clear_error(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.png\nb.png\ncaf\xe9.png\n")  # Latin-1
    with pytest.raises(InputError, match=r"list.txt: not UTF-8 text \(invalid continuation byte\); save the "
                                         r"list as UTF-8"):
        load_items(data(listing))
    listing.write_bytes("a.png\ncafé.png\na.png\n".encode())
    with pytest.raises(InputError, match=r"'a.png' is listed twice \(again on line 3\)"):
        load_items(data(listing))
