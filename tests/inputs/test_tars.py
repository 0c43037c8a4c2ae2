"""WebDataset tar shards: the key rule, labels, every error type, truncation anywhere, and naming
shards by file, folder, glob and brace pattern. Expectations come from tarfile's own reading of
the intact tars the tests write, not from the reader under test."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from fixtures_wds import flawed_tars, jpeg, make_wds, sample_members, tiny_image, write_tar
from PIL import Image

from batch_classify.core.labels import wnid_to_index
from batch_classify.inputs.tars import ShardSample, ShardSpecError, expand_shards, iter_tar, shard_root


def read(path: Path, **kwargs) -> list[ShardSample]:
    return list(iter_tar(path, path.name, **kwargs))


def error_type(sample: ShardSample) -> str | None:
    return None if sample.error is None else sample.error.split(":", 1)[0]


def members_of(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def assert_same_without_images(path: Path, **kwargs) -> None:
    with_images = read(path, **kwargs)
    without = read(path, read_images=False, **kwargs)
    assert [(s.id, s.label, s.error) for s in without] == [(s.id, s.label, s.error) for s in with_images]
    assert all(s.image is None for s in without)


# Good shards ----------------------------------------------------------------------------------

def test_samples_come_in_tar_order_with_their_image_bytes_and_cls_labels(tmp_path):
    images = [(f"{i:09d}", tiny_image(i), None if i == 3 else i * 100) for i in range(7)]
    tars = make_wds(tmp_path, images, per_tar=3)
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    records = [s for tar in tars for s in read(tar)]
    expected_ids = [f"{i // 3:05d}.tar/{key}" for i, (key, _, _) in enumerate(images)]
    assert [s.id for s in records] == expected_ids
    assert [s.label for s in records] == [label for _, _, label in images]
    assert all(s.error is None for s in records)
    for sample, (_, image, _) in zip(records, images):
        assert sample.image == jpeg(image)
        assert Image.open(io.BytesIO(sample.image)).size == image.size
    for tar in tars:
        assert_same_without_images(tar)


def test_labels_from_a_json_field_as_index_or_wnid(tmp_path):
    tench, goldfish = wnid_to_index()["n01440764"], wnid_to_index()["n01443537"]
    picture = jpeg(tiny_image(1))
    tar = write_tar(tmp_path / "j.tar", [
        ("idx.jpg", picture), ("idx.json", b'{"label": 7, "caption": "x"}'),
        ("text.jpg", picture), ("text.json", b'{"label": "12"}'),
        ("wnid.jpg", picture), ("wnid.json", b'{"label": "n01440764"}'),
        # with label_key the json decides, a .cls beside it is ignored
        ("both.jpg", picture), ("both.cls", b"3"), ("both.json", b'{"label": "n01443537"}'),
        ("nofield.jpg", picture), ("nofield.json", b'{"caption": "x"}'),
        ("null.jpg", picture), ("null.json", b'{"label": null}'),
        ("nojson.jpg", picture),
    ])
    records = read(tar, label_key="label")
    assert [(s.id.split("/", 1)[1], s.label, s.error) for s in records] == [
        ("idx", 7, None), ("text", 12, None), ("wnid", tench, None), ("both", goldfish, None),
        ("nofield", None, None), ("null", None, None), ("nojson", None, None)]
    assert_same_without_images(tar, label_key="label")
    # without label_key the json is just another member and the .cls is the label
    assert [s.label for s in read(tar)] == [None, None, None, 3, None, None, None]
    # make_wds writes json labels the same way
    [shard] = make_wds(tmp_path / "wds", [("k0", tiny_image(0), 9), ("k1", tiny_image(1), None)],
                       per_tar=5, json_labels=True)
    assert [(s.label, s.error) for s in read(shard, label_key="label")] == [(9, None), (None, None)]


# A label is quoted only where it has a label's shape (an integer, a wnid); other text is
# described by its length, never copied into the row.
@pytest.mark.parametrize(("suffix", "payload", "shown"), [
    ("cls", b"1000", "1000"), ("cls", b"cat", "(3 characters)"), ("cls", b"", "(empty)"),
    ("cls", b"-1", "-1"), ("cls", b"\xff\xfe", "(2 bytes) is not UTF-8"),
    ("json", b'{"label": 1000}', "1000"), ("json", b'{"label": "n99999999"}', "n99999999"),
    ("json", b'{"label": true}', "a boolean"), ("json", b'{"label": 2.5}', "a non-integer number"),
    ("json", b"{not json", "not valid JSON"), ("json", b"[1, 2]", "an array, not an object"),
])
def test_a_bad_label_is_an_error_naming_the_key_and_the_value(tmp_path, suffix, payload, shown):
    picture = jpeg(tiny_image(2))
    tar = write_tar(tmp_path / "bad.tar", [
        ("ok.jpg", picture), ("ok.cls", b"1"), ("ok.json", b'{"label": 1}'),
        ("badkey.jpg", picture), (f"badkey.{suffix}", payload)])
    records = read(tar, label_key="label" if suffix == "json" else None)
    assert [(s.id, s.label, s.error) for s in records[:1]] == [("bad.tar/ok", 1, None)]
    bad = records[1]
    assert (bad.id, bad.label, bad.image, error_type(bad)) == ("bad.tar/badkey", None, None, "BadLabel")
    assert "bad.tar" in bad.error and "'badkey'" in bad.error and shown in bad.error
    assert len(records) == 2


def test_key_rule_directories_hidden_members_and_the_image_choice(tmp_path):
    png = io.BytesIO()
    tiny_image(3).save(png, format="PNG")
    jpg = jpeg(tiny_image(4))
    path = tmp_path / "k.tar"
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("shard")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    members = [
        ("shard/a.b.jpg", jpg), ("shard/a.cls", b"4"),         # key shard/a, suffix b.jpg is an image
        ("shard/.hidden.jpg", jpg), ("._junk.jpg", jpg),      # hidden basenames: skipped
        ("shard/c.PNG", png.getvalue()), ("shard/c.jpg", jpg),  # first image member wins
        ("shard/d.tar.gz.JPEG", jpg),                         # suffix tar.gz.jpeg ends in an image type
    ]
    with tarfile.open(path, "a") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records = read(path)
    assert [(s.id, s.label, s.error) for s in records] == [
        ("k.tar/shard/a", 4, None), ("k.tar/shard/c", None, None), ("k.tar/shard/d", None, None)]
    assert records[0].image == jpg and records[1].image == png.getvalue()
    # image_suffixes decides what an image is
    only_png = read(path, image_suffixes=("PNG",))
    assert [(s.id, error_type(s)) for s in only_png] == [
        ("k.tar/shard/a", "MissingImage"), ("k.tar/shard/c", None), ("k.tar/shard/d", "MissingImage")]
    assert only_png[1].image == png.getvalue()


# Flawed shards --------------------------------------------------------------------------------

def test_flawed_fixtures_yield_what_their_docstrings_say(tmp_path):
    tars = flawed_tars(tmp_path)
    got = {case: [(s.id, s.label, error_type(s)) for s in read(path)] for case, path in tars.items()}
    split_offset = next(m.offset for m in members_of(tars["split_sample"]) if m.name == "a.txt")
    assert got == {
        "not_a_tar": [("not_a_tar.tar", None, "NotATar")],
        "truncated": [("truncated.tar/s0", 0, None), ("truncated.tar/s1", 1, None),
                      ("truncated.tar", None, "TruncatedShard")],
        "missing_image": [("missing_image.tar/m0", 0, None),
                          ("missing_image.tar/nopic", None, "MissingImage"),
                          ("missing_image.tar/m1", 1, None)],
        "duplicate_member": [("duplicate_member.tar/d0", 0, None),
                             ("duplicate_member.tar/twice", None, "DuplicateMember"),
                             ("duplicate_member.tar/d1", 1, None)],
        "split_sample": [("split_sample.tar/a", 0, None), ("split_sample.tar/b", 1, None),
                         (f"split_sample.tar/a@{split_offset}", None, "SplitSample")],
        "empty": [("empty.tar", None, "EmptyShard")],
    }
    truncated = read(tars["truncated"])[-1].error
    assert f"byte {tars['truncated'].stat().st_size}" in truncated and "'s2.jpg'" in truncated
    for path in tars.values():
        records = read(path)
        assert all(s.image is None for s in records if s.error)
        assert all(s.image for s in records if not s.error)
        assert all(s.error.startswith(f"{error_type(s)}: {path.name}") for s in records if s.error)
        assert_same_without_images(path)


@pytest.mark.parametrize("content", [b"", b"hello, not a tar\n", b"\x00" * 100,
                                     b"%PDF-1.4 " + b"x" * 2000, gzip.compress(b"not a tar either" * 40)])
def test_a_file_that_is_not_a_tar_is_one_error_record(tmp_path, content):
    path = tmp_path / "x.tar"
    path.write_bytes(content)
    assert [(s.id, s.label, s.image, error_type(s)) for s in read(path)] == [("x.tar", None, None, "NotATar")]
    assert "x.tar" in read(path)[0].error


def test_a_tar_without_samples_is_one_empty_shard_record(tmp_path):
    path = tmp_path / "dirs.tar"
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("a")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        hidden = tarfile.TarInfo("a/.DS_Store")
        tar.addfile(hidden, io.BytesIO(b""))
    assert [(s.id, error_type(s)) for s in read(path)] == [("dirs.tar", "EmptyShard")]


def test_duplicate_suffixes_are_compared_lower_cased_and_no_member_is_picked(tmp_path):
    picture, other = jpeg(tiny_image(1)), jpeg(tiny_image(2))
    tar = write_tar(tmp_path / "d.tar", [("x.jpg", picture), ("x.JPG", other), ("x.cls", b"1"),
                                         ("y.jpg", picture), ("y.cls", b"2"), ("y.CLS", b"3")])
    records = read(tar)
    assert [(s.id, s.label, s.image, error_type(s)) for s in records] == [
        ("d.tar/x", None, None, "DuplicateMember"), ("d.tar/y", None, None, "DuplicateMember")]
    offsets = {m.name: m.offset for m in members_of(tar)}
    assert "'x.jpg'" in records[0].error and "'x.JPG'" in records[0].error
    assert f"byte {offsets['x.JPG']}" in records[0].error
    assert "'y.CLS'" in records[1].error


def test_a_key_that_reappears_is_an_error_with_its_own_unique_id(tmp_path):
    parts = {key: sample_members(key, tiny_image(i), i) for i, key in enumerate("abc")}
    order = [parts["a"][0], parts["b"][0], parts["a"][1], parts["c"][0], parts["a"][2], parts["b"][1]]
    tar = write_tar(tmp_path / "s.tar", order)
    offsets = {m.name: m.offset for m in members_of(tar)}
    records = read(tar)
    assert [(s.id, error_type(s)) for s in records] == [
        ("s.tar/a", None), ("s.tar/b", None),
        (f"s.tar/a@{offsets['a.cls']}", "SplitSample"), ("s.tar/c", None),
        (f"s.tar/a@{offsets['a.txt']}", "SplitSample"), (f"s.tar/b@{offsets['b.cls']}", "SplitSample")]
    assert len({s.id for s in records}) == len(records)
    assert "'a'" in records[2].error and f"byte {offsets['a.cls']}" in records[2].error
    # the first part is an ordinary sample: its label member came later, so it has none
    assert records[0].label is None and records[0].image == parts["a"][0][1]
    assert_same_without_images(tar)


def test_members_that_are_not_regular_files_make_their_sample_an_error(tmp_path):
    picture = jpeg(tiny_image(1))
    path = write_tar(tmp_path / "l.tar", [("good.jpg", picture)])
    with tarfile.open(path, "a") as tar:
        link = tarfile.TarInfo("linked.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("hard.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "good.jpg"
        tar.addfile(hard)
        caption = tarfile.TarInfo("hard.txt")
        caption.size = 1
        tar.addfile(caption, io.BytesIO(b"x"))
    records = read(path)
    assert [(s.id, s.image, error_type(s)) for s in records] == [
        ("l.tar/good", picture, None), ("l.tar/linked", None, "NotRegularMember"),
        ("l.tar/hard", None, "NotRegularMember")]
    assert "'linked.jpg'" in records[1].error and "symlink" in records[1].error
    assert "'/etc/passwd'" in records[1].error and "hard link" in records[2].error
    assert_same_without_images(path)


# Truncation -----------------------------------------------------------------------------------

def four_sample_tar(tmp_path: Path, name: str = "t.tar") -> tuple[Path, list[str], list[tarfile.TarInfo]]:
    keys = [f"k{i}" for i in range(4)]
    members = [m for i, key in enumerate(keys) for m in sample_members(key, tiny_image(i, (30, 20)), i)]
    path = write_tar(tmp_path / name, members)
    return path, keys, members_of(path)


def expected_before_cut(keys: list[str], infos: list[tarfile.TarInfo], cut: int) -> list[str]:
    """Keys whose sample is known complete when the file ends at `cut`: the next sample's first
    header was read whole (for the last sample: the end-of-archive block)."""
    first_header = {}
    for info in infos:
        first_header.setdefault(info.name.split(".")[0], info.offset)
    last = infos[-1]
    archive_end = last.offset_data + -(-last.size // 512) * 512
    complete_after = [first_header[key] for key in keys[1:]] + [archive_end]
    return [key for key, after in zip(keys, complete_after) if after + 512 <= cut]


def check_cut(path: Path, data: bytes, keys: list[str], infos: list[tarfile.TarInfo], cut: int) -> str:
    path.write_bytes(data[:cut])
    records = read(path)
    expected = expected_before_cut(keys, infos, cut)
    assert [s.id for s in records[:-1]] == [f"{path.name}/{key}" for key in expected]
    assert all(s.error is None and s.image for s in records[:-1])
    assert [s.label for s in records[:-1]] == [keys.index(key) for key in expected]
    damaged = records[-1]
    assert (damaged.id, damaged.image, error_type(damaged)) == (path.name, None, "TruncatedShard")
    assert f"byte {cut}" in damaged.error and path.name in damaged.error
    assert_same_without_images(path)
    return damaged.error


def test_truncation_at_named_places(tmp_path):
    source, keys, infos = four_sample_tar(tmp_path, "source.tar")
    data = source.read_bytes()
    by_name = {info.name: info for info in infos}
    path = tmp_path / "t.tar"
    inside_header = check_cut(path, data, keys, infos, by_name["k2.jpg"].offset + 100)
    assert "header" in inside_header
    inside_image = check_cut(path, data, keys, infos, by_name["k1.jpg"].offset_data + 10)
    assert "'k1.jpg'" in inside_image
    last = infos[-1]
    inside_last = check_cut(path, data, keys, infos, last.offset_data + 1)
    assert f"'{last.name}'" in inside_last
    at_boundary = check_cut(path, data, keys, infos, by_name["k3.jpg"].offset)
    assert "end-of-archive" in at_boundary
    check_cut(path, data, keys, infos, last.offset_data + 512 + 100)  # inside the end-of-archive block


def test_truncation_anywhere_yields_the_complete_samples_then_one_record(tmp_path):
    source, keys, infos = four_sample_tar(tmp_path, "source.tar")
    data = source.read_bytes()
    last = infos[-1]
    archive_end = last.offset_data + -(-last.size // 512) * 512
    for cut in range(512, archive_end + 512, 173):
        check_cut(tmp_path / "t.tar", data, keys, infos, cut)


def test_a_cut_inside_the_first_header_is_not_a_tar(tmp_path):
    source, _, _ = four_sample_tar(tmp_path, "source.tar")
    path = tmp_path / "t.tar"
    path.write_bytes(source.read_bytes()[:300])
    assert [(s.id, error_type(s)) for s in read(path)] == [("t.tar", "NotATar")]


def test_one_zero_block_is_enough_to_end_the_archive(tmp_path):
    source, keys, infos = four_sample_tar(tmp_path, "source.tar")
    last = infos[-1]
    path = tmp_path / "t.tar"
    path.write_bytes(source.read_bytes()[:last.offset_data + -(-last.size // 512) * 512 + 512])
    assert [(s.id, s.error) for s in read(path)] == [(f"t.tar/{key}", None) for key in keys]


def test_a_garbled_header_after_the_start_is_a_corrupt_shard(tmp_path):
    source, keys, infos = four_sample_tar(tmp_path, "source.tar")
    data = bytearray(source.read_bytes())
    offset = next(info.offset for info in infos if info.name == "k2.jpg")
    data[offset:offset + 512] = b"garbage!" * 64
    path = tmp_path / "t.tar"
    path.write_bytes(bytes(data))
    records = read(path)
    assert [(s.id, error_type(s)) for s in records] == [("t.tar/k0", None), ("t.tar", "CorruptShard")]
    assert f"byte {offset}" in records[-1].error and "'k1'" in records[-1].error


def test_members_that_are_not_needed_are_streamed_past_not_held(tmp_path):
    big = b"\x01" * (24 << 20)
    path = write_tar(tmp_path / "big.tar", [("a.jpg", jpeg(tiny_image(1))), ("a.txt", big), ("a.cls", b"3"),
                                            ("b.jpg", big), ("b.cls", b"4")])
    del big
    for read_images in (True, False):
        tracemalloc.start()
        try:
            records = []
            for sample in iter_tar(path, "big.tar", read_images=read_images):
                records.append((sample.id, sample.label, sample.error))
                if sample.id.endswith("/a"):
                    # the only image held so far is a's; the 24 MiB caption was skipped
                    assert tracemalloc.get_traced_memory()[1] < 12 << 20
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert records == [("big.tar/a", 3, None), ("big.tar/b", 4, None)]
        assert (peak < 12 << 20) == (not read_images), peak  # b's 24 MiB image is read only when asked


def test_reading_is_lazy(tmp_path):
    source, keys, infos = four_sample_tar(tmp_path, "source.tar")
    path = tmp_path / "t.tar"
    path.write_bytes(source.read_bytes()[:infos[-1].offset_data + 5])
    records = iter_tar(path, "t.tar")
    assert next(records).id == "t.tar/k0"  # a good sample before the damage is read
    records.close()


# Compressed shards ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["g.tar.gz", "g.tgz"])
def test_gzip_tars_read_like_plain_ones(tmp_path, name):
    source, keys, _ = four_sample_tar(tmp_path, "source.tar")
    plain = read(source)
    path = tmp_path / name
    path.write_bytes(gzip.compress(source.read_bytes()))
    assert [(s.id.split("/", 1)[1], s.label, s.image, s.error) for s in read(path)] == [
        (s.id.split("/", 1)[1], s.label, s.image, s.error) for s in plain]
    assert_same_without_images(path)


def test_a_truncated_gzip_tar_is_a_truncated_shard(tmp_path):
    source, keys, infos = four_sample_tar(tmp_path, "source.tar")
    compressed = gzip.compress(source.read_bytes(), compresslevel=0)  # stored: offsets stay close
    path = tmp_path / "g.tar.gz"
    path.write_bytes(compressed[:len(compressed) * 2 // 3])
    records = read(path)
    assert error_type(records[-1]) == "TruncatedShard" and records[-1].id == "g.tar.gz"
    good = [s.id for s in records[:-1]]
    assert good == [f"g.tar.gz/{key}" for key in keys[:len(good)]] and 1 <= len(good) < 4
    assert all(s.error is None for s in records[:-1])
    assert_same_without_images(path)


# Naming shards --------------------------------------------------------------------------------

def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_a_folder_is_searched_recursively_and_sorted_by_relative_path(tmp_path):
    names = ["b/00001.tar", "a/00002.tgz", "a/00001.tar.gz", "00000.tar", "a/deeper/x.tar", "a/00010.tar"]
    for name in names:
        touch(tmp_path / "data" / name)
    for other in ["00000.parquet", "00000_stats.json", "a/.00003.tar", ".hidden/y.tar", "a/notes.txt"]:
        touch(tmp_path / "data" / other)
    (tmp_path / "data" / "c.tar").mkdir()  # a folder named like a shard is searched, not returned
    found = expand_shards(str(tmp_path / "data"))
    assert [p.relative_to(tmp_path / "data").as_posix() for p in found] == sorted(names)
    assert shard_root(str(tmp_path / "data")) == tmp_path / "data"


def test_a_single_tar_and_its_root(tmp_path):
    path = touch(tmp_path / "one" / "00007.tar")
    assert expand_shards(str(path)) == [path]
    assert shard_root(str(path)) == tmp_path / "one"


def test_globs_are_sorted(tmp_path):
    for name in ["x/00002.tar", "y/00001.tar", "x/00001.tar", "x/10000.tar", "y/notes.txt"]:
        touch(tmp_path / name)
    spec = str(tmp_path / "*" / "0*.tar")
    assert expand_shards(spec) == [
        tmp_path / "x/00001.tar", tmp_path / "x/00002.tar", tmp_path / "y/00001.tar"]
    assert shard_root(spec) == tmp_path
    assert shard_root(str(tmp_path / "x" / "0000?.tar")) == tmp_path / "x"


def test_brace_ranges_zero_padded_and_lists(tmp_path):
    for i in range(12):
        touch(tmp_path / "laion" / f"{i:05d}.tar")
    spec = str(tmp_path / "laion" / "{00000..00011}.tar")
    assert expand_shards(spec) == [tmp_path / "laion" / f"{i:05d}.tar" for i in range(12)]
    assert shard_root(spec) == tmp_path / "laion"
    assert expand_shards(str(tmp_path / "laion" / "{00003,00001}.tar")) == [
        tmp_path / "laion/00003.tar", tmp_path / "laion/00001.tar"]
    touch(tmp_path / "laion2" / "00008.tar")
    touch(tmp_path / "laion2" / "00009.tar")
    spec = str(tmp_path / "{laion,laion2}" / "0000{8..9}.tar")
    assert expand_shards(spec) == [tmp_path / "laion/00008.tar", tmp_path / "laion/00009.tar",
                                   tmp_path / "laion2/00008.tar", tmp_path / "laion2/00009.tar"]
    assert shard_root(spec) == tmp_path


def test_a_relative_spec_is_taken_from_root(tmp_path):
    for i in range(3):
        touch(tmp_path / "d" / f"{i:05d}.tar")
    assert expand_shards("d/{00000..00002}.tar", root=tmp_path) == [
        tmp_path / "d" / f"{i:05d}.tar" for i in range(3)]
    assert shard_root("d/{00000..00002}.tar", root=tmp_path) == tmp_path / "d"
    assert expand_shards("d", root=tmp_path) == [tmp_path / "d" / f"{i:05d}.tar" for i in range(3)]
    assert shard_root("d/*.tar") == Path("d")


@pytest.mark.parametrize("spec", ["nothing/here.tar", "empty-folder", "{00000..00005}.tar", "*.tar",
                                  "sub/*.tgz", "{00000..00001.tar", "00000.tar/{a,b}.tar"])
def test_specs_that_name_nothing_raise_a_clear_error(tmp_path, spec):
    (tmp_path / "empty-folder").mkdir()
    if spec != "*.tar":
        touch(tmp_path / "00000.tar")
        touch(tmp_path / "00003.tar")
    with pytest.raises(ShardSpecError, match="shard spec") as caught:
        expand_shards(spec, root=tmp_path)
    assert spec in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_missing_file_in_a_brace_range_is_named(tmp_path):
    for i in (0, 1, 3):
        touch(tmp_path / f"{i:05d}.tar")
    with pytest.raises(ShardSpecError, match=r"1 of the 4 .*00002\.tar"):
        expand_shards(str(tmp_path / "{00000..00003}.tar"))


def test_expanded_shards_read_end_to_end(tmp_path):
    images = [(f"img{i}", tiny_image(i), i) for i in range(5)]
    make_wds(tmp_path / "wds", images, per_tar=2)
    spec = str(tmp_path / "wds" / "{00000..00002}.tar")
    root = shard_root(spec)
    records = [s for tar in expand_shards(spec) for s in iter_tar(tar, tar.relative_to(root).as_posix())]
    assert [(s.id, s.label) for s in records] == [
        (f"{i // 2:05d}.tar/img{i}", i) for i in range(5)]
    assert json.dumps([s.id for s in records])  # ids are plain strings


def test_long_and_non_utf8_member_names(tmp_path):
    picture = jpeg(tiny_image(1))
    folder = "d" * 120
    path = tmp_path / "n.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in [(f"{folder}/x.jpg", picture), (f"{folder}/x.cls", b"5"),
                           ("caf\udce9.jpg", picture), (f"{folder}/x.txt", b"later")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    offset = next(m.offset for m in members_of(path) if m.name.endswith("x.txt"))
    records = read(path)
    assert [(s.id, s.label, error_type(s)) for s in records] == [
        (f"n.tar/{folder}/x", 5, None), ("n.tar/caf\\xe9", None, None),
        (f"n.tar/{folder}/x@{offset}", None, "SplitSample")]
    assert all(s.id.encode("utf-8") for s in records)
    assert_same_without_images(path)
