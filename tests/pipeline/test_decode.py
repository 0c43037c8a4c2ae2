"""Decoding: awkward but valid images decode to RGB; broken ones raise a short, typed error."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import IMAGENET_SAMPLE, read_rows, run_job
from fixtures_images import photo, write_bad_images, write_exif_pair, write_good_images
from PIL import Image
from torchvision.io import decode_jpeg as torchvision_decode_jpeg

from batch_classify.pipeline import decode
from batch_classify.pipeline.decode import ImageTooLarge, describe_error, open_image, read_pixels, to_rgb

LIMIT = 128_000_000


def test_every_awkward_mode_decodes_to_rgb(tmp_path):
    for name in write_good_images(tmp_path):
        image = open_image(str(tmp_path / name), LIMIT)
        assert image.mode == "RGB", name
        assert image.size == ((1, 1) if name == "one-pixel.png" else (48, 40)), name


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).tolist() == [[[255, 255, 255]] * 2] * 2
    half = Image.new("LA", (1, 1), (0, 128))
    assert np.asarray(to_rgb(half))[0, 0].tolist() == [127, 127, 127]


def test_sixteen_bit_keeps_its_range(tmp_path):
    write_good_images(tmp_path)
    sixteen = np.asarray(open_image(str(tmp_path / "sixteen-bit.png"), LIMIT))
    grey = np.asarray(open_image(str(tmp_path / "grey.png"), LIMIT))
    assert np.abs(sixteen.astype(int) - grey.astype(int)).max() <= 1


def test_animated_gif_gives_its_first_frame(tmp_path):
    write_good_images(tmp_path)
    first = np.asarray(open_image(str(tmp_path / "animated.gif"), LIMIT)).astype(int)
    with Image.open(tmp_path / "animated.gif") as gif:
        gif.seek(1)
        second = np.asarray(gif.convert("RGB")).astype(int)
    reference = np.asarray(open_image(str(tmp_path / "rgb.jpg"), LIMIT)).astype(int)
    assert np.abs(first - reference).mean() < np.abs(second - reference).mean()


def test_exif_orientation_is_applied(tmp_path):
    upright, rotated = write_exif_pair(tmp_path)
    a = np.asarray(open_image(str(tmp_path / upright), LIMIT))
    b = np.asarray(open_image(str(tmp_path / rotated), LIMIT))
    assert a.shape == b.shape and (a == b).all()


def _jpegs_with_every_orientation(folder) -> list[str]:
    """One JPEG per EXIF orientation, plus a grey one; each stored so that it shows upright."""
    folder.mkdir(parents=True, exist_ok=True)
    upright = photo((56, 40))
    undo = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
            4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE],
            6: [Image.Transpose.ROTATE_90], 7: [Image.Transpose.TRANSVERSE],
            8: [Image.Transpose.ROTATE_270]}
    names = []
    for orientation in range(1, 9):
        stored = upright
        for step in undo.get(orientation, []):
            stored = stored.transpose(step)
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(folder / f"o{orientation}.jpg", quality=95, exif=exif)
        names.append(f"o{orientation}.jpg")
    upright.convert("L").save(folder / "grey.jpg", quality=95)
    return [*names, "grey.jpg"]


def test_read_pixels_gives_the_pixels_of_open_image(tmp_path):
    names = [*write_good_images(tmp_path), *write_exif_pair(tmp_path),
             *_jpegs_with_every_orientation(tmp_path)]
    for name in names:
        path = str(tmp_path / name)
        tensor = read_pixels(path, LIMIT)
        assert tensor.dtype == torch.uint8 and tensor.shape[0] == 3, name
        expected = np.asarray(open_image(path, LIMIT))
        assert (tensor.permute(1, 2, 0).numpy() == expected).all(), name
        with open(path, "rb") as stream:  # datasets hand over streams, not paths
            assert torch.equal(read_pixels(io.BytesIO(stream.read()), LIMIT), tensor), name
    # every orientation shows the same upright picture (JPEG noise aside)
    pictures = [read_pixels(str(tmp_path / f"o{i}.jpg"), LIMIT).float() for i in range(1, 9)]
    assert all(p.shape == (3, 40, 56) for p in pictures)
    assert max((p - pictures[0]).abs().mean().item() for p in pictures) < 3


def test_only_plain_upright_jpegs_skip_pillow(tmp_path, monkeypatch):
    _jpegs_with_every_orientation(tmp_path)
    write_good_images(tmp_path)
    calls = []

    def counting(data, **kwargs):
        calls.append(1)
        return torchvision_decode_jpeg(data, **kwargs)

    monkeypatch.setattr(decode, "decode_jpeg", counting)
    used = {}
    for name in ["o1.jpg", "grey.jpg", "rgb.jpg", "o6.jpg", "o3.jpg", "cmyk.jpg", "grey.png"]:
        calls.clear()
        read_pixels(str(tmp_path / name), LIMIT)
        used[name] = bool(calls)
    assert used == {"o1.jpg": True, "grey.jpg": True, "rgb.jpg": True, "o6.jpg": False,
                    "o3.jpg": False, "cmyk.jpg": False, "grey.png": False}


def test_a_jpeg_torchvision_refuses_goes_through_pillow(tmp_path, monkeypatch):
    write_good_images(tmp_path)

    def refusing(data, **kwargs):
        raise RuntimeError("decode_jpeg: unsupported marker")

    path = str(tmp_path / "rgb.jpg")
    expected = read_pixels(path, LIMIT)
    monkeypatch.setattr(decode, "decode_jpeg", refusing)
    assert torch.equal(read_pixels(path, LIMIT), expected)


def test_read_pixels_matches_pillow_on_real_photos():
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"the ImageNet sample is not at {IMAGENET_SAMPLE}")
    files = sorted(IMAGENET_SAMPLE.glob("*/*.JPEG"))[::10]  # 100 photos, grey ones included
    for path in files:
        expected = np.asarray(open_image(str(path), LIMIT))
        assert (read_pixels(str(path), LIMIT).permute(1, 2, 0).numpy() == expected).all(), path


@pytest.mark.parametrize("reader", [open_image, read_pixels])
@pytest.mark.parametrize(("name", "error_type"), [
    ("zero-bytes.jpg", "EmptyImageFile"),
    ("truncated.jpg", "OSError"),
    ("text.jpg", "UnidentifiedImageError"),
    ("unsupported.jpg", "UnidentifiedImageError"),
    ("bomb.png", "ImageTooLarge"),
    ("broken-exif.jpg", "CorruptExif"),
])
def test_broken_files_raise_typed_errors(tmp_path, name, error_type, reader):
    write_bad_images(tmp_path)
    with pytest.raises(Exception) as caught:
        reader(str(tmp_path / name), LIMIT)
    assert describe_error(caught.value).startswith(error_type + ": ")


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    write_good_images(tmp_path)
    with pytest.raises(ImageTooLarge, match="max_image_pixels"):
        open_image(str(tmp_path / "rgb.jpg"), max_pixels=48 * 40 - 1)


def test_bad_images_become_rows_and_the_job_goes_on(tmp_path, tiny_models):
    folder = tmp_path / "mixed"
    good = write_good_images(folder / "good")
    bad = write_bad_images(folder / "bad")
    upright, rotated = write_exif_pair(folder / "exif")
    out = tmp_path / "out"
    run_job(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(folder),
             "--data.kind", "images", "--output.dir", str(out), "--runtime.batch_size", "3"],
            processes=2)
    rows = read_rows(out)
    assert len(rows) == len(good) + len(bad) + 2
    for name in good:
        row = rows[f"good/{name}"]
        assert row["error"] is None and len(row["topk_ids"]) == 5, name
    for name in bad:
        row = rows[f"bad/{name}"]
        assert row["error"] and row["topk_ids"] is None and row["topk_scores"] is None, name
    assert rows["exif/" + rotated]["topk_ids"] == rows["exif/" + upright]["topk_ids"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(rows) and metrics["n_errors"] == len(bad)
    assert sum(metrics["errors_by_type"].values()) == len(bad)
    assert metrics["errors_by_type"]["EmptyImageFile"] == 1
    assert metrics["errors_by_type"]["CorruptExif"] == 1
    # Batches end at unit ends: automatic units are whole batches, or the model would run
    # on batches of 1/64 of a small input.
    listing = json.loads((out / "input" / "listing.json").read_text())
    assert listing["unit_size"] % 3 == 0 and listing["unit_size_configured"] == 0


def test_a_file_gone_between_listing_and_reading_is_a_row(tmp_path, tiny_models):
    folder = tmp_path / "imgs"
    write_good_images(folder)
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/rgb.jpg\nimgs/deleted.jpg\nimgs/grey.png\n")
    out = tmp_path / "out"
    run_job(["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(listing),
             "--output.dir", str(out)])
    rows = read_rows(out)
    assert rows["imgs/deleted.jpg"]["error"].startswith("FileNotFoundError: ")
    assert rows["imgs/rgb.jpg"]["error"] is None and rows["imgs/grey.png"]["error"] is None


@pytest.mark.parametrize("reader", [open_image, read_pixels])
def test_a_huge_file_that_is_no_image_is_refused_from_its_header(reader):
    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, size=-1):
            data = super().read(size)
            Counting.read_bytes += len(data)
            return data

    stream = Counting(b"<html>not a picture at all</html>\n" * 1_000_000)  # 34 MB
    with pytest.raises(Exception) as caught:
        reader(stream, LIMIT)
    assert describe_error(caught.value).startswith("UnidentifiedImageError: not an image format")
    # its size and that no image signature was found, never the bytes it starts with
    assert "(34000000 bytes, no known image signature)" in str(caught.value)
    assert "html" not in str(caught.value)
    assert Counting.read_bytes < 1_000_000
