"""Inputs: what ``data.*`` names, enumerated once by the main rank as a stream.

Folders and path lists stream (id, label, path) rows in chunks (one ``os.scandir`` pass,
sorted one directory at a time, never a list of every path); WebDataset tars, Parquet files
and Hugging Face datasets are described by their shards alone (a tar, a row-group range, a
row range), and each rank reads only the shard it works on. ``listing.py`` writes what this
module yields to the output folder and cuts it into units.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch_classify.core.config import DataConfig
from batch_classify.core.errors import UserError
from batch_classify.core.labels import WNID, parse_imagenet_label, wnid_to_index
from batch_classify.core.limits import file_kind
from batch_classify.inputs.state import StateRecorder
from batch_classify.inputs.tars import SHARD_SUFFIXES, is_pattern

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    [".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm"]
)
CHUNK_ROWS = 65_536
"""Rows a file listing holds in memory before they go to disk."""
DUPLICATE_CHECK_LIMIT = 2_000_000
"""A path list is checked for repeated lines up to this many (a set of 64-bit hashes, ~150 MB
on the main rank while it lists); beyond, verify finds an id twice within a unit."""


class InputError(UserError, ValueError):
    """The input cannot be read as configured; the message says what and how to fix it."""


@dataclass
class FileRows:
    """A chunk of a file listing: ids, labels and (where they differ from root/id) paths."""

    ids: list[str]
    labels: list[int | None]
    paths: list[str | None]


@dataclass
class Enumeration:
    """What the main rank found: either file rows (streamed) or shards, plus the label space."""

    kind: str
    root: str
    classes: tuple[str, ...] | None = None
    """Names of the dataset's classes; None when labels are ImageNet-1k indices."""
    notes: list[str] = field(default_factory=list)
    rows: Iterator[FileRows] | None = None
    shards: list[dict[str, Any]] | None = None
    """Shard kinds: one dict per shard, with ``path`` (relative to root) and what else the
    kind needs (row groups and their row counts for Parquet)."""
    reader: dict[str, Any] = field(default_factory=dict)
    """What a rank needs to read a shard: columns, label map, image suffixes."""
    fingerprint_parts: list[str] = field(default_factory=list)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def walk_images(root: Path, state: StateRecorder | None = None,
                notes: list[str] | None = None) -> Iterator[str]:
    """Image files under root, relative, in sorted path order, from one stat-free scandir pass.

    Each directory's entries are sorted on their own (a directory sorts before its own
    contents exactly as in a sort of the full paths), so memory is bounded by the largest
    directory, not the tree; the walk keeps a stack, not recursion, so depth is unbounded.

    Symlinks are followed, and every file is listed once: a folder reached a second time (a
    symlink to a folder already walked, or a loop back to a parent) is skipped; a symlinked
    file whose target is itself listed under ``root`` is skipped (its target has the row); a
    symlinked file pointing outside ``root`` is listed, once however many links name it. A
    broken link keeps its row (the read names the missing target). Each folder's state goes
    to ``state`` for the resume check; skipped links are counted in ``notes``.
    """
    visited: set[tuple[int, int]] = set()
    outside: set[int] | None = set()
    skipped = {"folders": 0, "files": 0}
    real_root = os.path.realpath(root)

    def scan(rel: str) -> Iterator[tuple[str, bool, bool]] | None:
        folder = os.path.join(root, rel) if rel else os.fspath(root)
        status = os.stat(folder)
        identity = (status.st_dev, status.st_ino)
        if identity in visited:
            skipped["folders"] += 1
            return None
        visited.add(identity)
        read_ns = time.time_ns()
        entries, count = [], 0
        with os.scandir(folder) as found:
            for entry in found:
                count += 1
                if entry.name.startswith("."):
                    continue
                is_dir = entry.is_dir(follow_symlinks=True)
                if is_dir or _is_image(entry.name):
                    entries.append((entry.name + "/" if is_dir else entry.name, is_dir,
                                    entry.is_symlink()))
        if state is not None:
            state.folder(os.path.realpath(folder), status, count, read_ns)
        entries.sort()
        return iter(entries)

    def listed_elsewhere(path: str) -> bool:
        """Whether a symlinked file's row belongs to its target (inside root) or to an earlier
        link to the same outside file."""
        nonlocal outside
        target = os.path.realpath(path)
        if not os.path.exists(target):
            return False
        inside = os.path.relpath(target, real_root)
        if not inside.startswith(".."):
            parts = inside.split(os.sep)
            return _is_image(parts[-1]) and not any(part.startswith(".") for part in parts)
        if outside is None:
            return False
        digest = _line_hash(target)
        if digest in outside:
            return True
        outside.add(digest)
        if len(outside) > DUPLICATE_CHECK_LIMIT:
            outside = None
        return False

    first = scan("")
    stack = [("", first)] if first is not None else []
    while stack:
        rel, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        key, is_dir, is_link = entry
        child = f"{rel}/{key.rstrip('/')}" if rel else key.rstrip("/")
        if is_dir:
            below = scan(child)
            if below is not None:
                stack.append((child, below))
        elif is_link and listed_elsewhere(os.path.join(root, child)):
            skipped["files"] += 1
        else:
            yield child
    if notes is not None and (skipped["folders"] or skipped["files"]):
        notes.append(f"symlinks followed: {skipped['folders']} folder(s) reached twice and "
                     f"{skipped['files']} linked file(s) listed elsewhere were skipped (one row per file)")


def _chunked(rows: Iterator[tuple[str, int | None, str | None]]) -> Iterator[FileRows]:
    chunk = FileRows([], [], [])
    for item_id, label, path in rows:
        chunk.ids.append(item_id)
        chunk.labels.append(label)
        chunk.paths.append(path)
        if len(chunk.ids) >= CHUNK_ROWS:
            yield chunk
            chunk = FileRows([], [], [])
    if chunk.ids:
        yield chunk


def image_folder(root: Path, state: StateRecorder | None = None) -> Enumeration:
    """One subfolder per class: wnid folders map to ImageNet-1k, other names to sorted order."""
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise InputError(f"data.path {root} has no class subfolders (data.kind: imagefolder)")
    if all(WNID.match(name) for name in class_dirs):
        index = wnid_to_index()
        unknown = [name for name in class_dirs if name not in index]
        if unknown:
            raise InputError(f"data.path {root}: folder {unknown[0]!r} looks like a wnid but is not an "
                             "ImageNet-1k class")
        position, classes, note = index, None, "wnid folders mapped to the ImageNet-1k index"
    else:
        position = {name: i for i, name in enumerate(class_dirs)}
        classes, note = tuple(class_dirs), "class folders mapped in sorted order"

    notes = [note]

    def rows() -> Iterator[tuple[str, int | None, None]]:
        for rel in walk_images(root, state, notes):
            if "/" not in rel:
                raise InputError(f"data.path {root}: image(s) such as {rel!r} lie outside the class "
                                 "subfolders; use data.kind: images for unlabelled folders")
            yield rel, position[rel.split("/", 1)[0]], None

    return Enumeration("imagefolder", str(root), classes, notes, rows=_chunked(rows()))


def image_files(root: Path, state: StateRecorder | None = None) -> Enumeration:
    """Unlabelled images: a folder searched recursively."""
    notes: list[str] = []
    return Enumeration("images", str(root), notes=notes,
                       rows=_chunked((rel, None, None) for rel in walk_images(root, state, notes)))


def _line_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _utf8_lines(handle, path: Path, key: str = "data.path", noun: str = "list") -> Iterator[str]:
    """The lines of a text file opened as UTF-8; bytes that are not UTF-8 are an InputError."""
    try:
        yield from handle
    except UnicodeDecodeError as error:
        raise InputError(f"{key} {path}: not UTF-8 text ({error.reason}); save the {noun} as UTF-8"
                         ) from None


def _open_text(path: Path, key: str, what: str):
    """A text file opened as UTF-8 (a leading byte-order mark dropped), or a one-line InputError."""
    if path.is_dir():
        raise InputError(f"{key} {path} is a folder, not {what}")
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise InputError(f"{key} {path} does not exist") from None
    except OSError as error:
        raise InputError(f"{key} {path} cannot be read ({error.strerror})") from None


class _Spellings:
    """One spelling per file for the same-file checks: `x`, `./x`, `d/../x`, `//x` and the
    absolute path, relative to `root` or not, through a symlinked folder or not. Each folder
    is resolved once (a small cache), never each file: a symlinked file is not resolved."""

    CACHE = 65_536

    def __init__(self, root: Path):
        self.root = os.path.abspath(root)
        self.real_root = os.path.realpath(root)
        self.folders: dict[str, str] = {}

    def key(self, name: str) -> str:
        """The file's absolute path, its folder resolved."""
        folder, basename = os.path.split(os.path.join(self.root, name))
        if basename in ("", ".", ".."):
            return os.path.realpath(os.path.join(self.root, name))
        real = self.folders.get(folder)
        if real is None:
            if len(self.folders) >= self.CACHE:
                self.folders.clear()
            real = self.folders[folder] = os.path.realpath(folder)
        return os.path.join(real, basename)

    def relative(self, name: str) -> str:
        """`name` as a path relative to root where the file lies under it, else absolute."""
        key = self.key(name)
        if key.startswith(self.real_root.rstrip(os.sep) + os.sep):
            return Path(key[len(self.real_root.rstrip(os.sep)) + 1:]).as_posix()
        if not os.path.isabs(name) and ".." not in Path(name).parts:  # under a symlinked subfolder
            return Path(os.path.normpath(name)).as_posix()
        return os.path.normpath(os.path.join(self.root, name))


def file_list(list_path: Path) -> Enumeration:
    """Unlabelled images named one per line in a text file (relative to the file's folder).
    Ids are the lines as written (stripped); a file named twice, in any spelling, is refused."""
    root = list_path.parent
    notes: list[str] = []
    spellings = _Spellings(root)
    _open_text(list_path, "data.path", "a text file of image paths (data.kind: file_list); for a "
               "folder of images set data.kind images, or imagefolder for one subfolder per class").close()

    def entries() -> Iterator[tuple[int, str]]:
        with _open_text(list_path, "data.path", "a text file of image paths") as handle:
            for number, line in enumerate(_utf8_lines(handle, list_path), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if "\0" in line:
                    raise InputError(f"data.path {list_path}, line {number}: a NUL byte: this is not a text "
                                     "list of image paths (data.kind: file_list)")
                yield number, line

    def rows() -> Iterator[tuple[str, None, str | None]]:
        repeats = _Repeats()
        for number, line in entries():
            if repeats.checking:
                key = spellings.key(line)
                if repeats.candidate(key):
                    first = next(((n, text) for n, text in entries()
                                  if n < number and spellings.key(text) == key), None)
                    if first is not None:
                        again = (f"{line!r} is listed twice (again on line {number}), first on line "
                                 f"{first[0]}" if first[1] == line else
                                 f"line {number} {line!r} and line {first[0]} {first[1]!r} name the "
                                 "same file")
                        raise InputError(f"data.path {list_path}: {again}; list each file once")
                if not repeats.checking:
                    notes.append(f"repeated files checked for the first {DUPLICATE_CHECK_LIMIT} lines only")
            yield line, None, line if os.path.isabs(line) else None

    return Enumeration("file_list", str(root), notes=notes, rows=_chunked(rows()))


def _read_label_rows(labels_path: Path) -> list[tuple[int, str, str]]:
    """(row number, filename, label) rows of a labels CSV; understands Kaggle's
    LOC_val_solution.csv. Row numbers count every line, the header and blank ones too."""
    if labels_path.suffix.lower() == ".txt":
        raise InputError(
            f"data.labels {labels_path}: a plain list of numbers such as the ILSVRC2012 devkit's "
            "validation_ground_truth.txt numbers classes in the devkit's own order, not the "
            "standard sorted-wnid order, and names no files; convert it to a CSV of "
            "filename,wnid (or use Kaggle's LOC_val_solution.csv)"
        )
    key = f"data.labels {labels_path}"
    rows: list[tuple[int, list[str]]] = []
    with _open_text(labels_path, "data.labels", "a CSV file of filename,label") as handle:
        reader = csv.reader(_utf8_lines(handle, labels_path, "data.labels", "CSV"))
        try:
            for cells in reader:
                if any("\0" in cell for cell in cells):
                    raise InputError(f"{key}, row {reader.line_num}: a NUL byte: this is not a text CSV of "
                                     "filename,label")
                if any(cell.strip() for cell in cells):
                    rows.append((reader.line_num, cells))
        except csv.Error as error:
            raise InputError(f"{key}, row {reader.line_num}: not a readable CSV ({error})") from None
    if not rows:
        raise InputError(f"{key} is empty")
    header = [cell.strip().lower() for cell in rows[0][1]]
    kaggle = header[:2] == ["imageid", "predictionstring"]
    first_name, first_label = (cell.strip() for cell in (rows[0][1] + ["", ""])[:2])
    header = (len(rows[0][1]) >= 2 and first_label and not WNID.match(first_label)
              and not first_label.lstrip("-").isdigit() and not _is_image(first_name))
    if not kaggle and not header:
        rows.insert(0, (0, []))  # the first row is data
    labelled = []
    for number, cells in rows[1:]:
        where = f"{key}, row {number}"
        if len(cells) < 2:
            tabs = "; the columns must be separated by commas, not tabs" if "\t" in cells[0] else ""
            raise InputError(f"{where}: one column ({cells[0].strip()!r}); each row needs "
                             + ("ImageId,PredictionString" if kaggle else "filename,label") + tabs)
        name = cells[0].strip()
        if not name:
            raise InputError(f"{where}: the filename cell is empty")
        label = cells[1].split()[0] if kaggle and cells[1].split() else cells[1].strip()
        if not label:  # Kaggle: the first token of PredictionString is the wnid
            empty = " (PredictionString is empty; its first token is the wnid)" if kaggle else ""
            raise InputError(f"{where}: no label for {name!r}{empty}")
        labelled.append((number, name, label))
    if not labelled:
        raise InputError(f"{key} has a header but no rows")
    return labelled


def labelled_folder(root: Path, labels_path: Path, state: StateRecorder | None = None) -> Enumeration:
    """A flat folder plus a labels CSV. The CSV defines the items: a listed file that is
    missing becomes an error row at run time rather than vanishing. Names are matched as
    written, as `./x`, `d/../x` or absolute, or by stem (Kaggle's ImageIds have no suffix);
    two rows naming one file are refused. (Held in memory: a labels file is ImageNet-val
    sized; collections without labels stream.)"""
    rows = _read_label_rows(labels_path)
    notes = ["labels from " + labels_path.name]
    on_disk = list(walk_images(root, state, notes))
    if state is not None:
        state.content(os.path.realpath(labels_path))
    on_disk_set = set(on_disk)
    by_stem: dict[str, str] = {}
    stems_of_several: set[str] = set()
    for rel in on_disk:
        stem = os.path.splitext(rel)[0]
        if by_stem.setdefault(stem, rel) != rel:
            stems_of_several.add(stem)
    spellings = _Spellings(root)
    listed: list[tuple[str, int | None, None]] = []
    first_row: dict[str, tuple[int, str]] = {}
    for number, name, label in rows:
        where = f"data.labels {labels_path}, row {number}"
        rel = spellings.relative(name)
        if rel not in on_disk_set:
            if rel in stems_of_several:
                raise InputError(f"{where}: {name!r} could be {by_stem[rel]!r} or another file with that "
                                 "stem; name the file with its suffix")
            rel = by_stem.get(rel, rel)
        earlier = first_row.setdefault(spellings.key(rel), (number, name))
        if earlier[0] != number:
            same = "is listed twice" if earlier[1] == name else f"names the same file as {earlier[1]!r}"
            raise InputError(f"{where}: {name!r} {same} (first on row {earlier[0]}); list each file once")
        try:
            listed.append((rel, parse_imagenet_label(label, where), None))
        except ValueError as error:
            raise InputError(str(error)) from None
    unlisted = len(on_disk_set - {rel for rel, _, _ in listed})
    if unlisted:
        note = f"{unlisted} image file(s) in {root} are not in the labels file and are skipped"
        log.warning(note)
        notes.append(note)
    return Enumeration("images", str(root), notes=notes, rows=_chunked(iter(listed)))


# ---------------------------------------------------------------- label columns of tables


def label_map(feature: Any, column: str) -> tuple[dict[str, Any], tuple[str, ...] | None, str]:
    """(how a rank maps a raw label value, the dataset's own classes or None, a note)."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if all(WNID.match(n) for n in names):
            index = wnid_to_index()
            return ({"column": column, "mode": "lookup", "table": [index[n] for n in names]}, None,
                    f"labels from column {column!r} (wnid class names)")
        if len(names) == 1000:
            return ({"column": column, "mode": "index"}, None,
                    f"labels from column {column!r}; 1000-class ClassLabel taken as ImageNet-1k order")
        return {"column": column, "mode": "index"}, tuple(names), f"labels from column {column!r}"
    return {"column": column, "mode": "parse"}, None, f"labels from column {column!r}"


def map_label(value: Any, spec: dict[str, Any] | None) -> int | None:
    """A raw label value as the label index that ``label_map`` describes (ValueError if bad)."""
    if spec is None or value is None:
        return None
    if spec["mode"] == "parse":
        if value == -1 or value == "-1":
            return None
        return parse_imagenet_label(str(value), f"data.label_column {spec['column']!r}")
    value = int(value)
    if value < 0:
        return None
    return spec["table"][value] if spec["mode"] == "lookup" else value


def _columns(features: Any, cfg: DataConfig, where: str) -> tuple[str, str | None, Any]:
    """(image column, label column or None, the datasets.Image feature or None) of a table."""
    import datasets

    image_column = cfg.image_column
    if image_column is None:
        typed = [name for name, f in features.items() if isinstance(f, datasets.Image)]
        image_column = typed[0] if len(typed) == 1 else "image"
    if image_column not in features:
        raise InputError(f"data.image_column {image_column!r} is not a column of {where} "
                         f"(columns: {list(features)})")
    label_column = cfg.label_column
    if label_column is None and "label" in features:
        label_column = "label"
    if label_column is not None and label_column not in features:
        raise InputError(f"data.label_column {label_column!r} is not a column of {where} "
                         f"(columns: {list(features)})")
    if cfg.id_column is not None and cfg.id_column not in features:
        raise InputError(f"data.id_column {cfg.id_column!r} is not a column of {where} "
                         f"(columns: {list(features)})")
    return image_column, label_column, features[image_column]


# ---------------------------------------------------------------- shard kinds


def webdataset(cfg: DataConfig) -> Enumeration:
    """WebDataset tars: one unit each; samples are only read by the rank that runs the tar."""
    from batch_classify.inputs.tars import IMAGE_SUFFIXES, ShardSpecError, expand_shards, shard_root

    root = shard_root(cfg.path)
    notes: list[str] = []
    try:
        tars = expand_shards(cfg.path, notes=notes, what="data.path")
    except ShardSpecError as error:
        hint = ("; for a folder of images set data.kind images, or imagefolder for one subfolder per "
                "class" if Path(cfg.path).is_dir() else "")
        raise InputError(f"{error} (data.kind: webdataset){hint}") from None
    for note in notes:
        log.warning(note)
    shards, parts = [], []
    named: dict[str, Path] = {}
    for tar in tars:
        rel = Path(os.path.relpath(tar, root)).as_posix()  # a symlinked tar keeps its own name
        if named.setdefault(rel, tar) is not tar:  # ids start with rel: two tars cannot share it
            raise InputError(f"data.path {cfg.path}: {str(named[rel])!r} and {str(tar)!r} are different "
                             f"files but both would be named {rel!r} in ids; name them without '..'")
        shards.append({"path": rel})
        parts.append(f"{rel}\t{_regular_file(tar).st_size}")
    suffixes = [s.lower().lstrip(".") for s in (cfg.image_suffixes or IMAGE_SUFFIXES)]
    notes = [f"{len(tars)} WebDataset tar(s)", *notes,
             f"labels from the .json field {cfg.label_key!r}" if cfg.label_key else
             "labels from .cls members where present (ImageNet-1k indices)"]
    return Enumeration("webdataset", str(root), None, notes, shards=shards,
                       reader={"image_suffixes": suffixes, "label_key": cfg.label_key},
                       fingerprint_parts=parts)


def _regular_file(path: Path) -> os.stat_result:
    """The stat of a shard file; a FIFO, socket or device named like one is an InputError."""
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise InputError(f"data.path: {path} is a {file_kind(status.st_mode)}, not a regular file; "
                         "replace it with the file, or move it out of the input")
    return status


SPARK_MARKERS = frozenset({"_SUCCESS", "_metadata", "_common_metadata", "_temporary"})
"""What Spark, Hive and Dask write beside the part files of a Parquet folder."""


def _parquet_files(cfg: DataConfig, notes: list[str]) -> tuple[Path, list[Path]]:
    """The Parquet files of data.path: one file; a folder searched recursively (Spark's
    ``table.parquet/`` of ``part-*.parquet`` files and Hive ``key=value/`` subfolders
    included), skipping names that start with '.' or '_' as Spark and pyarrow do (a
    ``_temporary/`` folder holds a write in progress); a glob; or a brace pattern. A folder
    among the matches of a pattern is searched the same way. Each file is read once."""
    from batch_classify.inputs.tars import ShardSpecError, expand_shards, shard_root

    path = Path(cfg.path)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir() and (path / "_delta_log").is_dir():
        raise InputError(f"data.path {path} is a Delta Lake table: its folder also holds the files of "
                         "rows deleted or rewritten since, so reading every file would count them; "
                         "export the current version to Parquet files and point data.path at them")

    def expand(spec: str) -> list[Path]:
        try:
            return expand_shards(spec, suffixes=(".parquet",), notes=notes, what="data.path",
                                 skip_prefixes=(".", "_"), parts_order=True)
        except ShardSpecError as error:
            raise InputError(f"{error} (data.kind: parquet)") from None

    files: list[Path] = []
    identities: dict[str, Path] = {}
    repeats = 0
    for found in expand(cfg.path):
        for file in expand(str(found)) if found.is_dir() else [found]:
            identity = os.path.realpath(file)  # Parquet files are few: a stat each is cheap
            if identities.setdefault(identity, file) is file:
                files.append(file)
            elif repeats == 0:
                repeats = 1
                notes.append(f"data.path {cfg.path!r}: {str(file)!r} is {str(identities[identity])!r}, "
                             "matched a second time; each file is read once")
    return shard_root(cfg.path), files


def parquet(cfg: DataConfig) -> Enumeration:
    """Parquet files with an image column ({bytes, path} struct, bytes, or path strings):
    units are runs of row groups, read by the rank that runs them; only footers are read here."""
    import datasets
    import pyarrow.parquet as pq

    def footer(file: Path):
        _regular_file(file)  # reading a FIFO's footer would wait for ever
        try:
            return pq.read_metadata(file)
        except Exception as error:
            raise InputError(f"data.path: {file} is not a readable Parquet file ({error})") from None

    notes: list[str] = []
    root, files = _parquet_files(cfg, notes)
    for note in notes:
        log.warning(note)
    schema = footer(files[0]).schema.to_arrow_schema()  # the columns, as the first file has them
    try:
        features = datasets.Features.from_arrow_schema(schema)
    except Exception:  # columns datasets has no feature type for: read them as plain values
        features = {name: None for name in schema.names}
    image_column, label_column, _ = _columns(features, cfg, str(files[0]))
    needed = {image_column, label_column, cfg.id_column} - {None}
    shards, parts = [], []
    for file in files:
        metadata = footer(file)
        missing = needed - set(metadata.schema.to_arrow_schema().names)
        if missing:  # found now, not as a crash when a rank reaches the file
            raise InputError(f"data.path: {file} has no column {', '.join(sorted(missing))} (the "
                             f"first file, {files[0].name}, has it); every file needs the same columns")
        rel = Path(os.path.relpath(file, root)).as_posix()
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        shards.append({"path": rel, "row_groups": groups})
        parts.append(f"{rel}\t{metadata.num_rows}\t{file.stat().st_size}")
    reader = {"image_column": image_column, "id_column": cfg.id_column, "label": None}
    if cfg.id_column is not None:
        notes += _check_parquet_ids(files, root, cfg.id_column)
    classes, notes = None, [f"{len(files)} Parquet file(s), image column {image_column!r}", *notes]
    if label_column is not None:
        reader["label"], classes, note = label_map(features[label_column], label_column)
        notes.append(note)
    return Enumeration("parquet", str(root), classes, notes, shards=shards, reader=reader,
                       fingerprint_parts=parts)


class _Repeats:
    """Whether a key was seen before, from a set of 64-bit hashes of the first
    DUPLICATE_CHECK_LIMIT keys (then the set is dropped: memory stays bounded). A hit is only
    a candidate: the caller confirms it by a second pass, which also finds where it was first.
    The hashes are Python's own (SipHash, seeded per process): the set lives in one process."""

    def __init__(self) -> None:
        self.hashes: set[int] | None = set()

    @property
    def checking(self) -> bool:
        return self.hashes is not None

    def candidate(self, key: str) -> bool:
        return self.first_candidate([key]) is not None

    def first_candidate(self, keys: list[str]) -> int | None:
        """The index of the first of `keys` that may have been seen before (the keys before it
        are recorded; call again with the rest), else None with all of them recorded."""
        if self.hashes is None:
            return None
        digests = list(map(hash, keys))
        if self.hashes.isdisjoint(digests) and len(set(digests)) == len(digests):
            self.hashes.update(digests)  # the common case, without a Python step per key
            found = None
        else:
            found = next(i for i, digest in enumerate(digests)
                         if digest in self.hashes or self.hashes.add(digest))
        if len(self.hashes) >= DUPLICATE_CHECK_LIMIT:
            self.hashes = None
        return found


def _check_parquet_ids(files: list[Path], root: Path, column: str) -> list[str]:
    """Refuse an id column with a null (it would become the id 'None') or, over the first
    DUPLICATE_CHECK_LIMIT rows, a repeated id; nulls further on are found from the footers'
    statistics, or by reading that row group's id column where a footer has none. A row group
    whose id column cannot be read is left to the run, which makes its rows error rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def ids(handle: Any, groups: list[int]) -> list[Any]:
        """The id column of each row group (None where it cannot be read), a batch of groups
        read at once (hub files have 100-row groups)."""
        try:
            table = handle.read_row_groups(groups, columns=[column])
        except (OSError, pa.ArrowException):
            if len(groups) > 1:
                return [values for group in groups for values in ids(handle, [group])]
            return [None]
        values, start = [], 0
        for group in groups:
            count = handle.metadata.row_group(group).num_rows
            values.append(table.column(0).slice(start, count))
            start += count
        return values

    def batches(metadata: Any, groups: range) -> Iterator[list[int]]:
        batch, rows = [], 0
        for group in groups:
            batch.append(group)
            rows += metadata.row_group(group).num_rows
            if rows >= CHUNK_ROWS:
                yield batch
                batch, rows = [], 0
        if batch:
            yield batch

    def id_groups() -> Iterator[tuple[str, int, int, Any]]:
        """(rel, row group, its first row's index in the file, its ids or None where they cannot
        be read) of the row groups to check for repeats."""
        seen = 0
        for file in files:
            handle = pq.ParquetFile(file)
            rel = Path(os.path.relpath(file, root)).as_posix()
            row = 0
            for batch in batches(handle.metadata, range(handle.metadata.num_row_groups)):
                if seen >= DUPLICATE_CHECK_LIMIT:
                    stopped.append(True)
                    return
                for group, values in zip(batch, ids(handle, batch)):
                    yield rel, group, row, values
                    count = handle.metadata.row_group(group).num_rows
                    row += count
                    seen += count

    def null(rel: str, group: int, row: int) -> InputError:
        return InputError(f"data.id_column {column!r}: row {row} of {rel} (row group {group}) has no id "
                          "(null); fill the column, or drop data.id_column to number the rows instead")

    def first_null(values: Any) -> int:
        return next(i for i, value in enumerate(values.to_pylist()) if value is None)

    def where(key: str) -> tuple[str, int]:
        for rel, _, start, values in id_groups():
            for offset, value in enumerate(values.to_pylist() if values is not None else []):
                if value is not None and str(value) == key:
                    return rel, start + offset
        raise AssertionError("unreachable: the id was read before")

    repeats, stopped = _Repeats(), []
    for rel, group, start, values in id_groups():
        if values is None:
            continue
        if values.null_count:
            raise null(rel, group, start + first_null(values))
        keys = [str(value) for value in values.to_pylist()]
        offset = 0
        while (hit := repeats.first_candidate(keys[offset:])) is not None:
            offset += hit
            first = where(keys[offset])
            if first != (rel, start + offset):
                raise InputError(
                    f"data.id_column {column!r}: id {keys[offset]!r} is on row {first[1]} of {first[0]} "
                    f"and again on row {start + offset} of {rel}; ids must be unique: choose another "
                    "column, or drop data.id_column to number the rows instead")
            offset += 1  # two ids with one hash: not a repeat
    if repeats.checking and not stopped:
        return []
    for file in files:  # past the checked rows: the footers' null counts
        handle = pq.ParquetFile(file)
        metadata = handle.metadata
        chunk = next((i for i in range(metadata.num_columns)
                      if metadata.schema.column(i).path.split(".")[0] == column), None)
        start = 0
        for group in range(metadata.num_row_groups):
            statistics = metadata.row_group(group).column(chunk).statistics if chunk is not None else None
            if statistics is None or not statistics.has_null_count or statistics.null_count:
                values = ids(handle, [group])[0]
                if values is not None and values.null_count:
                    rel = Path(os.path.relpath(file, root)).as_posix()
                    raise null(rel, group, start + first_null(values))
            start += metadata.row_group(group).num_rows
    return [f"repeated ids checked over the first {DUPLICATE_CHECK_LIMIT} rows only; nulls in all"]


HF_MARKERS = {"dataset_info.json", "dataset_dict.json", "state.json"}


def hf_load(cfg: DataConfig):
    """The Hugging Face dataset (one split), memory-mapped, its image column left encoded."""
    import datasets

    path = Path(cfg.path)
    if path.is_file() and path.suffix.lower() not in {".parquet", ".arrow"}:
        raise InputError(f"data.path {path} is a file that data.kind hf cannot load: give a folder written "
                         "by save_to_disk, a .parquet file or a dataset name on the hub (or set data.kind "
                         "to what the file is)")
    try:
        if path.is_dir() and any((path / marker).exists() for marker in HF_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():  # data.kind: hf asked for explicitly
            loaded = datasets.load_dataset(path.suffix.lower().lstrip("."), data_files=str(path))
        else:
            loaded = datasets.load_dataset(cfg.path, split=cfg.split)
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = "a local path" if path.exists() else "not a local path, and"
        raise InputError(f"data.path {cfg.path!r}: {where} datasets could not load it as a dataset "
                         f"({type(error).__name__}: {first})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if cfg.split is not None:
            if cfg.split not in loaded:
                raise InputError(f"data.split {cfg.split!r} not in the dataset's splits {splits}")
            loaded = loaded[cfg.split]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        elif "validation" in loaded:
            loaded = loaded["validation"]
        else:
            raise InputError(f"data.split: the dataset has splits {splits}; choose one")
    return loaded


def _check_dataset_ids(dataset: Any, column: str) -> list[str]:
    """As _check_parquet_ids, for a Hugging Face dataset: nulls over every row (the Arrow
    column's null count), repeats over the first DUPLICATE_CHECK_LIMIT rows."""
    ids = dataset.select_columns([column])
    upto = min(len(ids), DUPLICATE_CHECK_LIMIT)

    def id_rows(start: int = 0, stop: int = upto) -> Iterator[tuple[int, Any]]:
        for low in range(start, stop, CHUNK_ROWS):
            for offset, value in enumerate(ids[low:min(stop, low + CHUNK_ROWS)][column]):
                yield low + offset, value

    def null(row: int) -> InputError:
        return InputError(f"data.id_column {column!r}: row {row} of the dataset has no id (null); fill "
                          "the column, or drop data.id_column to number the rows instead")

    repeats = _Repeats()
    for row, value in id_rows():
        if value is None:
            raise null(row)
        key = str(value)
        if repeats.candidate(key):
            first = next((r for r, v in id_rows() if v is not None and str(v) == key and r != row), None)
            if first is not None:
                raise InputError(f"data.id_column {column!r}: id {key!r} is on row {first} and again on row "
                                 f"{row}; ids must be unique: choose another column, or drop "
                                 "data.id_column to number the rows instead")
    if upto == len(ids):
        return []
    if getattr(dataset, "_indices", None) is None and dataset.data.column(column).null_count == 0:
        return [f"repeated ids checked over the first {DUPLICATE_CHECK_LIMIT} rows only; nulls in all"]
    for row, value in id_rows(upto, len(ids)):
        if value is None:
            raise null(row)
    return [f"repeated ids checked over the first {DUPLICATE_CHECK_LIMIT} rows only; nulls in all"]


def hf_dataset(cfg: DataConfig) -> Enumeration:
    """A Hugging Face dataset: units are row ranges, read by the rank that runs them."""
    import datasets

    dataset = hf_load(cfg)
    image_column, label_column, feature = _columns(dataset.features, cfg, "the dataset")
    reader: dict[str, Any] = {"image_column": image_column, "id_column": cfg.id_column, "label": None,
                              "decode_off": isinstance(feature, datasets.Image)}
    classes, notes = None, [f"Hugging Face dataset, image column {image_column!r}"]
    if label_column is not None:
        reader["label"], classes, note = label_map(dataset.features[label_column], label_column)
        notes.append(note)
    if cfg.id_column is not None:
        notes += _check_dataset_ids(dataset, cfg.id_column)
    shards = [{"path": "", "rows": len(dataset)}]
    return Enumeration("hf", cfg.path, classes, notes, shards=shards, reader=reader,
                       fingerprint_parts=[str(getattr(dataset, "_fingerprint", "")), str(len(dataset))])


# ---------------------------------------------------------------- kinds


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _tar_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def detect_kind(cfg: DataConfig) -> str:
    """The source kind that ``data.kind: auto`` resolves to."""
    path = Path(cfg.path)
    if not path.exists():
        if is_pattern(cfg.path):
            from batch_classify.inputs.tars import ShardSpecError, brace_names

            try:  # what the first name is, as `{a,b}.tar` and `{a.parquet,*.parquet}` end differently
                name = next(brace_names(cfg.path, f"data.path {cfg.path!r}")[1], cfg.path)
            except ShardSpecError as error:
                raise InputError(str(error)) from None
            if _tar_name(name):
                return "webdataset"
            if name.lower().endswith(".parquet"):
                return "parquet"
            raise InputError(f"data.path {cfg.path}: a pattern that names neither .tar nor .parquet "
                             "files; set data.kind")
        if HUB_ID.match(cfg.path) and not cfg.path.startswith("."):
            return "hf"  # a dataset name that datasets.load_dataset resolves
        raise InputError(f"data.path {cfg.path} does not exist")
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return "parquet"
        if _tar_name(path.name):
            return "webdataset"
        if path.suffix.lower() in {".txt", ".lst", ".list"}:
            return "file_list"
        raise InputError(f"data.path {path}: cannot tell what kind of input this file is; set data.kind")
    # One pass over the top level, holding flags only (a flat folder may hold millions).
    if path.suffix.lower() == ".parquet":
        return "parquet"  # Spark's table.parquet/ folder of part files
    hf = parquet_files = tars = False
    only_folders, first_folder = True, None
    with os.scandir(path) as entries:
        for entry in entries:
            name = entry.name
            if name == "_delta_log":
                return "parquet"  # refused there, with the reason
            if name.startswith(".") or name in SPARK_MARKERS:
                continue
            hf = hf or name in HF_MARKERS or name.endswith(".arrow")
            parquet_files = parquet_files or name.lower().endswith(".parquet")
            tars = tars or _tar_name(name)
            if entry.is_dir():
                first_folder = name if first_folder is None else min(first_folder, name)
            else:
                only_folders = False
    if hf:
        return "hf"
    # Parquet one level down (a hub layout's data/): only the first folder is looked into, not
    # every class folder of an ImageNet-style tree.
    if parquet_files or (only_folders and first_folder is not None and any(
            entry.name.lower().endswith(".parquet") for entry in os.scandir(path / first_folder))):
        return "parquet"
    if tars:
        return "webdataset"
    if cfg.labels is not None:
        return "images"
    if only_folders and first_folder is not None:
        return "imagefolder"
    return "images"


KIND_KEYS = {"split": ("hf",), "image_column": ("parquet", "hf"), "label_column": ("parquet", "hf"),
             "id_column": ("parquet", "hf"), "label_key": ("webdataset",), "image_suffixes": ("webdataset",)}
"""The data.* keys that only some kinds read: set for another kind, they would be ignored."""


def _check_kind_fits(kind: str, path: Path, cfg: DataConfig) -> None:
    """A key the kind would ignore, or a file where a folder kind is set: one line naming the
    fix."""
    for key, kinds in KIND_KEYS.items():
        if getattr(cfg, key) is not None and kind not in kinds:
            detected = " (detected from data.path)" if cfg.kind == "auto" else ""
            raise InputError(f"data.{key} applies to data.kind {' or '.join(kinds)}, not to data.kind "
                             f"{kind}{detected} ({path}); remove it, or set data.kind")
    if kind not in {"imagefolder", "images"} or not path.exists() or path.is_dir():
        return
    name = path.name.lower()
    fits = ("file_list" if path.suffix.lower() in {".txt", ".lst", ".list"} else
            "webdataset" if _tar_name(name) else "parquet" if name.endswith(".parquet") else None)
    fix = (f"for this file set data.kind {fits}" if fits else
           "point data.path at the folder of images, or set data.kind to what the file is "
           "(file_list, webdataset, parquet or hf)")
    what = "with one subfolder per class" if kind == "imagefolder" else "of images"
    raise InputError(f"data.path {path} is a file, not a folder {what} (data.kind: {kind}); {fix}")


def enumerate_input(cfg: DataConfig, state: StateRecorder | None = None) -> Enumeration:
    """Resolve ``data.*`` into the stream (or shards) the listing is written from; the folders
    walked and the files read go to ``state``."""
    kind = cfg.kind if cfg.kind != "auto" else detect_kind(cfg)
    path = Path(cfg.path)
    if kind in {"imagefolder", "images", "file_list"} and not path.exists():
        raise InputError(f"data.path {path} does not exist")
    if cfg.labels is not None and kind != "images":
        raise InputError(f"data.labels is for a flat folder of images (data.kind: images), "
                         f"not for data.kind: {kind}")
    _check_kind_fits(kind, path, cfg)
    if kind == "imagefolder":
        return image_folder(path, state)
    if kind == "images":
        if not path.is_dir():
            raise InputError(f"data.path {path} is not a folder (data.kind: images)")
        return labelled_folder(path, Path(cfg.labels), state) if cfg.labels else image_files(path, state)
    if kind == "file_list":
        if state is not None:
            state.file(os.path.realpath(path))
        return file_list(path)
    if kind == "webdataset":
        return webdataset(cfg)
    if kind == "parquet":
        return parquet(cfg)
    return hf_dataset(cfg)
