"""Every item's cost is bounded, and no error text quotes a file's contents.

Each rule is attacked with the reproduced cases (a sparse tar claiming 20 GB, a gzip bomb, a
FIFO, a 1xN strip, a 16-bit PNG, a deeply nested label, a secret file named by a path) and
with variants of them, under small limits set as the job's config sets them."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import tarfile
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import _photo, read_rows, run_job
from fixtures_wds import jpeg, tiny_image, write_tar
from PIL import Image

from batch_classify.bench.hostile import ZeroStream, sparse_header
from batch_classify.commands.cli import main as cli_main
from batch_classify.core import limits as limits_module
from batch_classify.core.limits import FileTooLarge, Limits, NotRegularFile, open_regular
from batch_classify.inputs.listing import read_listing
from batch_classify.inputs.tars import MAX_JSON_DEPTH, iter_tar
from batch_classify.pipeline.decode import (
    ItemKey,
    Task,
    TaskDataset,
    open_image,
    read_encoded,
    read_pixels,
    to_rgb,
    without_bytes,
)
from batch_classify.pipeline.preprocess import FastTransform, PixelSpec

MB = 1_000_000
SECRET = b"SECRET-7f3a9c-do-not-copy\n"


def error_type(error: str | None) -> str | None:
    return None if error is None else error.split(":", 1)[0]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(path: Path, size: tuple[int, int]) -> Path:
    """A PNG of random pixels: it does not compress, so its file is about 3 bytes a pixel."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def sparse_tar(path: Path, name: str, claimed: int, after: list[tuple[str, bytes]] = ()) -> Path:
    """A GNU sparse member that claims ``claimed`` bytes and stores none (a 1.5 KB file whose
    member reads as 20 GB of zeros), then ordinary members."""
    rest = io.BytesIO()
    with tarfile.open(fileobj=rest, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member, data in after:
            item = tarfile.TarInfo(member)
            item.size = len(data)
            tar.addfile(item, io.BytesIO(data))
    path.write_bytes(sparse_header(name, claimed) + rest.getvalue())
    return path


def zeros_tar_stream(out, members: list[tuple[str, bytes | int]]) -> None:
    """A tar written to ``out`` where an int member is that many zero bytes, streamed in
    1 MiB pieces (a gzip bomb is built without holding its member)."""
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            tar.addfile(info, ZeroStream(data) if isinstance(data, int) else io.BytesIO(data))


def within(seconds: float, function, *args):
    """``function(*args)`` on a thread that must finish in time (a FIFO open would hang)."""
    result: dict = {}

    def run():
        try:
            result["value"] = function(*args)
        except BaseException as error:  # handed to the test
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} blocked"
    if "error" in result:
        raise result["error"]
    return result["value"]


# Rule 1: a byte limit, checked from the size known before reading -----------------------------

@pytest.mark.parametrize("reader", [open_image, read_pixels, read_encoded])
def test_an_image_file_over_the_byte_limit_is_refused_from_its_size(tmp_path, reader, monkeypatch):
    path = noise_png(tmp_path / "big.png", (900, 800))  # about 2 MB
    size = path.stat().st_size
    assert 2 * MB < size < 3 * MB
    opened = []
    real_fdopen = os.fdopen
    monkeypatch.setattr(limits_module.os, "fdopen", lambda *a, **k: opened.append(a) or real_fdopen(*a, **k))
    with pytest.raises(FileTooLarge) as caught:
        reader(str(path), Limits(max_image_bytes=MB))
    assert str(caught.value) == f"the file is {size} bytes, over runtime.max_image_bytes ({MB})"
    assert opened == []  # refused from fstat: no stream was ever made to read it
    assert reader(str(path), Limits(max_image_bytes=3 * MB)) is not None
    # bytes in memory (a Parquet cell, a dataset row) are held to the same limit
    with pytest.raises(FileTooLarge, match="max_image_bytes"):
        reader(io.BytesIO(path.read_bytes()), Limits(max_image_bytes=MB))


def test_a_tar_member_over_the_byte_limit_is_an_error_record_and_is_never_read(tmp_path):
    big = np.random.default_rng(1).integers(0, 256, 12 * MB, np.uint8).tobytes()
    path = write_tar(tmp_path / "t.tar", [("a.jpg", jpeg(tiny_image(1))), ("a.cls", b"1"),
                                          ("b.png", big), ("b.cls", b"2"),
                                          ("c.jpg", jpeg(tiny_image(3))), ("c.cls", b"3")])
    size = len(big)
    del big
    for read_images in (True, False):
        tracemalloc.start()
        try:
            records = list(iter_tar(path, "t.tar", read_images=read_images,
                                    limits=Limits(max_image_bytes=MB)))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [(r.id, r.label, error_type(r.error)) for r in records] == [
            ("t.tar/a", 1, None), ("t.tar/b", None, "FileTooLarge"), ("t.tar/c", 3, None)]
        assert f"member 'b.png' at byte 2560 is {size} bytes" in records[1].error
        assert f"over runtime.max_image_bytes ({MB})" in records[1].error
        assert peak < 8 * MB, peak  # b's 12 MB were streamed past, not held


def test_a_sparse_member_claiming_20_gb_is_refused_from_its_header(tmp_path):
    path = sparse_tar(tmp_path / "sparse.tar", "huge.jpg", 20 << 30,
                      after=[("ok.jpg", jpeg(tiny_image(5))), ("ok.cls", b"7")])
    assert path.stat().st_size < 16_000
    tracemalloc.start()
    try:
        records = within(30, lambda: list(iter_tar(path, "sparse.tar")))  # the default limit
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r.id, r.label, error_type(r.error)) for r in records] == [
        ("sparse.tar/huge", None, "FileTooLarge"), ("sparse.tar/ok", 7, None)]
    assert f"is {20 << 30} bytes, over runtime.max_image_bytes ({256 << 20})" in records[0].error
    assert peak < 4 * MB


@pytest.mark.parametrize("compression", ["gzip", "xz"])
def test_a_compression_bomb_stops_at_the_decompressed_limit_with_one_record(tmp_path, compression):
    """A tar.gz with a 64 MB member of zeros (64 KB compressed) under a 8 MB decompressed
    limit: the samples before it come out, then one ShardTooLarge record; memory stays small
    (tarfile's own stream inflated a whole 1 MiB compressed read at once: 1 GiB of zeros).
    The member is over the image limit, so the reader skips it; an image member under the
    image limit is read, and the decompressed limit stops that read too."""
    path = tmp_path / ("bomb.tar.gz" if compression == "gzip" else "bomb.tar.xz")
    opener = gzip.open if compression == "gzip" else lzma.open
    with opener(path, "wb") as out:
        zeros_tar_stream(out, [("a.jpg", jpeg(tiny_image(1))), ("a.cls", b"1"),
                               ("b.jpg", 64 << 20), ("b.cls", b"2"), ("c.jpg", jpeg(tiny_image(2)))])
    assert path.stat().st_size < MB
    limits = Limits(max_decompressed_bytes=8 << 20, max_image_bytes=MB)
    for read_images in (True, False):
        tracemalloc.start()
        try:
            records = list(iter_tar(path, path.name, read_images=read_images, limits=limits))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [(r.id, error_type(r.error)) for r in records] == [
            (f"{path.name}/a", None), (path.name, "ShardTooLarge")]
        assert f"passes runtime.max_decompressed_bytes ({8 << 20})" in records[-1].error
        assert "sample 'b' may be incomplete" in records[-1].error
        # a few 1 MiB read buffers, plus xz's own dictionary (8 MiB at its default preset)
        assert peak < (6 if compression == "gzip" else 16) * MB, peak
    records = list(iter_tar(path, path.name, limits=Limits(max_decompressed_bytes=8 << 20)))
    assert [(r.id, error_type(r.error)) for r in records] == [
        (f"{path.name}/a", None), (path.name, "ShardTooLarge")]
    # under a limit it fits, the same tar is read to its end (the big member is over the
    # image limit, so it is a row of its own, unread)
    records = list(iter_tar(path, path.name, limits=Limits(max_image_bytes=MB)))
    assert [(r.id, error_type(r.error)) for r in records] == [
        (f"{path.name}/a", None), (f"{path.name}/b", "FileTooLarge"), (f"{path.name}/c", None)]


def test_concatenated_gzip_members_read_as_one_tar(tmp_path):
    """pigz and bgzip write several gzip members; they are one stream."""
    plain = write_tar(tmp_path / "p.tar", [("a.jpg", jpeg(tiny_image(1))), ("a.cls", b"4"),
                                           ("b.jpg", jpeg(tiny_image(2))), ("b.cls", b"5")])
    data = plain.read_bytes()
    path = tmp_path / "multi.tar.gz"
    path.write_bytes(gzip.compress(data[:700]) + gzip.compress(data[700:]))
    assert [(r.id, r.label, r.error) for r in iter_tar(path, "m")] == [("m/a", 4, None), ("m/b", 5, None)]


# Rule 1: only regular files are opened --------------------------------------------------------

def test_a_fifo_image_is_an_error_row_not_a_hang(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for reader in (open_image, read_pixels, read_encoded):
        with pytest.raises(NotRegularFile, match=r"^the path is a FIFO \(named pipe\), not a regular file$"):
            within(10, reader, str(fifo), Limits())
    sample = within(10, TaskDataset(lambda image: torch.zeros(1), Limits()).__getitem__,
                    Task(ItemKey(0, "pipe.jpg", None), str(fifo)))
    assert sample.error == "NotRegularFile: the path is a FIFO (named pipe), not a regular file"
    # a folder or a device is refused the same way, without reading
    with pytest.raises(NotRegularFile, match="is a folder"):
        open_image(str(tmp_path), Limits())
    with pytest.raises(NotRegularFile, match="is a character device"):
        open_image("/dev/zero", Limits())  # would stream zeros for ever


def test_a_file_swapped_for_a_fifo_after_its_stat_is_refused_from_the_descriptor(tmp_path, monkeypatch):
    regular = tmp_path / "regular.jpg"
    regular.write_bytes(jpeg(tiny_image(1)))
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(limits_module.os, "stat", lambda path, *a, **k: real_stat(regular))
    with pytest.raises(NotRegularFile, match="FIFO"):
        within(10, open_regular, fifo)


def test_a_fifo_tar_is_one_error_record(tmp_path):
    fifo = tmp_path / "00000.tar"
    os.mkfifo(fifo)
    records = within(10, lambda: list(iter_tar(fifo, "00000.tar")))
    assert [(r.id, r.error) for r in records] == [
        ("00000.tar", "NotRegularFile: 00000.tar: the path is a FIFO (named pipe), not a regular file")]


# Rule 1: the resize is bounded by an aspect-ratio cap -----------------------------------------

SPEC = PixelSpec("shortest", (32,), int(Image.Resampling.BILINEAR), (32, 32), (1.0,) * 3, (0.0,) * 3)


@pytest.mark.parametrize("size", [(1, 3000), (3000, 1), (40, 3000)])
def test_an_extreme_strip_is_refused_from_its_header_on_every_path(tmp_path, size):
    """1x3000 would resize to 32x96000 here (to 224x672000 at ImageNet's size): the shape
    is refused before any pixel is decoded, on the fast path, with a reduced decode, and on
    the checkpoint processor's path."""
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    limits = Limits(max_aspect_ratio=50)
    ratio = max(size) / min(size)
    processor_calls = []
    paths = {"fast": FastTransform(SPEC), "reduced": FastTransform(SPEC, reduce=True),
             "processor": lambda image: processor_calls.append(image) or torch.zeros(3, 32, 32)}
    for name, transform in paths.items():
        sample = TaskDataset(transform, limits)[Task(ItemKey(0, "strip.png", None), str(path))]
        assert sample.error == (f"AspectRatioTooLarge: {size[0]}x{size[1]}: aspect ratio {ratio:.1f}:1 "
                                "exceeds runtime.max_aspect_ratio (50)"), name
    assert processor_calls == []
    # under a cap that allows it, it decodes and resizes as before
    wide = TaskDataset(FastTransform(SPEC), Limits(max_aspect_ratio=ratio))[
        Task(ItemKey(0, "strip.png", None), str(path))]
    assert wide.error is None and wide.pixel_values.shape == (32, 32, 3)


def test_a_panorama_passes_the_default_cap(tmp_path):
    path = tmp_path / "pano.jpg"
    Image.new("RGB", (1200, 100), (90, 90, 90)).save(path)  # 12:1, a wide phone panorama
    assert open_image(str(path), Limits()).size == (1200, 100)


# Rule 1: 16-bit and 32-bit images without float64 -------------------------------------------

def _reference_8bit(values: np.ndarray, peak: int) -> np.ndarray:
    """round(v * 255 / peak), clipped: the documented mapping, computed independently."""
    return np.clip(np.floor(np.clip(values, 0, None).astype(np.float64) * 255 / peak + 0.5), 0, 255
                   ).astype(np.uint8)


def sixteen_bit(values: np.ndarray) -> Image.Image:
    return Image.frombytes("I;16", values.shape[::-1], values.astype("<u2").tobytes())


def test_sixteen_bit_pngs_give_the_exact_8_bit_reference(tmp_path):
    rng = np.random.default_rng(7)
    values = rng.integers(0, 65536, (61, 83), dtype=np.uint16)
    values[0, :6] = [0, 128, 129, 385, 65407, 65535]  # either side of rounding boundaries
    path = tmp_path / "sixteen.png"
    sixteen_bit(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    expected = _reference_8bit(values, 65535)
    decoded = np.asarray(open_image(str(path), Limits()))
    assert (decoded == expected[..., None]).all()
    tensor = read_pixels(str(path), Limits())
    assert (tensor.permute(1, 2, 0).numpy() == expected[..., None]).all()
    # a reduced decode reduces those 8-bit pixels (grey, then RGB: the same)
    reduced = read_pixels(str(path), Limits(), cover=(20, 20)).permute(1, 2, 0).numpy()
    reference = np.asarray(Image.fromarray(expected, "L").reduce(3).convert("RGB"))
    assert (reduced == reference).all()


def test_32_bit_integer_images_scale_by_their_range():
    small = np.array([[0, 7, 255, -4]], dtype=np.int32)  # 8-bit values kept as they are
    wide = np.array([[0, 300, 65535, 70000, -9]], dtype=np.int32)  # 16-bit range, clipped
    for values, peak in ((small, 255), (wide, 65535)):
        rgb = np.asarray(to_rgb(Image.frombytes("I", values.shape[::-1], values.astype("<i4").tobytes())))
        assert (rgb == _reference_8bit(values, peak)[..., None]).all(), values


def test_the_16_bit_conversion_holds_no_float_copy_of_the_image():
    image = sixteen_bit(np.full((2000, 4000), 40000, dtype=np.uint16))
    tracemalloc.start()
    try:
        rgb = to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.getpixel((0, 0)) == (156, 156, 156)
    # the 8-bit result and its copy into Pillow (1 byte a pixel each) and one strip; the
    # float64 copy alone was 8 bytes a pixel
    assert peak < 3 * image.width * image.height, peak


# Rule 1: JSON labels with a depth limit ------------------------------------------------------

def test_a_deeply_nested_json_label_is_a_bad_label(tmp_path):
    picture = jpeg(tiny_image(1))
    deep = b'{"label": 3, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    just_over = b'{"label": 3, "x": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    at_limit = b'{"label": 3, "x": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    in_text = json.dumps({"label": 4, "caption": "[{" * 5000 + '\\" ]'}).encode()
    path = write_tar(tmp_path / "j.tar", [("deep.jpg", picture), ("deep.json", deep),
                                          ("over.jpg", picture), ("over.json", just_over),
                                          ("at.jpg", picture), ("at.json", at_limit),
                                          ("text.jpg", picture), ("text.json", in_text)])
    records = list(iter_tar(path, "j.tar", label_key="label"))
    assert [(r.id, r.label, error_type(r.error)) for r in records] == [
        ("j.tar/deep", None, "BadLabel"), ("j.tar/over", None, "BadLabel"), ("j.tar/at", 3, None),
        ("j.tar/text", 4, None)]
    assert records[0].error.endswith(f"the JSON nests 200001 levels deep, over the limit of {MAX_JSON_DEPTH} "
                                     "for a label")
    assert len(records[0].error) < 300


# Rule 2: error texts never quote file contents ----------------------------------------------

def test_error_texts_give_sizes_and_signatures_never_bytes(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    with pytest.raises(Exception) as caught:
        open_image(str(secret), Limits())
    assert str(caught.value) == (f"not an image format Pillow reads ({len(SECRET)} bytes, "
                                 "no known image signature)")
    heic = tmp_path / "photo.jpg"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic" + SECRET)
    with pytest.raises(Exception, match=r"\(38 bytes, a HEIF/HEIC signature\)$"):
        open_image(str(heic), Limits())
    # Pillow names a broken PNG chunk by its bytes: the row shows neither them nor their repr
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    png = bytearray(png_bytes(Image.fromarray(noise)))
    png[35:36] = b"\x00"
    sample = TaskDataset(FastTransform(SPEC), Limits())[Task(ItemKey(0, "b.png", None), bytes(png))]
    assert sample.error == "SyntaxError: broken PNG file (chunk <bytes not shown>)"
    assert without_bytes("a b'\\x00\\'' b\"x\" c") == "a <bytes not shown> <bytes not shown> c"


def test_a_bad_label_member_is_described_not_quoted(tmp_path):
    picture = jpeg(tiny_image(1))
    path = write_tar(tmp_path / "l.tar", [("a.jpg", picture), ("a.cls", SECRET),
                                          ("b.jpg", picture), ("b.cls", SECRET[:5] + b"\xff"),
                                          ("c.jpg", picture),
                                          ("c.json", b'{"label": "' + SECRET[:-1] + b'"}')])
    records = list(iter_tar(path, "l.tar"))[:2] + list(iter_tar(path, "l.tar", label_key="label"))[2:]
    assert [error_type(r.error) for r in records] == ["BadLabel"] * 3
    for record in records:
        assert b"7f3a9c" not in record.error.encode() and "SECRET" not in record.error, record.error
    assert "the label (25 characters) is neither" in records[0].error
    assert "the label (6 bytes) is not UTF-8 text" in records[1].error


# End to end -----------------------------------------------------------------------------------

def test_a_job_over_good_and_hostile_files_gives_one_row_each(tmp_path, tiny_models):
    """A file list of good photos, a 16-bit PNG, and hostile entries: a FIFO, a file over the
    byte limit, a 1x3000 strip, a PNG Pillow quotes, and a secret file named by a path
    outside the listed folder. Every line is one row; the good ones are predicted; the
    secret's bytes are in no row and no log line."""
    folder = tmp_path / "data"
    folder.mkdir()
    (tmp_path / "secret.txt").write_bytes(SECRET)
    rng = np.random.default_rng(3)
    good = []
    for i in range(5):
        _photo(rng, (40 + i, 50)).save(folder / f"good{i}.jpg", quality=90)
        good.append(f"good{i}.jpg")
    sixteen_bit(rng.integers(0, 65536, (48, 40))).save(folder / "deep.png")
    good.append("deep.png")
    os.mkfifo(folder / "pipe.jpg")
    noise_png(folder / "big.png", (900, 800))
    Image.new("RGB", (1, 3000)).save(folder / "strip.png")
    png = bytearray(png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8))))
    png[35:36] = b"\x00"
    (folder / "chunk.png").write_bytes(bytes(png))
    hostile = {"pipe.jpg": "NotRegularFile", "big.png": "FileTooLarge", "strip.png": "AspectRatioTooLarge",
               "chunk.png": "SyntaxError", "../secret.txt": "UnidentifiedImageError"}
    listing = folder / "list.txt"
    listing.write_text("\n".join([*good, *hostile]) + "\n")
    out = tmp_path / "out"
    result = run_job(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(listing),
                      "--output.dir", str(out), "--runtime.batch_size", "4",
                      "--runtime.max_image_bytes", str(MB), "--runtime.max_aspect_ratio", "50"],
                     processes=2, timeout=240)
    rows = read_rows(out)
    assert sorted(rows) == sorted([*good, *hostile])
    for name in good:
        assert rows[name]["error"] is None and len(rows[name]["topk_ids"]) == 5, name
    assert {name: error_type(rows[name]["error"]) for name in hostile} == hostile
    assert "max_image_bytes" in rows["big.png"]["error"] and "max_aspect_ratio" in rows["strip.png"]["error"]
    assert rows["../secret.txt"]["error"] == (f"UnidentifiedImageError: not an image format Pillow reads "
                                              f"({len(SECRET)} bytes, no known image signature)")
    _assert_secret_nowhere(out, result)


def test_a_parquet_job_bounds_cells_row_groups_and_a_fifo_file(tmp_path, tiny_models):
    """Parquet: a path cell naming a secret file, a cell over the byte limit, a row group over
    its limit (refused from the footer), and a file swapped for a FIFO after planning."""
    folder = tmp_path / "pq"
    folder.mkdir()
    (tmp_path / "secret.txt").write_bytes(SECRET)
    rng = np.random.default_rng(4)
    photos = [jpeg(_photo(rng, (40, 48))) for _ in range(4)]
    noise = rng.integers(0, 256, 900_000, dtype=np.uint8).tobytes()
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("key", pa.string())])
    cells = [({"bytes": photos[0], "path": None}, "ok0"),
             ({"bytes": None, "path": "../secret.txt"}, "secret"),
             ({"bytes": photos[1], "path": None}, "ok1"),  # row group 0
             ({"bytes": noise + noise[:200_000], "path": None}, "big"),  # row group 1: 1.1 MB cell
             *[({"bytes": noise[i:] + noise[:i], "path": None}, f"heavy{i}")  # row group 2: 3.6 MB
               for i in range(4)]]
    table = pa.table({"image": [c for c, _ in cells], "key": [k for _, k in cells]}, schema=schema)
    with pq.ParquetWriter(folder / "a.parquet", schema, compression="none") as writer:
        for start, stop in ((0, 3), (3, 4), (4, 8)):
            writer.write_table(table.slice(start, stop - start))
    pq.write_table(pa.table({"image": [{"bytes": p, "path": None} for p in photos[2:]],
                             "key": ["b0", "b1"]}, schema=schema), folder / "b.parquet")
    out = tmp_path / "out"
    args = ["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(folder),
            "--data.kind", "parquet", "--data.id_column", "key", "--output.dir", str(out),
            "--runtime.max_image_bytes", str(MB), "--runtime.max_row_group_bytes", str(3 * MB)]
    assert cli_main(["plan", *args]) == 0
    (folder / "b.parquet").unlink()
    os.mkfifo(folder / "b.parquet")  # after listing: reading it would block a rank for ever
    # Swapped before the job starts: the start check finds it, and the job names it in one line.
    refused = run_job(args, timeout=120, expect_ok=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "b.parquet is a FIFO (named pipe), not a regular file" in refused.stderr
    # Swapped while the job runs (after the check): the rank reading it writes error rows.
    listing = read_listing(out)  # the refused listing left the one from plan as it was
    unit = next(u for u in range(listing.n_units) if listing.unit_paths[u] == "b.parquet")
    records = within(10, lambda: list(listing.records(unit)))
    assert [(r.id, r.error) for r in records] == [
        (f"b.parquet@{row}", "NotRegularFile: b.parquet: the path is a FIFO (named pipe), not a regular file")
        for row in (8, 9)]
    (folder / "b.parquet").unlink()
    pq.write_table(pa.table({"image": [{"bytes": p, "path": None} for p in photos[2:]],
                             "key": ["b0", "b1"]}, schema=schema), folder / "b.parquet")
    result = run_job(args, processes=2, timeout=240)
    rows = read_rows(out)
    assert {k: error_type(r["error"]) for k, r in rows.items()} == {
        "ok0": None, "ok1": None, "secret": "UnidentifiedImageError", "big": "FileTooLarge",
        **{f"heavy{i}": "RowGroupTooLarge" for i in range(4)}, "b0": None, "b1": None}
    assert rows["big"]["error"] == (f"FileTooLarge: row big: the image cell is 1100000 bytes, over "
                                    f"runtime.max_image_bytes ({MB})")
    assert "runtime.max_row_group_bytes (3000000)" in rows["heavy0"]["error"]
    assert all(len(rows[k]["topk_ids"]) == 5 for k in ("ok0", "ok1"))
    _assert_secret_nowhere(out, result)


def _assert_secret_nowhere(out: Path, result) -> None:
    fragments = [SECRET[:12], SECRET[7:13], b"do-not-copy"]
    logs = (result.stdout + result.stderr).encode()
    for fragment in fragments:
        assert fragment not in logs, fragment
        for text in map(repr, (row["error"] for row in read_rows(out).values())):
            assert fragment.decode() not in text
    for path in out.rglob("*"):
        if path.is_file():
            assert not any(fragment in path.read_bytes() for fragment in fragments), path
