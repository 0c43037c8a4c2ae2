"""Decode and preprocess inside DataLoader workers; a bad image becomes an error, not a crash."""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import describe_error

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, whose PyPI wheels
# are CUDA builds; torchvision's come in every flavour torch does (ROCm included). If a later
# torchvision drops them, read_pixels decodes with Pillow.
warnings.filterwarnings("ignore", category=DeprecationWarning,
                        message="The image decoding and encoding capabilities of TorchVision")
try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - depends on the torchvision release
    decode_jpeg = None
# libjpeg-turbo's DCT-scaled decode straight into an array (a dependency; without it, a
# reduced JPEG decodes through Pillow's draft to the same pixels, about 2 ms slower at 12 MP).
try:
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheels
    simplejpeg = None

_WARNINGS = threading.Lock()


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


@contextmanager
def _opened(source: Any) -> Iterator[BinaryIO]:
    """A binary stream at the start of the encoded image (a path is opened and closed)."""
    if not isinstance(source, str):
        yield source
        return
    status = os.stat(source)
    if stat.S_ISREG(status.st_mode) and status.st_size == 0:
        raise EmptyImageFile("the file is empty (0 bytes)")
    with open(source, "rb") as stream:
        yield stream


def _rest(stream: BinaryIO) -> bytes:
    """All the stream's bytes, read after the header checks passed."""
    stream.seek(0)
    return stream.read()


@contextmanager
def _exif_checked() -> Iterator[None]:
    """Pillow parses EXIF inside the block; an EXIF block it only partly reads is an error."""
    # catch_warnings swaps process-wide state, so decode threads take turns here; callers
    # keep pixel decoding outside the block.
    with _WARNINGS, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    corrupt = [str(w.message) for w in caught if "corrupt exif" in str(w.message).lower()]
    if corrupt:
        # Pillow reads on past a broken EXIF block, but then the orientation may be wrong.
        raise CorruptExif(corrupt[0].strip())


def _open_header(stream: BinaryIO, max_pixels: int) -> Image.Image:
    """Parse the header only and check the pixel count before anything is decoded.

    Only the header is read: a huge file that is not an image is refused without reading it.
    """
    # Pillow's own bomb check warns at one limit and fails at twice it; one limit, ours, is
    # checked here from the header, before any pixel is decoded.
    Image.MAX_IMAGE_PIXELS = None
    with _exif_checked():  # JPEG and TIFF read their EXIF while opening
        try:
            image = Image.open(stream)
        except UnidentifiedImageError:
            stream.seek(0)
            raise UnidentifiedImageError(
                f"not an image format Pillow reads (it starts with {stream.read(12)!r})"
            ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} = {width * height} pixels exceeds runtime.max_image_pixels "
            f"({max_pixels})"
        )
    return image


Cover = tuple[int, int]
"""(width, height) that an upright decoded image must keep at least: twice the size the
model's resize produces (``preprocess.reduced_cover``). None: decode every pixel."""

JPEG_SCALES = (8, 4, 2)
"""The DCT-domain scales libjpeg decodes at (1/8, 1/4, 1/2) through Pillow's ``draft``."""


def _orientation(image: Image.Image) -> int:
    with _exif_checked():
        return image.getexif().get(ExifTags.Base.Orientation, 1)


def _stored_cover(image: Image.Image, cover: Cover) -> Cover:
    """``cover`` in the file's stored orientation (EXIF 5-8 swap width and height)."""
    return (cover[1], cover[0]) if _orientation(image) in (5, 6, 7, 8) else cover


def reduction_factor(size: tuple[int, int], cover: Cover | None) -> int:
    """The largest integer factor that shrinks ``size`` (width, height) and still covers
    ``cover``; 1 where the image is smaller than twice the cover on either side."""
    if cover is None:
        return 1
    return max(1, min(size[0] // cover[0], size[1] // cover[1]))


def jpeg_scale(image: Image.Image, cover: Cover | None) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) a JPEG decodes at to still cover ``cover``."""
    if cover is None or image.format not in {"JPEG", "MPO"}:  # MPO: a phone's JPEG
        return 1
    factor = reduction_factor(image.size, _stored_cover(image, cover))
    return next((scale for scale in JPEG_SCALES if factor >= scale), 1)


def _reduce(image: Image.Image, cover: Cover | None) -> Image.Image:
    """Box-reduce an upright decoded image by an integer factor that keeps it over ``cover``.

    Pixel formats Pillow cannot box-reduce (palette, 16-bit, alpha that must be composited
    first) are made RGB first, so the reduction averages the colours a viewer shows.
    """
    factor = reduction_factor(image.size, cover)
    if factor < 2:
        return image
    if image.mode not in {"RGB", "L"}:
        image = to_rgb(image)
    return image.reduce(factor)


def _decode_with_pillow(image: Image.Image, cover: Cover | None = None) -> Image.Image:
    image.seek(0)  # first frame of an animation
    scale = jpeg_scale(image, cover)
    if scale > 1:
        # libjpeg's DCT-domain scaling: 1/scale of the pixels, for a fraction of the work.
        # Pillow picks the same scale: the largest of 1/2, 1/4, 1/8 that still covers it.
        image.draft(image.mode, _stored_cover(image, cover))
    image.load()
    if cover is None or _orientation(image) != 1:
        with _exif_checked():
            image = ImageOps.exif_transpose(image)
    # (An upright image's transpose would be a copy: a reduced one skips it, ~2 ms at 1 MP.)
    return to_rgb(_reduce(image, cover))


def open_image(source: Any, max_pixels: int, cover: Cover | None = None) -> Image.Image:
    """Open, check the pixel count before decoding, apply EXIF orientation, return RGB.

    With ``cover`` an image at least twice that size decodes reduced (JPEGs at 1/2, 1/4 or
    1/8 in the DCT domain, then any format by an integer box reduce) to no less than
    ``cover``; a smaller one decodes exactly as without it.
    """
    with _opened(source) as stream:
        return _decode_with_pillow(_open_header(stream, max_pixels), cover)


def _upright_jpeg(image: Image.Image) -> bool:
    """An upright RGB or grey JPEG: libjpeg-turbo's RGB output is Pillow's ``to_rgb`` of it."""
    if image.format != "JPEG" or image.mode not in {"RGB", "L"}:
        return False
    with _exif_checked():  # cheap for a JPEG: the block was read with the header
        return image.getexif().get(ExifTags.Base.Orientation, 1) == 1


def _plain_jpeg(image: Image.Image) -> bool:
    """An upright RGB or grey JPEG, and torchvision's decoder to give Pillow's pixels for it."""
    return decode_jpeg is not None and _upright_jpeg(image)


def scaled_jpeg_decoder(tensor_path: bool = True) -> str:
    """Who decodes a reduced upright JPEG (``read_pixels`` on the tensor path), for the log."""
    return "simplejpeg (libjpeg-turbo)" if tensor_path and simplejpeg is not None else "Pillow's draft"


def _scaled_jpeg(data: bytes, size: tuple[int, int], scale: int, cover: Cover) -> torch.Tensor | None:
    """An upright JPEG decoded at 1/``scale`` in libjpeg-turbo's DCT domain by simplejpeg:
    the pixels of Pillow's ``draft`` at that scale, without Pillow's line-by-line unpacking
    and the copy into an array (15 instead of 17 CPU ms for a 12 MP photo at 1/4). None where
    simplejpeg is missing or refuses the file: Pillow then decodes it, or names the fault."""
    if simplejpeg is None:
        return None
    width, height = size
    try:
        # Exactly 1/scale: the smallest M/8 scale at least that large and at least that small.
        array = simplejpeg.decode_jpeg(data, "RGB", min_width=-(-width // scale),
                                       min_height=-(-height // scale), min_factor=scale)
    except ValueError:
        return None
    if reduction_factor((array.shape[1], array.shape[0]), cover) > 1:  # over 16x the cover
        array = np.array(_reduce(Image.fromarray(array), cover))
    return torch.from_numpy(array).permute(2, 0, 1)


def _pillow_tensor(image: Image.Image, cover: Cover | None = None) -> torch.Tensor:
    return torch.from_numpy(np.array(_decode_with_pillow(image, cover))).permute(2, 0, 1)


@dataclass
class Encoded:
    """A plain JPEG's bytes, its header, pixel count and EXIF already checked."""

    data: torch.Tensor
    """1-D uint8."""

    def with_pillow(self) -> Image.Image:
        """Decoded by Pillow, for a JPEG torchvision refuses (it names what is wrong)."""
        return _decode_with_pillow(_open_header(io.BytesIO(self.data.numpy().tobytes()),
                                                max_pixels=2**62))  # checked when read


def read_encoded(source: Any, max_pixels: int) -> Encoded | torch.Tensor:
    """A plain JPEG (upright, RGB or grey) stays encoded; anything else is decoded by Pillow
    into RGB uint8 (3, H, W). The pixel limit and the EXIF check apply to both."""
    with _opened(source) as stream:
        image = _open_header(stream, max_pixels)
        if _plain_jpeg(image):
            return Encoded(torch.frombuffer(bytearray(_rest(stream)), dtype=torch.uint8))
        return _pillow_tensor(image)


def read_pixels(source: Any, max_pixels: int, cover: Cover | None = None) -> torch.Tensor:
    """The image as RGB uint8 (3, H, W): the pixels of ``open_image``, often for less CPU.

    Plain JPEGs are decoded by torchvision straight into a tensor, about a quarter less CPU
    than Pillow's decode plus the copy into an array; both run libjpeg-turbo with the same
    settings and give the same pixels. Anything else, and any JPEG torchvision refuses,
    goes through Pillow, which also names what is wrong with a broken file. A tensor from
    torchvision is (H, W, 3) memory seen as (3, H, W). With ``cover``, an image at least
    twice that size decodes reduced, to the pixels of ``open_image``: an upright JPEG by
    simplejpeg (``_scaled_jpeg``), anything else through Pillow.
    """
    if cover is not None:
        with _opened(source) as stream:
            image = _open_header(stream, max_pixels)
            if image.format not in {"JPEG", "MPO"}:
                # Decoded whole, then reduced. Its orientation is read after the decode: a PNG's
                # EXIF may follow the pixels, and reading it first would decode under the lock.
                return _pillow_tensor(image, cover)
            if reduction_factor(image.size, _stored_cover(image, cover)) > 1:
                scale = jpeg_scale(image, cover)
                if scale > 1 and _upright_jpeg(image):
                    pixels = _scaled_jpeg(_rest(stream), image.size, scale, cover)
                    if pixels is not None:
                        return pixels
                return _pillow_tensor(image, cover)
            if not _plain_jpeg(image):
                return _pillow_tensor(image)
            value: Encoded | torch.Tensor = Encoded(
                torch.frombuffer(bytearray(_rest(stream)), dtype=torch.uint8))
    else:
        value = read_encoded(source, max_pixels)
    if not isinstance(value, Encoded):
        return value
    try:
        return decode_jpeg(value.data, mode=ImageReadMode.RGB)
    except RuntimeError:
        return torch.from_numpy(np.array(value.with_pillow())).permute(2, 0, 1)


@dataclass(frozen=True)
class ItemKey:
    """Who an item is: what its row needs, and nothing heavy (it travels back from workers)."""

    unit: int
    id: str
    label: int | None
    last: bool = False
    """The last item of its unit: the unit commits once this item's row is in."""


@dataclass
class Task:
    """One item to decode: its key, and the path or bytes to decode (or the input's error)."""

    key: ItemKey
    payload: str | bytes | None
    error: str | None = None

    def source(self) -> str | BinaryIO:
        return io.BytesIO(self.payload) if isinstance(self.payload, bytes) else self.payload


@dataclass
class Sample:
    key: ItemKey
    pixel_values: torch.Tensor | None
    error: str | None


class TaskDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses the task it is given (the batch sampler hands out Tasks).

    ``preprocess`` takes what its ``decoder`` attribute returns (``read_pixels``,
    ``read_encoded``), else the RGB PIL image of ``open_image``.
    """

    def __init__(self, preprocess: Callable[[Any], torch.Tensor], max_pixels: int):
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.decode = getattr(preprocess, "decoder", open_image)

    def __getitem__(self, task: Task) -> Sample:
        if task.error is not None:
            return Sample(task.key, None, task.error)
        try:
            image = self.decode(task.source(), self.max_pixels)
            return Sample(task.key, self.preprocess(image), None)
        except Exception as error:  # every failure of one image is that image's row
            return Sample(task.key, None, describe_error(error))


@dataclass
class Batch:
    items: list[ItemKey]
    """Every item of the batch, in order."""
    pixel_values: torch.Tensor | tuple[torch.Tensor, ...] | list[Any] | None
    """Stacked inputs of the items that decoded, in order; a tuple of them, one per model,
    where several models share the decode; a list where some are still encoded
    (``runtime.decode device``), for ``device_decode.DeviceDecode``."""
    ok: list[bool]
    errors: list[str | None]

    def pin_memory(self) -> Batch:
        if isinstance(self.pixel_values, torch.Tensor):
            self.pixel_values = self.pixel_values.pin_memory()
        elif isinstance(self.pixel_values, tuple):
            self.pixel_values = tuple(part.pin_memory() for part in self.pixel_values)
        return self

    def model_input(self, index: int | None) -> torch.Tensor | list[Any] | None:
        """The inputs of model ``index`` of several, or the one model's (None)."""
        if index is None or self.pixel_values is None:
            return self.pixel_values
        return self.pixel_values[index]


def _stack(good: list[Any]) -> torch.Tensor | tuple[torch.Tensor, ...] | list[Any] | None:
    if not good:
        return None
    if isinstance(good[0], tuple):  # one input per model (several models, one decode)
        return tuple(torch.stack(parts) for parts in zip(*good))
    if any(isinstance(value, Encoded) for value in good):
        return list(good)
    return torch.stack(good)


def collate(samples: list[Sample]) -> Batch:
    good = [s.pixel_values for s in samples if s.error is None]
    return Batch(
        items=[s.key for s in samples],
        pixel_values=_stack(good),
        ok=[s.error is None for s in samples],
        errors=[s.error for s in samples],
    )


def worker_init(_: int) -> None:
    # Each worker decodes one image at a time; more intra-op threads only oversubscribe.
    torch.set_num_threads(1)
