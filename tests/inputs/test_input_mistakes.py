"""Mistakes in the input: one file is one row, brace patterns are counted before they are
expanded, and every mistake a user can fix is one line (exit 2) naming the file or key, the
row or line, and the fix."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tracemalloc

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from braceexpand import braceexpand
from conftest import ROOT, read_rows, run_job
from fixtures_wds import write_tar
from PIL import Image

from batch_classify.core.config import DataConfig
from batch_classify.inputs.base import InputError, Repeats
from batch_classify.inputs.listing import load_items
from batch_classify.inputs.registry import detect_kind
from batch_classify.inputs.tars import ShardSpecError, brace_names, expand_shards
from batch_classify.run.plan import main as plan_main


def data(path, **kwargs) -> DataConfig:
    return DataConfig(path=str(path), **kwargs)


def png(colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 9), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def images(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png())
    return folder


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def parquet_file(path, keys, group=2, statistics=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": pa.array([{"bytes": png(), "path": None}] * len(keys), IMAGE_TYPE),
                      "key": pa.array(keys, pa.string())})
    pq.write_table(table, path, row_group_size=group, write_statistics=statistics)
    return path


# ---------------------------------------------------------------- rule 1: one file, one row


@pytest.mark.parametrize("spelling", ["./imgs/x.png", "imgs/../imgs/x.png", "{abs}", "imgs//x.png",
                                      "  imgs/x.png  ", "alias/x.png", "imgs/./x.png"])
def test_a_file_list_naming_one_file_twice_is_refused_in_any_spelling(tmp_path, spelling):
    images(tmp_path / "imgs", "x.png", "y.png")
    os.symlink(tmp_path / "imgs", tmp_path / "alias")
    second = spelling.replace("{abs}", str(tmp_path / "imgs" / "x.png"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"imgs/x.png\nimgs/y.png\n# a comment\n{second}\n")
    with pytest.raises(InputError) as caught:
        load_items(data(listing))
    message = str(caught.value)
    if second.strip() == "imgs/x.png":
        assert "'imgs/x.png' is listed twice (again on line 4), first on line 1" in message
    else:
        assert f"line 4 {second.strip()!r} and line 1 'imgs/x.png' name the same file" in message
    assert "list each file once" in message and "\n" not in message


def test_a_file_list_with_a_byte_order_mark_and_distinct_spellings(tmp_path):
    images(tmp_path / "imgs", "x.png", "y.png")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbfimgs/x.png\n./imgs/y.png\n")
    items = load_items(data(listing))
    assert items.ids == ["imgs/x.png", "./imgs/y.png"]  # ids as written, the mark dropped
    assert items.open(0) == str(tmp_path / "imgs" / "x.png")
    listing.write_bytes(b"\xef\xbb\xbfimgs/x.png\nimgs/x.png\n")
    with pytest.raises(InputError, match=r"'imgs/x.png' is listed twice \(again on line 2\), first on line"):
        load_items(data(listing))


def test_the_repeat_check_holds_a_bounded_set_and_says_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(Repeats, "LIMIT", 3)
    names = [f"{i}.png" for i in range(5)]
    images(tmp_path, *names)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*names, "./4.png"]) + "\n")  # the repeat comes after the limit
    items = load_items(data(listing))
    assert len(items) == 6
    assert any("checked for the first 3 lines only" in note for note in items.notes)
    listing.write_text("0.png\n1.png\n./0.png\n")
    with pytest.raises(InputError, match="line 3 './0.png' and line 1 '0.png'"):
        load_items(data(listing))


@pytest.mark.parametrize(("first", "second"), [("x.JPEG", "./x.JPEG"), ("x", "x.JPEG"),
                                               ("x.JPEG", "{abs}"), ("sub/../x.JPEG", "x"),
                                               ("x.JPEG", " x.JPEG ")])
def test_a_labels_csv_naming_one_file_twice_is_refused(tmp_path, first, second):
    folder = images(tmp_path / "val", "x.JPEG", "y.JPEG")
    second = second.replace("{abs}", str(folder / "x.JPEG"))
    labels = tmp_path / "labels.csv"
    labels.write_text(f"filename,label\n{first},1\ny.JPEG,2\n{second},3\n")
    with pytest.raises(InputError) as caught:
        load_items(data(folder, labels=str(labels)))
    message = str(caught.value)
    assert message.startswith(f"data.labels {labels}, row 4: {second.strip()!r}")
    assert "(first on row 2); list each file once" in message


def test_labels_csv_spellings_of_one_file_each_find_it(tmp_path):
    folder = images(tmp_path / "val", "a.JPEG", "b.JPEG", "c.JPEG", "d.JPEG")
    images(tmp_path / "other", "e.JPEG")
    labels = tmp_path / "labels.csv"
    labels.write_bytes(f"\ufeff./a.JPEG,1\nb,2\n{folder / 'c.JPEG'},3\nsub/../d.JPEG,4\n"
                       f"{tmp_path}/other/../other/e.JPEG,5\n".encode())
    items = load_items(data(folder, labels=str(labels)))
    assert items.ids == ["a.JPEG", "b.JPEG", "c.JPEG", "d.JPEG", str(tmp_path / "other" / "e.JPEG")]
    assert items.labels == [1, 2, 3, 4, 5] and items.open(4) == str(tmp_path / "other" / "e.JPEG")
    assert not any("not in the labels file" in note for note in items.notes)


def test_a_tar_named_twice_is_read_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tar(tmp_path / "d" / "a.tar", [("k1.png", png())])
    write_tar(tmp_path / "d" / "b.tar", [("k2.png", png())])
    for spec, kept in [("{d,d/../d}/a.tar", ["d/a.tar"]), ("d/{a.tar,*.tar}", ["d/a.tar", "d/b.tar"]),
                       ("{d/a.tar,./d/a.tar,d//a.tar}", ["d/a.tar"])]:
        notes = []
        assert [str(p) for p in expand_shards(spec, notes=notes)] == kept
        assert len(notes) == 1 and "a second time" in notes[0] and "each is read once" in notes[0]
    os.symlink("a.tar", tmp_path / "d" / "c.tar")  # a symlink beside its target
    notes = []
    assert [p.name for p in expand_shards("d", notes=notes)] == ["a.tar", "b.tar"]
    assert "c.tar' is '" in notes[0]
    os.symlink(tmp_path / "d", tmp_path / "e")  # one folder under two names
    assert [str(p) for p in expand_shards("{d,e}/a.tar")] == ["d/a.tar"]
    items = load_items(data("{d,d/../d}/a.tar"))
    assert items.ids == ["d/a.tar/k1"]
    assert any("a second time" in note for note in items.notes)


def test_a_symlinked_tar_keeps_its_own_name(tmp_path):
    write_tar(tmp_path / "elsewhere" / "real.tar", [("k.png", png())])
    (tmp_path / "shards").mkdir()
    os.symlink(tmp_path / "elsewhere" / "real.tar", tmp_path / "shards" / "00000.tar")
    assert load_items(data(tmp_path / "shards")).ids == ["00000.tar/k"]


def test_a_parquet_file_matched_twice_is_read_once(tmp_path):
    folder = tmp_path / "t"
    parquet_file(folder / "a.parquet", ["a0", "a1"])
    parquet_file(folder / "b.parquet", ["b0"])
    for spec in [f"{folder}/{{a,b,a}}.parquet", f"{folder}/{{a.parquet,*.parquet}}"]:
        items = load_items(data(spec, id_column="key"))
        assert items.ids == ["a0", "a1", "b0"]
        assert any("a second time" in note for note in items.notes)
    os.symlink("a.parquet", folder / "c.parquet")
    items = load_items(data(folder, id_column="key"))
    assert items.ids == ["a0", "a1", "b0"]
    assert any("c.parquet' is '" in note for note in items.notes)


def test_a_brace_pattern_naming_one_tar_twice_runs_it_once(tmp_path, tiny_models):
    """The reproduction: the tar ran twice and aggregate blamed 'different runs'."""
    write_tar(tmp_path / "data" / "d" / "a.tar", [("k1.png", png()), ("k2.png", png((0, 90, 200)))])
    out = tmp_path / "out"
    spec = f"{tmp_path}/data/{{d,d/../d}}/a.tar"
    run_job(["--model.name", str(tiny_models["efficientnet"]), "--data.path", spec,
             "--output.dir", str(out)])
    rows = read_rows(out)  # fails on an id written twice
    assert sorted(rows) == ["d/a.tar/k1", "d/a.tar/k2"]
    assert json.loads((out / "metrics.json").read_text())["n"] == 2


# ---------------------------------------------------------------- rule 2: brace patterns


def test_brace_names_are_braceexpand_s(tmp_path):
    patterns = ["item{1..3}", "{a..c}", "index.html{,.backup}", "python{2.{5..7},3.{2,3}}", "{07..10}",
                "{a..g..2}", "{4..1}", "{2..-1}", r"{1\{2,3}", "{a{1,2}}", "{}", "x{a}y", "{a,{b,{c,d}}}",
                "{Z..a}", "{z..A..3}", "{-05..3..2}", "{0..0}", "{{a,b},{c..e}}x{1..2}", "{a,b}{}{c,d}",
                "{,}", r"a\,b{x\,y,z}", "{1..1..0}", "d/{0000..0012..4}.tar", "{a,b}*{1..2}?.tar"]
    generator = random.Random(7)
    patterns += ["".join(generator.choice("ab{},.\\0-19") for _ in range(generator.randint(0, 12)))
                 for _ in range(3000)]
    for pattern in patterns:
        try:
            expected = list(braceexpand(pattern))
        except ValueError:
            with pytest.raises(ShardSpecError, match="Unbalanced braces"):
                brace_names(pattern, "data.path x")
            continue
        count, names = brace_names(pattern, "data.path x")
        assert (count, list(names)) == (len(expected), expected), pattern


@pytest.mark.parametrize(("pattern", "count"), [("d/{0..99999999}.tar", "100,000,000"),
                                                ("d/{000..999}/{000..999}-{a..j}.tar", "10,000,000"),
                                                ("{a,b}" * 40 + ".tar", "1,099,511,627,776")])
def test_a_huge_brace_pattern_is_refused_before_it_is_expanded(tmp_path, pattern, count):
    with pytest.raises(InputError) as caught:
        load_items(data(tmp_path / pattern))
    message = str(caught.value)
    assert f"names {count} files, over the limit of 1,000,000" in message and "\n" not in message


def test_names_below_the_limit_are_generated_one_at_a_time():
    tracemalloc.start()
    try:
        count, names = brace_names("/data/{000000..999999}.tar", "x")
        first = [next(names) for _ in range(3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 1_000_000 and first == ["/data/000000.tar", "/data/000001.tar", "/data/000002.tar"]
    assert peak < 1_000_000  # a list of a million names would be ~70 MB


def test_braces_nested_too_deeply_are_one_line():
    with pytest.raises(ShardSpecError, match="nested too deeply"):
        brace_names("{a," * 3000 + "z" + "}" * 3000, "data.path x")
    count, names = brace_names("{a," * 150 + "z" + "}" * 150, "x")  # deep but few names
    assert count == 151 and list(names)[-1] == "z"


# ---------------------------------------------------------------- rule 3: one-line errors


def _mistakes(tmp_path):
    """(config, what the message says) for each mistake."""
    flat = images(tmp_path / "flat", "x.JPEG", "y.JPEG")
    files = {
        "one.csv": "x.JPEG,1\ny.JPEG\n", "kaggle.csv": "ImageId,PredictionString\nx,n01440764 1 2 3 4\ny,\n",
        "empty-name.csv": "x.JPEG,1\n,2\n", "range.csv": "x.JPEG,1000\n", "header-only.csv": "file,label\n",
        "empty-label.csv": "x.JPEG,\n", "list.txt": "flat/x.JPEG\n", "stem.csv": "z,1\n",
        "huge.csv": "x.JPEG," + "1" * 200_000 + "\n", "tabs.csv": "x.JPEG\t1\n",
    }
    (flat / "z.png").write_bytes(png())
    (flat / "z.jpg").write_bytes(png())
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin.csv").write_bytes(b"x.JPEG,1\ncaf\xe9.JPEG,2\n")
    (tmp_path / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR,\x00\n")
    (tmp_path / "nul.txt").write_bytes(b"flat/x.JPEG\nflat/\x00y.JPEG\n")
    (tmp_path / "random.bin").write_bytes(bytes(range(256)))
    delta = tmp_path / "delta"
    parquet_file(delta / "part-0.parquet", ["a"])
    (delta / "_delta_log").mkdir()
    parquet_file(tmp_path / "nulls" / "a.parquet", ["a", None, "c"])
    parquet_file(tmp_path / "repeats" / "a.parquet", ["a", "b"])
    parquet_file(tmp_path / "repeats" / "b.parquet", ["c", "a"])

    def labels(name):
        return data(flat, labels=str(tmp_path / name))

    return [
        (labels("one.csv"), "one.csv, row 2: one column ('y.JPEG'); each row needs filename,label"),
        (labels("kaggle.csv"), "kaggle.csv, row 3: no label for 'y' (PredictionString is empty"),
        (labels("empty-name.csv"), "empty-name.csv, row 2: the filename cell is empty"),
        (labels("range.csv"), "range.csv, row 1: label index 1000 is outside"),
        (labels("header-only.csv"), "header-only.csv has a header but no rows"),
        (labels("empty-label.csv"), "empty-label.csv, row 1: no label for 'x.JPEG'"),
        (labels("latin.csv"), "latin.csv: not UTF-8 text (invalid continuation byte); save the CSV as UTF-8"),
        (labels("binary.csv"), "binary.csv: not UTF-8 text"),
        (labels("none.csv"), "none.csv does not exist"),
        (labels("stem.csv"), "stem.csv, row 1: 'z' could be 'z.jpg' or another file with that stem; name the "
                             "file with its suffix"),
        (labels("huge.csv"), "huge.csv, row 1: not a readable CSV (field larger than field limit"),
        (labels("tabs.csv"), "tabs.csv, row 1: one column ('x.JPEG\\t1'); each row needs filename,label; the "
                             "columns must be separated by commas, not tabs"),
        (data(flat, id_column="key"), "data.id_column applies to data.kind parquet or hf, not to data.kind "
                                      "images (detected from data.path)"),
        (data(tmp_path / "list.txt", kind="file_list", label_key="cls"),
         "data.label_key applies to data.kind webdataset, not to data.kind file_list"),
        (data(tmp_path / "nulls", split="validation"), "data.split applies to data.kind hf, not to data.kind "
                                                       "parquet"),
        (data(flat, labels=str(flat)), f"data.labels {flat} is a folder, not a CSV file"),
        (data(tmp_path / "nul.txt"), "nul.txt, line 2: a NUL byte"),
        (data(flat, kind="file_list"), f"data.path {flat} is a folder, not a text file of image paths "
                                       "(data.kind: file_list); for a folder of images set data.kind images"),
        (data(tmp_path / "list.txt", kind="imagefolder"),
         "is a file, not a folder with one subfolder per class (data.kind: imagefolder); for this file set "
         "data.kind file_list"),
        (data(tmp_path / "random.bin", kind="images"), "random.bin is a file, not a folder of images"),
        (data(tmp_path / "random.bin", kind="hf"), "random.bin is a file that data.kind hf cannot load"),
        (data(flat, kind="webdataset"), "holds no .tar, .tar.gz, .tgz files (data.kind: webdataset); for a "
                                        "folder of images set data.kind images"),
        (data(flat, kind="parquet"), "holds no .parquet files (data.kind: parquet)"),
        (data(tmp_path / "random.bin", kind="parquet"), "random.bin is not a readable Parquet file"),
        (data(delta), "is a Delta Lake table"),
        (data(tmp_path / "nulls", id_column="key"), "data.id_column 'key': row 1 of a.parquet (row group 0) "
                                                    "has no id (null)"),
        (data(tmp_path / "repeats", id_column="key"), "data.id_column 'key': id 'a' is on row 0 of a.parquet "
                                                      "and again on row 1 of b.parquet; ids must be unique"),
        (data(tmp_path / "{0..5}.tar"), "6 of the 6 files it names do not exist"),
        (data(tmp_path / "{a,b.tar"), "Unbalanced braces"),
    ]


def test_each_mistake_is_one_input_error_naming_where_and_the_fix(tmp_path):
    for config, expected in _mistakes(tmp_path):
        with pytest.raises(InputError) as caught:
            load_items(config)
        message = str(caught.value)
        assert expected in message, (config, message)
        assert "\n" not in message, message


def test_plan_says_each_mistake_in_one_line_and_exits_2(tmp_path, tmp_path_factory, capsys):
    outputs = tmp_path_factory.mktemp("outputs")  # beside the data: never inside a pattern's folder
    for number, (config, expected) in enumerate(_mistakes(tmp_path)):
        argv = ["--data.path", config.path, "--data.kind", config.kind, "--model.name", "x",
                "--output.dir", str(outputs / f"out{number}")]
        for key in ("labels", "id_column", "label_key", "split"):
            if getattr(config, key):
                argv += [f"--data.{key}", getattr(config, key)]
        assert plan_main(argv) == 2, argv
        error = capsys.readouterr().err.strip()
        assert error.startswith("batch-classify plan: ") and expected in error, error
        assert len(error.splitlines()) == 1 and "Traceback" not in error


def test_the_reproductions_through_the_command_line(tmp_path, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    images(tmp_path / "flat", "x.JPEG")
    listing = tmp_path / "list.txt"
    listing.write_text(f"flat/x.JPEG\n./flat/x.JPEG\n{tmp_path / 'flat' / 'x.JPEG'}\n")
    for path, expected in [(str(listing), "line 2 './flat/x.JPEG' and line 1 'flat/x.JPEG' name the same"),
                           (f"{tmp_path}/{{0..99999999}}.tar", "names 100,000,000 files")]:
        result = subprocess.run([sys.executable, "-m", "batch_classify", "plan", "--data.path", path,
                                 "--output.dir", str(outputs / "out"), "--model.name", "x"],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- Parquet layouts and ids


def test_a_spark_table_folder_is_a_parquet_input(tmp_path):
    table = tmp_path / "table.parquet"
    parquet_file(table / "label=3" / "part-00000-x.snappy.parquet", ["a", "b", "c"])
    parquet_file(table / "label=4" / "part-00001-x.snappy.parquet", ["d"])
    parquet_file(table / "_temporary" / "0" / "part-00002-x.snappy.parquet", ["half-written"])
    (table / "_SUCCESS").write_bytes(b"")
    (table / ".part-00000-x.snappy.parquet.crc").write_bytes(b"crc")
    pq.write_metadata(pq.read_schema(table / "label=4" / "part-00001-x.snappy.parquet"), table / "_metadata")
    for path in (table, f"{table}/"):
        assert detect_kind(data(path)) == "parquet"
        assert load_items(data(path, id_column="key")).ids == ["a", "b", "c", "d"]
    plain = tmp_path / "plain"  # not named .parquet: told by the part files one folder down
    parquet_file(plain / "key=1" / "part-0.parquet", ["e"])
    (plain / "_SUCCESS").write_bytes(b"")
    assert detect_kind(data(plain)) == "parquet"
    # Spark folders matched by a glob are searched like the folder itself
    assert load_items(data(f"{tmp_path}/*.parquet", id_column="key")).ids == ["a", "b", "c", "d"]


def test_null_ids_past_the_checked_rows_are_found_from_footers_or_by_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(Repeats, "LIMIT", 2)
    for statistics in (True, False):
        folder = tmp_path / f"stats-{statistics}"
        parquet_file(folder / "a.parquet", ["a", "b", "c", "d"], statistics=statistics)
        parquet_file(folder / "b.parquet", ["e", "f", None, "h"], statistics=statistics)
        with pytest.raises(InputError, match=r"row 2 of b.parquet \(row group 1\) has no id"):
            load_items(data(folder, id_column="key"))
        fine = tmp_path / f"fine-{statistics}"
        parquet_file(fine / "a.parquet", ["a", "b", "c", "a"], statistics=statistics)
        items = load_items(data(fine, id_column="key"))  # the repeat lies past the checked rows
        assert "None" not in items.ids and any("first 2 rows only" in note for note in items.notes)


def test_hugging_face_ids_with_nulls_or_repeats_are_refused(tmp_path):
    image = [{"bytes": png(), "path": None}] * 3
    features = datasets.Features({"image": datasets.Image(), "key": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": image, "key": ["a", None, "c"]}, features=features).save_to_disk(
        tmp_path / "nulls")
    datasets.Dataset.from_dict({"image": image, "key": ["a", "b", "a"]}, features=features).save_to_disk(
        tmp_path / "repeats")
    with pytest.raises(InputError, match=r"data.id_column 'key': row 1 of the dataset has no id \(null\)"):
        load_items(data(tmp_path / "nulls", id_column="key"))
    with pytest.raises(InputError, match="id 'a' is on row 0 and again on row 2; ids must be unique"):
        load_items(data(tmp_path / "repeats", id_column="key"))
