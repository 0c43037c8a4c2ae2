"""Decode and preprocess inside DataLoader workers; a bad image becomes an error, not a crash."""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .inputs import Items


class ImageTooLarge(ValueError):
    """The header claims more pixels than runtime.max_image_pixels allows."""


def _flatten_alpha(image: Image.Image) -> Image.Image:
    # Transparent pixels are composited onto white, the way viewers and browsers show them.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: alpha over white, 16-bit scaled down, CMYK converted."""
    if image.mode == "RGB":
        return image
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (
        image.mode == "P" and "transparency" in image.info
    ):
        return _flatten_alpha(image)
    return image.convert("RGB")


class CorruptExif(ValueError):
    """The EXIF block cannot be parsed, so the photo's orientation is unknown."""


class EmptyImageFile(ValueError):
    """The file holds no bytes at all."""


def open_image(source: Any, max_pixels: int) -> Image.Image:
    """Open, check the pixel count before decoding, apply EXIF orientation, return RGB."""
    if isinstance(source, str):
        status = os.stat(source)
        if stat.S_ISREG(status.st_mode) and status.st_size == 0:
            raise EmptyImageFile("the file is empty (0 bytes)")
    # Pillow's own bomb check warns at one limit and fails at twice it; one limit, ours, is
    # checked below from the header, before any pixel is decoded.
    Image.MAX_IMAGE_PIXELS = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = Image.open(source)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"{width}x{height} = {width * height} pixels exceeds runtime.max_image_pixels "
                f"({max_pixels})"
            )
        image.seek(0)  # first frame of an animation
        image.load()
        image = ImageOps.exif_transpose(image)
    corrupt = [str(w.message) for w in caught if "corrupt exif" in str(w.message).lower()]
    if corrupt:
        # Pillow reads on past a broken EXIF block, but then the orientation may be wrong.
        raise CorruptExif(corrupt[0].strip())
    return to_rgb(image)


def describe_error(error: BaseException) -> str:
    """Short 'Type: message' for the error column."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}"[:500]


@dataclass
class Sample:
    index: int
    pixel_values: torch.Tensor | None
    error: str | None


class ItemDataset(torch.utils.data.Dataset):
    """Items at the given global indices, decoded and preprocessed by the model's processor."""

    def __init__(self, items: Items, indices: list[int],
                 preprocess: Callable[[Image.Image], torch.Tensor], max_pixels: int):
        self.items = items
        self.indices = indices
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Sample:
        index = self.indices[position]
        try:
            image = open_image(self.items.open(index), self.max_pixels)
            return Sample(index, self.preprocess(image), None)
        except Exception as error:  # every failure of one image is that image's row
            return Sample(index, None, describe_error(error))


@dataclass
class Batch:
    indices: list[int]
    """Global indices of every item in the batch, in order."""
    pixel_values: torch.Tensor | None
    """Stacked inputs of the items that decoded, in order."""
    ok: list[bool]
    errors: list[str | None]

    def pin_memory(self) -> Batch:
        if self.pixel_values is not None:
            self.pixel_values = self.pixel_values.pin_memory()
        return self


def collate(samples: list[Sample]) -> Batch:
    good = [s.pixel_values for s in samples if s.error is None]
    return Batch(
        indices=[s.index for s in samples],
        pixel_values=torch.stack(good) if good else None,
        ok=[s.error is None for s in samples],
        errors=[s.error for s in samples],
    )


def worker_init(_: int) -> None:
    # Each worker decodes one image at a time; more intra-op threads only oversubscribe.
    torch.set_num_threads(1)
