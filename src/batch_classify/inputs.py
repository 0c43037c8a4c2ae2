"""Inputs: what ``data.*`` names, enumerated once by the main rank as a stream.

Folders and path lists stream (id, label, path) rows in chunks (one ``os.scandir`` pass,
sorted one directory at a time, never a list of every path); WebDataset tars, Parquet files
and Hugging Face datasets are described by their shards alone (a tar, a row-group range, a
row range), and each rank reads only the shard it works on. ``listing.py`` writes what this
module yields to the output folder and cuts it into units.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig
from .errors import UserError
from .input_state import StateRecorder
from .labels import WNID, parse_imagenet_label, wnid_to_index
from .tars import SHARD_SUFFIXES, is_pattern

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
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _utf8_lines(handle, path: Path) -> Iterator[str]:
    """The lines of a text file opened as UTF-8; bytes that are not UTF-8 are an InputError."""
    try:
        yield from handle
    except UnicodeDecodeError as error:
        raise InputError(f"data.path {path}: not UTF-8 text ({error.reason}); save the list as UTF-8"
                         ) from None


def file_list(list_path: Path) -> Enumeration:
    """Unlabelled images named one per line in a text file (relative to the file's folder)."""
    root = list_path.parent
    notes: list[str] = []

    def rows() -> Iterator[tuple[str, None, str | None]]:
        seen: set[int] | None = set()
        with open(list_path, encoding="utf-8") as handle:
            for number, line in enumerate(_utf8_lines(handle, list_path), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if seen is not None:
                    digest = _line_hash(line)
                    if digest in seen:
                        raise InputError(f"data.path {list_path}: {line!r} is listed twice (again on line "
                                         f"{number})")
                    seen.add(digest)
                    if len(seen) > DUPLICATE_CHECK_LIMIT:
                        seen = None
                        notes.append(f"repeated lines checked for the first {DUPLICATE_CHECK_LIMIT} only")
                yield line, None, line if os.path.isabs(line) else None

    return Enumeration("file_list", str(root), notes=notes, rows=_chunked(rows()))


def _read_label_rows(labels_path: Path) -> list[tuple[str, str]]:
    """(filename, label) rows of a labels CSV; understands Kaggle's LOC_val_solution.csv."""
    if labels_path.suffix.lower() == ".txt":
        raise InputError(
            f"data.labels {labels_path}: a plain list of numbers such as the ILSVRC2012 devkit's "
            "validation_ground_truth.txt numbers classes in the devkit's own order, not the "
            "standard sorted-wnid order, and names no files; convert it to a CSV of "
            "filename,wnid (or use Kaggle's LOC_val_solution.csv)"
        )
    if not labels_path.is_file():
        raise InputError(f"data.labels {labels_path} does not exist")
    with open(labels_path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"data.labels {labels_path} is empty")
    header = [cell.strip().lower() for cell in rows[0]]
    if header[:2] == ["imageid", "predictionstring"]:  # Kaggle: first token is the wnid
        return [(row[0].strip(), row[1].split()[0]) for row in rows[1:]]
    if len(rows[0]) < 2:
        raise InputError(f"data.labels {labels_path}: expected two columns, filename,label")
    first_label = rows[0][1].strip()
    if not (WNID.match(first_label) or first_label.lstrip("-").isdigit()):
        rows = rows[1:]  # a header row
    return [(row[0].strip(), row[1].strip()) for row in rows]


def labelled_folder(root: Path, labels_path: Path, state: StateRecorder | None = None) -> Enumeration:
    """A flat folder plus a labels CSV. The CSV defines the items: a listed file that is
    missing becomes an error row at run time rather than vanishing. (Held in memory: a labels
    file is ImageNet-val sized; collections without labels stream.)"""
    rows = _read_label_rows(labels_path)
    notes = ["labels from " + labels_path.name]
    on_disk = list(walk_images(root, state, notes))
    if state is not None:
        state.content(os.path.realpath(labels_path))
    on_disk_set = set(on_disk)
    by_stem: dict[str, str] = {}
    for rel in on_disk:
        by_stem.setdefault(os.path.splitext(rel)[0], rel)
    listed: list[tuple[str, int | None, None]] = []
    for line_number, (name, label) in enumerate(rows, start=1):
        where = f"data.labels {labels_path}, row {line_number}"
        rel = name if name in on_disk_set or os.path.splitext(name)[1] else by_stem.get(name, name)
        try:
            listed.append((rel, parse_imagenet_label(label, where), None))
        except ValueError as error:
            raise InputError(str(error)) from None
    names = {rel for rel, _, _ in listed}
    if len(names) != len(listed):
        raise InputError(f"data.labels {labels_path}: {len(listed) - len(names)} file(s) are listed twice")
    unlisted = len(on_disk_set - names)
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
    from .tars import IMAGE_SUFFIXES, ShardSpecError, expand_shards, shard_root

    root = shard_root(cfg.path)
    try:
        tars = expand_shards(cfg.path)
    except ShardSpecError as error:
        raise InputError(str(error)) from None
    shards, parts = [], []
    for tar in tars:
        rel = Path(os.path.relpath(tar, root)).as_posix()  # a symlinked tar keeps its own name
        shards.append({"path": rel})
        parts.append(f"{rel}\t{os.stat(tar).st_size}")
    suffixes = [s.lower().lstrip(".") for s in (cfg.image_suffixes or IMAGE_SUFFIXES)]
    notes = [f"{len(tars)} WebDataset tar(s)",
             f"labels from the .json field {cfg.label_key!r}" if cfg.label_key else
             "labels from .cls members where present (ImageNet-1k indices)"]
    return Enumeration("webdataset", str(root), None, notes, shards=shards,
                       reader={"image_suffixes": suffixes, "label_key": cfg.label_key},
                       fingerprint_parts=parts)


def _parquet_files(cfg: DataConfig) -> tuple[Path, list[Path]]:
    path = Path(cfg.path)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(Path(p) for p in glob.glob(str(path / "**" / "*.parquet"), recursive=True))
        if not files:
            raise InputError(f"data.path {path}: no .parquet files in it (data.kind: parquet)")
        return path, files
    files = sorted(Path(p) for p in glob.glob(cfg.path, recursive=True))
    if not files:
        raise InputError(f"data.path {cfg.path}: no file matches (data.kind: parquet)")
    return Path(os.path.commonpath([str(p.parent) for p in files])), files


def parquet(cfg: DataConfig) -> Enumeration:
    """Parquet files with an image column ({bytes, path} struct, bytes, or path strings):
    units are runs of row groups, read by the rank that runs them; only footers are read here."""
    import datasets
    import pyarrow.parquet as pq

    def footer(file: Path):
        try:
            return pq.read_metadata(file)
        except Exception as error:
            raise InputError(f"data.path: {file} is not a readable Parquet file ({error})") from None

    root, files = _parquet_files(cfg)
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
        rel = file.relative_to(root).as_posix()
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        shards.append({"path": rel, "row_groups": groups})
        parts.append(f"{rel}\t{metadata.num_rows}\t{file.stat().st_size}")
    reader = {"image_column": image_column, "id_column": cfg.id_column, "label": None}
    classes, notes = None, [f"{len(files)} Parquet file(s), image column {image_column!r}"]
    if label_column is not None:
        reader["label"], classes, note = label_map(features[label_column], label_column)
        notes.append(note)
    return Enumeration("parquet", str(root), classes, notes, shards=shards, reader=reader,
                       fingerprint_parts=parts)


HF_MARKERS = {"dataset_info.json", "dataset_dict.json", "state.json"}


def hf_load(cfg: DataConfig):
    """The Hugging Face dataset (one split), memory-mapped, its image column left encoded."""
    import datasets

    path = Path(cfg.path)
    try:
        if path.is_dir() and any((path / marker).exists() for marker in HF_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file() and path.suffix == ".parquet":  # data.kind: hf asked for explicitly
            loaded = datasets.load_dataset("parquet", data_files=str(path))
        else:
            loaded = datasets.load_dataset(cfg.path, split=cfg.split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"data.path {cfg.path!r}: not a local path, and datasets could not load "
                         f"it as a dataset ({first})") from None
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
            if _tar_name(cfg.path):
                return "webdataset"
            if cfg.path.lower().endswith(".parquet"):
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
    hf = parquet_files = tars = False
    only_folders, first_folder = True, None
    with os.scandir(path) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith("."):
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
