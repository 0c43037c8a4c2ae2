"""Contact sheets: the images behind rows (read back by thumbnails.py), drawn in a grid with captions."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from batch_classify.results.report.names import ClassNames
from batch_classify.results.report.scan import Pick

SHEET_COLUMNS = 6
THUMB = 168
"""Thumbnails are fitted into a THUMB x THUMB square."""
PAD = 4
LINE = 16
CAPTION_LINES = 3
CELL = (THUMB + 2 * PAD, THUMB + 3 * PAD + CAPTION_LINES * LINE)
"""(width, height) of one contact-sheet cell: the sheet is columns x rows of these."""


# ---------------------------------------------------------------- images


Opener = Callable[[int, str], Image.Image]
"""Opens the image behind (unit, row id): thumbnails.Pictures.tile."""


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int, keep_end: bool = False) -> str:
    """The text, cut to ``width`` pixels with an ellipsis (at the start when ``keep_end``)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[1:] if keep_end else text[:-1]
    return "…" + text if keep_end else text + "…"


@dataclass
class Tile:
    unit: int
    item_id: str
    lines: list[tuple[str, str]]
    """(text, colour) caption lines under the thumbnail."""


def mistake_tile(pick: Pick, names: ClassNames) -> Tile:
    return Tile(pick.unit, pick.item_id, [(pick.item_id, "dimgray"),
                                          ("true: " + names.label(pick.label, short=True), "darkgreen"),
                                          (f"{pick.confidence:.0%} {names.predicted(pick.top1, short=True)}",
                                           "firebrick")])


def prediction_tile(pick: Pick, names: ClassNames) -> Tile:
    return Tile(pick.unit, pick.item_id, [(pick.item_id, "dimgray"),
                                          (f"pred: {names.predicted(pick.top1, short=True)}", "black"),
                                          (f"confidence {pick.confidence:.0%}", "firebrick")])


def _thumbnail(opener: Opener | None, tile: Tile) -> Image.Image | None:
    if opener is None:
        return None
    try:
        return ImageOps.contain(opener(tile.unit, tile.item_id), (THUMB, THUMB))
    except Exception:  # a moved or broken file: the cell says so
        return None


def contact_sheet(tiles: list[Tile], opener: Opener | None, path: Path) -> int:
    """Draw the tiles in a grid of CELL-sized cells; return how many images opened.
    Writes nothing when none did."""
    columns = min(SHEET_COLUMNS, len(tiles))
    sheet = Image.new("RGB", sheet_size(len(tiles)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(13)
    opened = 0
    for i, tile in enumerate(tiles):
        x, y = (i % columns) * CELL[0], (i // columns) * CELL[1]
        draw.rectangle([x + PAD, y + PAD, x + PAD + THUMB - 1, y + PAD + THUMB - 1], fill=(232, 232, 232))
        thumb = _thumbnail(opener, tile)
        if thumb is None:
            draw.text((x + PAD + 8, y + PAD + THUMB // 2 - 8), "image unavailable", fill="gray", font=font)
        else:
            opened += 1
            sheet.paste(thumb, (x + PAD + (THUMB - thumb.width) // 2, y + PAD + (THUMB - thumb.height) // 2))
        for line, (text, colour) in enumerate(tile.lines):
            fitted = _fit(draw, text, font, THUMB, keep_end=line == 0)  # the id's end is its file name
            draw.text((x + PAD, y + 2 * PAD + THUMB + line * LINE), fitted, fill=colour, font=font)
    if opened:
        sheet.save(path, quality=88)
    return opened


def sheet_size(n_tiles: int) -> tuple[int, int]:
    """(width, height) in pixels of the contact sheet of ``n_tiles`` tiles."""
    columns = min(SHEET_COLUMNS, n_tiles)
    return columns * CELL[0], math.ceil(n_tiles / columns) * CELL[1]
