"""What one item may cost, and opening only regular files.

Every input file a job reads (an image, a tar, a Parquet file) is opened here: a FIFO, socket or
device could block the job forever or stream without end, so it is refused with an error that
names what it is. The limits come from the ``runtime`` section of the job spec; each error
names the key that sets the limit it hit.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any, BinaryIO

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """The per-item bounds (defaults as in ``config.RuntimeConfig``)."""

    max_pixels: int = 128_000_000
    """runtime.max_image_pixels: pixels an image header may claim."""
    max_image_bytes: int = 256 * MiB
    """runtime.max_image_bytes: bytes of one image file, tar member or Parquet image cell."""
    max_aspect_ratio: float = 50.0
    """runtime.max_aspect_ratio: longer side / shorter side of an image."""
    max_decompressed_bytes: int = 16 * GiB
    """runtime.max_decompressed_bytes: bytes a compressed tar may inflate to."""
    max_row_group_bytes: int = 4 * GiB
    """runtime.max_row_group_bytes: uncompressed bytes (as the Parquet footer declares them) of
    the columns read from one row group."""

    @classmethod
    def from_runtime(cls, runtime: Any) -> Limits:
        return cls(runtime.max_image_pixels, runtime.max_image_bytes, runtime.max_aspect_ratio,
                   runtime.max_decompressed_bytes, runtime.max_row_group_bytes)


def as_limits(value: int | Limits) -> Limits:
    """A bare pixel count (the older calling convention) is that limit with the defaults."""
    return value if isinstance(value, Limits) else Limits(max_pixels=int(value))


class NotRegularFile(ValueError):
    """A path that names a FIFO, socket, device or folder instead of a file."""


class FileTooLarge(ValueError):
    """An image file, tar member or image cell over runtime.max_image_bytes."""


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISDIR, "folder"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _refuse(mode: int) -> NotRegularFile:
    return NotRegularFile(f"the path is a {file_kind(mode)}, not a regular file")


def too_large(size: int, limit: int, what: str = "the file") -> FileTooLarge:
    return FileTooLarge(f"{what} is {size} bytes, over runtime.max_image_bytes ({limit})")


def open_regular(path: str | os.PathLike, max_bytes: int | None = None) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file of at most ``max_bytes``.

    The path is stat'ed first, so a device is refused before an open that could have side
    effects; it is then opened non-blocking (opening a FIFO with no writer would wait
    forever) and checked again on the descriptor, so a file swapped for a FIFO in between is
    refused too. Raises NotRegularFile, FileTooLarge, or the OSError of the filesystem.
    """
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise _refuse(status.st_mode)
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise _refuse(status.st_mode)
        if max_bytes is not None and status.st_size > max_bytes:
            raise too_large(status.st_size, max_bytes)
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
