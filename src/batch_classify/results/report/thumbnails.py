"""The report's pictures read back from the input, grouped by unit: each unit's input (a tar, a
run of row groups, a range of listed files) is opened once for all the items wanted from it,
and read only up to the last of them."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from batch_classify.core.layout import REPORT_ASSETS
from batch_classify.inputs.listing import item_sources, read_listing
from batch_classify.pipeline.decode import open_image
from batch_classify.results.report.pictures import THUMB

log = logging.getLogger(__name__)

THUMB_PX = 128
"""The page's thumbnails fit in THUMB_PX x THUMB_PX."""
THUMB_QUALITY = 75
DECODE_COVER = (256, 256)
"""Large photos decode reduced, to no less than this (pipeline.decode's reduced decode)."""

Use = Callable[[int, str, Image.Image], None]
"""Called with (unit, id, RGB image) for each wanted item that opened."""


THUMBNAIL = re.compile(r"^[0-9a-f]{20}\.jpg$")


def thumbnail_name(unit: int, item_id: str) -> str:
    """The file name of an item's thumbnail: a digest, never the id (ids hold any character)."""
    return hashlib.sha1(f"{unit}\0{item_id}".encode()).hexdigest()[:20] + ".jpg"


@dataclass
class Reading:
    """What a read-back found: the items that opened, and why the others did not."""

    opened: set[tuple[int, str]] = field(default_factory=set)
    failed: dict[tuple[int, str], str] = field(default_factory=dict)
    unreachable: str | None = None
    """Set where the input as a whole cannot be read (moved, unmounted): no item opened."""
    units_read: int = 0


def read_back(manifest: dict[str, Any], output_dir: str | Path, wanted: Iterable[tuple[int, str]],
              use: Use) -> Reading:
    """Open each wanted (unit, id) once, unit by unit, and hand its image to ``use``."""
    by_unit: dict[int, set[str]] = {}
    for unit, item_id in wanted:
        by_unit.setdefault(unit, set()).add(item_id)
    reading = Reading()
    if not by_unit:
        return reading
    max_pixels = manifest.get("config", {}).get("runtime", {}).get("max_image_pixels", 128_000_000)
    try:
        listing = read_listing(output_dir)
        if listing is not None:
            listing.reader.check_reachable()
            faults = listing.faults
            by_item = None
        else:  # a folder written by hand: items found by id, one at a time
            by_item, faults = item_sources(output_dir, manifest), (OSError,)
    except Exception as error:  # the report goes on without pictures
        reading.unreachable = f"{type(error).__name__}: {error}"
        return reading

    def opened(unit: int, item_id: str, source) -> None:
        try:
            image = open_image(source, max_pixels, DECODE_COVER)
        except Exception as error:  # one broken or moved item: its place says so
            reading.failed[(unit, item_id)] = f"{type(error).__name__}: {error}"
            return
        use(unit, item_id, image)  # a thumbnail that cannot be written is the output's fault: raised
        reading.opened.add((unit, item_id))

    for unit in sorted(by_unit):
        ids = by_unit[unit]
        reading.units_read += 1
        if by_item is not None:
            for item_id in sorted(ids):
                try:
                    source = by_item(unit, item_id)
                except Exception as error:
                    reading.failed[(unit, item_id)] = f"{type(error).__name__}: {error}"
                    continue
                opened(unit, item_id, source)
            continue
        left = set(ids)
        try:
            for record in listing.records(unit):
                if record.id in left:
                    left.discard(record.id)
                    if record.payload is None:
                        reading.failed[(unit, record.id)] = record.error or "no image"
                    else:
                        opened(unit, record.id, record.source())
                    if not left:
                        break  # the rest of the unit is not read
        except (*faults, IndexError) as error:
            log.warning("report: unit %d (%s) could not be read back: %s", unit, listing.describe_unit(unit),
                        error)
        for item_id in left:
            reading.failed.setdefault((unit, item_id), f"not in unit {unit} of the input any more")
    return reading


class Pictures:
    """The pictures of one report: the page's thumbnails, written as small JPEGs into ``folder``,
    and the contact sheets' tiles, kept in memory (a few dozen)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.written: set[str] = set()
        self.tiles: dict[tuple[int, str], Image.Image] = {}
        self.reading = Reading()

    @classmethod
    def read(cls, manifest: dict[str, Any], output_dir: str | Path, page: Iterable[tuple[int, str]],
             sheets: Iterable[tuple[int, str]], folder: Path | None = None) -> Pictures:
        """Read every picture of the page and the sheets in one pass over their units; the page's
        thumbnails go to ``folder`` (default: the output's report_files/)."""
        pictures = cls(Path(output_dir) / REPORT_ASSETS if folder is None else folder)
        page, sheets = set(page), set(sheets)

        def use(unit: int, item_id: str, image: Image.Image) -> None:
            if (unit, item_id) in sheets:
                pictures.tiles[(unit, item_id)] = ImageOps.contain(image, (THUMB, THUMB))
            if (unit, item_id) in page:
                small = image.copy()
                small.thumbnail((THUMB_PX, THUMB_PX))
                pictures.folder.mkdir(exist_ok=True)
                name = thumbnail_name(unit, item_id)
                small.save(pictures.folder / name, quality=THUMB_QUALITY)
                pictures.written.add(name)

        pictures.reading = read_back(manifest, output_dir, page | sheets, use)
        pictures._remove_stale()
        return pictures

    def _remove_stale(self) -> None:
        """Thumbnails an earlier report wrote that this one does not show."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if THUMBNAIL.match(path.name) and path.name not in self.written:
                path.unlink()
        if not any(self.folder.iterdir()):
            self.folder.rmdir()

    def src(self, unit: int, item_id: str) -> str | None:
        """The thumbnail's address relative to the output folder, or None where it did not open."""
        name = thumbnail_name(unit, item_id)
        return f"{self.folder.name}/{name}" if name in self.written else None

    def why_missing(self, unit: int, item_id: str) -> str:
        return self.reading.unreachable or self.reading.failed.get((unit, item_id), "not read")

    def tile(self, unit: int, item_id: str) -> Image.Image:
        """A contact-sheet tile (pictures.Opener); raises where it did not open."""
        return self.tiles[(unit, item_id)]

    def size_bytes(self) -> int:
        return sum((self.folder / name).stat().st_size for name in self.written)
