"""Decode and preprocess inside DataLoader workers; a bad image becomes an error, not a crash."""

from __future__ import annotations

import io
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from batch_classify.core.errors import describe_error  # noqa: F401 - loader and job import it from here
from batch_classify.core.limits import Limits, as_limits, open_regular, too_large
from batch_classify.pipeline.retry import describe as describe_read
from batch_classify.pipeline.retry import read_with_retries

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


class AspectRatioTooLarge(ValueError):
    """The image is longer than runtime.max_aspect_ratio times its width (or the reverse):
    resizing its shorter side to the model's input would make a huge strip."""


def _flatten_alpha(image: Image.Image) -> Image.Image:
    # Transparent pixels are composited onto white, the way viewers and browsers show them.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


_WIDE_GREY = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_STRIP_PIXELS = 1 << 20
"""Pixels per strip of a wide grey image converted to 8 bits: a few MiB at a time."""


def _grey8(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer grey image as 8-bit "L": ``round(v * 255 / peak)``, clipped to
    0-255, where peak is 65535 for a 16-bit mode or an "I" image with a value over 255, else
    255. Integer arithmetic a strip of rows at a time: v * 255 / 65535 = v / 257, and
    round(v / 257) = (2v + 257) // 514 exactly (2v + 257 is odd, so there is no tie)."""
    sixteen = image.mode.startswith("I;16") or image.getextrema()[1] > 255
    peak = 65535 if sixteen else 255
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        strip = np.asarray(image.crop((0, top, width, bottom))).astype(np.int32)
        np.clip(strip, 0, peak, out=strip)
        if sixteen:
            strip *= 2
            strip += 257
            strip //= 514
        out[top:bottom] = strip
    return Image.fromarray(out, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: alpha over white, 16-bit scaled down, CMYK converted."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY:
        return _grey8(image).convert("RGB")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (
        image.mode == "P" and "transparency" in image.info
    ):
        return _flatten_alpha(image)
    return image.convert("RGB")


class CorruptExif(ValueError):
    """The EXIF block cannot be parsed, so the photo's orientation is unknown."""


class EmptyImageFile(ValueError):
    """The file holds no bytes at all."""


def _size(stream: BinaryIO) -> int | None:
    if isinstance(stream, io.BytesIO):
        return stream.getbuffer().nbytes
    try:
        position = stream.tell()
        size = stream.seek(0, io.SEEK_END)
        stream.seek(position)
        return size
    except (OSError, AttributeError, ValueError):
        return None


@contextmanager
def _opened(source: Any, limits: Limits) -> Iterator[BinaryIO]:
    """A binary stream at the start of the encoded image (a path is opened and closed).

    A path must name a regular file (a FIFO would block the job) of at most
    runtime.max_image_bytes, checked from its size before anything is read; bytes in
    memory are held to the same limit."""
    if not isinstance(source, str):
        size = _size(source)
        if size is not None and size > limits.max_image_bytes:
            raise too_large(size, limits.max_image_bytes, "the image")
        yield source
        return
    with open_regular(source, limits.max_image_bytes) as stream:
        if _size(stream) == 0:
            raise EmptyImageFile("the file is empty (0 bytes)")
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


_SIGNATURES = (
    (re.compile(rb"^....ftyp(heic|heix|hevc|heim|heis|mif1|msf1)", re.S), "a HEIF/HEIC signature"),
    (re.compile(rb"^....ftypavi[fs]", re.S), "an AVIF signature"),
    (re.compile(rb"^(\xff\x0a|\x00\x00\x00\x0cJXL )"), "a JPEG XL signature"),
    (re.compile(rb"^%PDF-"), "a PDF signature"),
    (re.compile(rb"^PK\x03\x04"), "a ZIP signature"),
    (re.compile(rb"^\x1f\x8b"), "a gzip signature"),
    (re.compile(rb"^\xff\xd8\xff"), "a JPEG signature"),
    (re.compile(rb"^\x89PNG\r\n\x1a\n"), "a PNG signature"),
    (re.compile(rb"^GIF8[79]a"), "a GIF signature"),
    (re.compile(rb"^RIFF....WEBP", re.S), "a WebP signature"),
    (re.compile(rb"^(II\*\x00|MM\x00\*)"), "a TIFF signature"),
    (re.compile(rb"^BM"), "a BMP signature"),
)


def describe_signature(head: bytes) -> str:
    """What the first bytes of a file say it is, from a fixed table: the bytes themselves
    are never quoted (an untrusted path could name any readable file)."""
    return next((name for pattern, name in _SIGNATURES if pattern.match(head)),
                "no known image signature")


_BYTES_LITERAL = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')


def without_bytes(text: str) -> str:
    """An error text with any bytes literal a library quoted from the file (Pillow names a bad
    PNG chunk by its bytes, for instance) replaced by a placeholder."""
    return _BYTES_LITERAL.sub("<bytes not shown>", text)


def _check_shape(width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} = {width * height} pixels exceeds runtime.max_image_pixels "
            f"({limits.max_pixels})"
        )
    short, long = min(width, height), max(width, height)
    if long > limits.max_aspect_ratio * short:
        ratio = f"{long / short:.1f}:1" if short else "unbounded"
        raise AspectRatioTooLarge(
            f"{width}x{height}: aspect ratio {ratio} exceeds runtime.max_aspect_ratio "
            f"({limits.max_aspect_ratio:g})"
        )


def _open_header(stream: BinaryIO, max_pixels: int | Limits) -> Image.Image:
    """Parse the header only and check the pixel count and aspect ratio before anything is
    decoded.

    Only the header is read: a huge file that is not an image is refused without reading it.
    """
    limits = as_limits(max_pixels)
    # Pillow's own bomb check warns at one limit and fails at twice it; one limit, ours, is
    # checked here from the header, before any pixel is decoded.
    Image.MAX_IMAGE_PIXELS = None
    with _exif_checked():  # JPEG and TIFF read their EXIF while opening
        try:
            image = Image.open(stream)
        except UnidentifiedImageError:
            size = _size(stream)
            stream.seek(0)
            head = stream.read(16)
            raise UnidentifiedImageError(
                f"not an image format Pillow reads ({size} bytes, {describe_signature(head)})"
            ) from None
    _check_shape(*image.size, limits)
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
    if image.mode in _WIDE_GREY:
        image = _grey8(image)  # grey reduced, then made RGB: the same pixels, a third of the work
    elif image.mode not in {"RGB", "L"}:
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


def open_image(source: Any, max_pixels: int | Limits, cover: Cover | None = None) -> Image.Image:
    """Open, check the pixel count before decoding, apply EXIF orientation, return RGB.

    With ``cover`` an image at least twice that size decodes reduced (JPEGs at 1/2, 1/4 or
    1/8 in the DCT domain, then any format by an integer box reduce) to no less than
    ``cover``; a smaller one decodes exactly as without it.
    """
    limits = as_limits(max_pixels)
    with _opened(source, limits) as stream:
        return _decode_with_pillow(_open_header(stream, limits), cover)


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
                                                _CHECKED))


_CHECKED = Limits(max_pixels=2**62, max_image_bytes=2**62, max_aspect_ratio=float("inf"))
"""For bytes whose header already passed the limits."""


def read_encoded(source: Any, max_pixels: int | Limits) -> Encoded | torch.Tensor:
    """A plain JPEG (upright, RGB or grey) stays encoded; anything else is decoded by Pillow
    into RGB uint8 (3, H, W). The limits and the EXIF check apply to both."""
    limits = as_limits(max_pixels)
    with _opened(source, limits) as stream:
        image = _open_header(stream, limits)
        if _plain_jpeg(image):
            return Encoded(torch.frombuffer(bytearray(_rest(stream)), dtype=torch.uint8))
        return _pillow_tensor(image)


def read_pixels(source: Any, max_pixels: int | Limits, cover: Cover | None = None) -> torch.Tensor:
    """The image as RGB uint8 (3, H, W): the pixels of ``open_image``, often for less CPU.

    Plain JPEGs are decoded by torchvision straight into a tensor, about a quarter less CPU
    than Pillow's decode plus the copy into an array; both run libjpeg-turbo with the same
    settings and give the same pixels. Anything else, and any JPEG torchvision refuses,
    goes through Pillow, which also names what is wrong with a broken file. A tensor from
    torchvision is (H, W, 3) memory seen as (3, H, W). With ``cover``, an image at least
    twice that size decodes reduced, to the pixels of ``open_image``: an upright JPEG by
    simplejpeg (``_scaled_jpeg``), anything else through Pillow.
    """
    limits = as_limits(max_pixels)
    if cover is not None:
        with _opened(source, limits) as stream:
            image = _open_header(stream, limits)
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
        value = read_encoded(source, limits)
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

    def __init__(self, preprocess: Callable[[Any], torch.Tensor], max_pixels: int | Limits,
                 read_retries: int = 0):
        self.preprocess = preprocess
        self.limits = as_limits(max_pixels)
        self.max_pixels = self.limits.max_pixels
        self.decode = getattr(preprocess, "decoder", open_image)
        self.read_retries = read_retries
        """runtime.read_retries: a read that fails with a transient error is tried again (retry.py)."""

    def __getitem__(self, task: Task) -> Sample:
        if task.error is not None:
            return Sample(task.key, None, task.error)
        try:
            image = read_with_retries(lambda: self.decode(task.source(), self.limits), self.read_retries,
                                      task.key.id)
            return Sample(task.key, self.preprocess(image), None)
        except Exception as error:  # every failure of one image is that image's row
            return Sample(task.key, None, without_bytes(describe_read(error)))


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
