"""Image files of every awkward kind, made by the tests: good ones that must decode, bad ones
that must become error rows."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a huge image, with almost no data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def photo(size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 5 % 256, y * 6 % 256, (x + y) * 3 % 256], -1).astype(np.float64)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, **kwargs)
    return buffer.getvalue()


def write_good_images(folder: Path) -> dict[str, str]:
    """Files that must decode; returns name -> the mode they were written in."""
    folder.mkdir(parents=True, exist_ok=True)
    image = photo()
    written = {}

    def save(name: str, img: Image.Image, **kwargs) -> None:
        img.save(folder / name, **kwargs)
        written[name] = img.mode

    save("rgb.jpg", image, quality=92)
    save("cmyk.jpg", image.convert("CMYK"), quality=92)
    save("grey.png", image.convert("L"))
    save("grey-alpha.png", image.convert("LA"))
    save("rgba.png", image.convert("RGBA"))
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE)
    save("palette-transparent.png", palette, transparency=0)
    sixteen = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save("sixteen-bit.png", Image.fromarray(sixteen))
    frames = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100)
    save("one-pixel.png", Image.new("RGB", (1, 1), (10, 200, 30)))
    return written


def write_exif_pair(folder: Path) -> tuple[str, str]:
    """An upright photo and the same photo stored rotated with EXIF orientation 6."""
    folder.mkdir(parents=True, exist_ok=True)
    image = photo((64, 40))
    image.save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90 degrees clockwise
    image.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.png", exif=exif)
    return "upright.png", "rotated.png"


def broken_exif_jpeg() -> bytes:
    """A good JPEG whose EXIF block claims an IFD entry it does not hold."""
    good = jpeg_bytes(photo())
    payload = b"Exif\x00\x00" + b"II\x2a\x00\x08\x00\x00\x00\x05\x00\x12\x01"
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return good[:2] + segment + good[2:]


def write_bad_images(folder: Path) -> dict[str, str]:
    """Files that must become error rows; returns name -> what is wrong with it."""
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(photo())
    bad = {
        "zero-bytes.jpg": b"",
        "truncated.jpg": good[: len(good) // 3],
        "text.jpg": b"this is not an image, just text with a .jpg name\n",
        "unsupported.jpg": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n",
        "bomb.png": bomb_png(),
        "broken-exif.jpg": broken_exif_jpeg(),
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    return {name: name.split(".")[0] for name in bad}
