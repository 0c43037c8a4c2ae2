"""runtime.reduced_decode: large images decode at a reduced size that still covers twice the
resize target; smaller ones decode exactly as with it off."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from conftest import IMAGENET_SAMPLE
from fixtures_images import bomb_png
from PIL import Image
from transformers import MobileNetV1ImageProcessor

from batch_classify.core.config import ConfigError, RuntimeConfig
from batch_classify.models.model import ProcessorTransform
from batch_classify.pipeline.decode import (
    ImageTooLarge,
    ItemKey,
    Task,
    TaskDataset,
    jpeg_scale,
    open_image,
    read_pixels,
)
from batch_classify.pipeline.preprocess import (
    FastTransform,
    MultiTransform,
    PixelSpec,
    choose_input_path,
    pixel_spec,
    reduced_cover,
    shared_cover,
)

LIMIT = 128_000_000
COVER = (256, 256)  # a shortest-edge-128 processor's: twice its target


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colours with some detail: what a downscale of a photo looks like."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    noise = rng.normal(0, 6, size=smooth.shape)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def _save(image: Image.Image, path, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def _like(reduced: torch.Tensor | Image.Image, full: Image.Image) -> float:
    """Mean absolute difference (uint8 levels) between a reduced decode and the full decode
    box-resized to the same size."""
    reduced = (np.asarray(reduced) if isinstance(reduced, Image.Image)
               else reduced.permute(1, 2, 0).numpy())
    height, width = reduced.shape[:2]
    expected = np.asarray(full.resize((width, height), Image.Resampling.BOX))
    return float(np.abs(reduced.astype(int) - expected.astype(int)).mean())


def test_a_large_jpeg_decodes_at_the_smallest_dct_scale_that_still_covers(tmp_path):
    path = _save(_picture(2048, 1536), tmp_path / "large.jpg", quality=90)
    full = open_image(path, LIMIT)
    with Image.open(path) as image:
        assert jpeg_scale(image, COVER) == 4  # 1536 // 256 = 6: 1/4, not 1/8 (192 < 256)
    reduced = read_pixels(path, LIMIT, cover=COVER)
    assert tuple(reduced.shape) == (3, 384, 512)
    assert _like(reduced, full) < 3
    assert tuple(read_pixels(path, LIMIT, cover=(128, 128)).shape) == (3, 192, 256)  # 1/8
    assert np.asarray(open_image(path, LIMIT, cover=COVER)).shape == (384, 512, 3)


def test_a_large_png_is_box_reduced_by_the_largest_factor_that_still_covers(tmp_path):
    path = _save(_picture(1800, 1300), tmp_path / "large.png")
    full = open_image(path, LIMIT)
    reduced = read_pixels(path, LIMIT, cover=COVER)  # min(1800 // 256, 1300 // 256) = 5
    assert tuple(reduced.shape) == (3, 260, 360)
    assert reduced.shape[1] >= COVER[1] and reduced.shape[2] >= COVER[0]
    assert _like(reduced, full) < 1.5


@pytest.mark.parametrize(("size", "suffix"), [((511, 700), ".jpg"), ((1000, 400), ".jpg"),
                                              ((600, 511), ".png"), ((256, 256), ".png")])
def test_an_image_under_twice_the_cover_decodes_exactly_as_with_reduction_off(tmp_path, size, suffix):
    # Twice the cover is 512: each of these is smaller on at least one side.
    path = _save(_picture(*size), tmp_path / f"image{suffix}")
    assert torch.equal(read_pixels(path, LIMIT, cover=COVER), read_pixels(path, LIMIT))
    assert (np.asarray(open_image(path, LIMIT, cover=COVER))
            == np.asarray(open_image(path, LIMIT))).all()


def test_the_fast_path_gives_off_pixels_on_real_imagenet_photos():
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"the ImageNet sample is not at {IMAGENET_SAMPLE}")
    # MobileNet's processor: shortest edge 256, so nothing under 512 px reduces (ImageNet's
    # photos are about 500x375): the crops must be the very same.
    spec = pixel_spec(MobileNetV1ImageProcessor())
    auto, off = TaskDataset(FastTransform(spec, reduce=True), LIMIT), TaskDataset(FastTransform(spec), LIMIT)
    paths = sorted(str(p) for p in IMAGENET_SAMPLE.rglob("*.JPEG"))[::25]
    assert paths
    for path in paths:
        task = Task(ItemKey(0, path, None), path)
        assert torch.equal(auto[task].pixel_values, off[task].pixel_values), path


def _awkward_large(folder) -> dict[str, str]:
    """Large files in the modes that need care: name -> path."""
    base = _picture(1100, 800, seed=3)
    files = {}
    files["cmyk.jpg"] = _save(base.convert("CMYK"), folder / "cmyk.jpg", quality=92)
    files["grey.jpg"] = _save(base.convert("L"), folder / "grey.jpg", quality=92)
    sixteen = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    files["sixteen.png"] = _save(Image.fromarray(sixteen), folder / "sixteen.png")
    files["palette.png"] = _save(base.convert("P", palette=Image.Palette.ADAPTIVE), folder / "palette.png",
                                 transparency=0)
    rgba = base.convert("RGBA")
    alpha = np.full((800, 1100), 255, dtype=np.uint8)
    alpha[:, :550] = 0  # the left half transparent: white once composited
    rgba.putalpha(Image.fromarray(alpha))
    files["rgba.png"] = _save(rgba, folder / "rgba.png")
    files["la.png"] = _save(rgba.convert("LA"), folder / "la.png")
    files["webp.webp"] = _save(base, folder / "webp.webp", quality=95)
    files["tiff.tif"] = _save(base, folder / "tiff.tif")
    return files


def test_awkward_modes_decode_correctly_when_reduced(tmp_path):
    for name, path in _awkward_large(tmp_path).items():
        full = open_image(path, LIMIT)
        reduced = open_image(path, LIMIT, cover=COVER)
        assert reduced.mode == "RGB", name
        assert reduced.width >= COVER[0] and reduced.height >= COVER[1], name
        assert reduced.width <= full.width / 2, name  # really reduced (JPEG 1/2, others by 3)
        assert _like(reduced, full) < 3, name
        tensor = read_pixels(path, LIMIT, cover=COVER)
        assert (tensor.permute(1, 2, 0).numpy() == np.asarray(reduced)).all(), name
    rgba = np.asarray(open_image(str(tmp_path / "rgba.png"), LIMIT, cover=COVER))
    assert (rgba[:, :100] == 255).all()  # transparency still composited on white
    sixteen = open_image(str(tmp_path / "sixteen.png"), LIMIT, cover=COVER)
    grey = open_image(str(tmp_path / "grey.jpg"), LIMIT)
    assert _like(sixteen, grey) < 3  # 16-bit keeps its range


@pytest.mark.parametrize(("size", "mode", "options"), [
    ((2048, 1536), "RGB", {"quality": 90}),  # 4:2:0 at 1/4
    ((900, 700), "RGB", {"quality": 85, "subsampling": 0}),  # 4:4:4 at 1/2
    ((2200, 1700), "RGB", {"quality": 85, "subsampling": 1, "progressive": True}),  # 4:2:2 at 1/4
    ((4400, 4200), "RGB", {"quality": 80}),  # 1/8, then a box reduce by 2 (550 // 256)
    ((1100, 800), "L", {"quality": 92}),  # grey at 1/2, replicated to RGB
])
def test_an_upright_jpeg_decodes_scaled_by_libjpeg_turbo_to_the_pixels_of_pillows_draft(
        tmp_path, monkeypatch, size, mode, options):
    from batch_classify.pipeline import decode

    path = _save(_picture(*size).convert(mode), tmp_path / "photo.jpg", **options)
    calls = []
    scaled = decode.simplejpeg.decode_jpeg
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or scaled(*a, **k))
    fast = read_pixels(path, LIMIT, cover=COVER)
    assert calls, "simplejpeg decoded nothing"
    pillow = torch.from_numpy(np.array(open_image(path, LIMIT, cover=COVER))).permute(2, 0, 1)
    assert tuple(fast.shape) == tuple(pillow.shape) and torch.equal(fast, pillow)
    assert COVER[0] <= fast.shape[2] < 2 * COVER[0] or COVER[1] <= fast.shape[1] < 2 * COVER[1]
    monkeypatch.setattr(decode, "simplejpeg", None)  # without it: Pillow's draft, same pixels
    assert torch.equal(read_pixels(path, LIMIT, cover=COVER), fast)


def test_a_large_jpeg_that_libjpeg_turbo_refuses_gets_pillows_verdict(tmp_path):
    whole = tmp_path / "whole.jpg"
    _save(_picture(2048, 1536), whole, quality=90)
    data = whole.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    dataset = TaskDataset(FastTransform(PixelSpec("shortest", (128,), Image.Resampling.BICUBIC, (112, 112),
                                                  (1.0,) * 3, (0.0,) * 3), reduce=True), LIMIT)
    sample = dataset[Task(ItemKey(0, "cut", None), str(cut))]
    assert sample.pixel_values is None and sample.error.startswith("OSError: image file is truncated")
    with pytest.raises(OSError, match="truncated"):
        open_image(str(cut), LIMIT, cover=COVER)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_to_a_reduced_jpeg(tmp_path, orientation):
    upright = _picture(1400, 700, seed=5)  # wide: a rotation swaps the sides that must cover
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(upright.transpose(undo[orientation]), tmp_path / "rotated.jpg", quality=92, exif=exif)
    plain = _save(upright, tmp_path / "upright.jpg", quality=92)
    cover = (340, 170)  # an exact-size target of 170x85: 1/2 (700 // 170 = 4 would allow 1/4 ...
    expected = read_pixels(plain, LIMIT, cover=cover)  # ... only on the upright sides)
    rotated = read_pixels(path, LIMIT, cover=cover)
    assert tuple(rotated.shape) == tuple(expected.shape) == (3, 175, 350)
    assert (rotated.float() - expected.float()).abs().mean() < 3


def test_the_pixel_limit_still_refuses_a_bomb_before_any_decode():
    with pytest.raises(ImageTooLarge):
        read_pixels(io.BytesIO(bomb_png()), LIMIT, cover=COVER)
    with pytest.raises(ImageTooLarge):
        open_image(io.BytesIO(bomb_png()), LIMIT, cover=COVER)


def test_the_cover_is_twice_the_processors_resize_target():
    shortest = PixelSpec("shortest", (256,), Image.Resampling.BILINEAR, (224, 224), (1.0,) * 3, (0.0,) * 3)
    exact = PixelSpec("exact", (600, 800), Image.Resampling.BICUBIC, None, (1.0,) * 3, (0.0,) * 3)
    assert reduced_cover(shortest) == (512, 512)
    assert reduced_cover(exact) == (1600, 1200)  # (width, height) from size (height, width)


def test_auto_is_logged_with_its_scales_and_off_decodes_every_pixel(caplog):
    processor = MobileNetV1ImageProcessor()
    with caplog.at_level(logging.INFO):
        auto = choose_input_path(processor, ProcessorTransform(processor), "auto", "auto")
    assert auto.name == "fast" and auto.worker.reduce  # the start-up check still passed
    for text in (caplog.text, auto.note):
        assert "reduced decode" in text and "1/2 from a shorter side of 1024 px" in text
        assert "1/8 from a shorter side of 4096 px" in text
    off = choose_input_path(processor, ProcessorTransform(processor), "auto", "off")
    assert not off.worker.reduce and "reduced" not in off.note
    assert off.worker.decoder is read_pixels


def test_reduced_decode_is_a_runtime_setting():
    assert RuntimeConfig().reduced_decode == "auto"
    assert RuntimeConfig(reduced_decode="off").reduced_decode == "off"
    with pytest.raises(ConfigError):
        from batch_classify.core.config import parse_args

        parse_args(["--model.name", "m", "--data.path", "d", "--output.dir", "o",
                    "--runtime.reduced_decode", "sometimes"])


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_no_image_is_decoded_while_holding_the_exif_lock(tmp_path, monkeypatch, suffix):
    # The EXIF check takes a process-wide lock; decode threads must not decode pixels under it
    # (a PNG's getexif() loads the whole image where its EXIF follows the pixel data).
    from PIL import ImageFile

    from batch_classify.pipeline import decode

    path = _save(_picture(1200, 900), tmp_path / f"large{suffix}")
    under_lock = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: under_lock.append(decode._WARNINGS.locked() and bool(self.tile))
                        or load(self))  # tile: pixels still to decode
    read_pixels(path, LIMIT, cover=COVER)
    open_image(path, LIMIT, cover=COVER)
    assert under_lock.count(True) == 0, under_lock


def test_a_pass_of_models_with_different_targets_shares_one_reduced_decode(tmp_path):
    small = PixelSpec("shortest", (128,), Image.Resampling.BILINEAR, (112, 112), (1.0,) * 3, (0.0,) * 3)
    large = PixelSpec("exact", (300, 400), Image.Resampling.BICUBIC, None, (1.0,) * 3, (0.0,) * 3)
    assert shared_cover([reduced_cover(small), reduced_cover(large)]) == (800, 600)
    assert shared_cover([reduced_cover(small), None]) is None
    alone = [FastTransform(spec, reduce=True) for spec in (small, large)]
    several = MultiTransform(alone)
    assert several.decoder.keywords["cover"] == (800, 600)
    assert "one reduced decode for 2 models, kept at least 800x600" in several.note
    # 4000x3000: the small model alone decodes at 1/8 (500x375), the pass at 1/4 (1000x750).
    path = _save(_picture(4000, 3000, seed=3), tmp_path / "photo.jpg", quality=92)
    decoded = several.decoder(path, LIMIT)
    assert tuple(decoded.shape) == (3, 750, 1000)
    small_out, large_out = several(decoded)
    # The model with the largest target sees exactly the pixels of its own run alone ...
    assert torch.equal(large_out, alone[1](alone[1].decoder(path, LIMIT)))
    # ... the other the same shape from a larger decode, within a level or two of its own.
    own = alone[0](alone[0].decoder(path, LIMIT))
    assert small_out.shape == own.shape == (112, 112, 3)
    assert (small_out.float() - own.float()).abs().mean() < 2
    # Any model decoding every pixel: every pixel is decoded for all (each sees its off pixels).
    mixed = MultiTransform([FastTransform(small, reduce=True), FastTransform(large)])
    assert mixed.decoder is read_pixels and mixed.note is None
