"""Folders of images: one subfolder per class (``imagefolder``), or any tree of images, with
an optional labels CSV (``images``). Listed by one sorted ``os.scandir`` walk."""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from batch_classify.core.config import DataConfig
from batch_classify.core.labels import WNID, parse_imagenet_label, wnid_to_index
from batch_classify.core.storage import ObjectInfo, is_url, join
from batch_classify.inputs.base import Enumeration, Found, InputError, Repeats, chunked, is_image, line_hash
from batch_classify.inputs.file_list import Spellings, open_text, utf8_lines
from batch_classify.inputs.listed import ListedKind
from batch_classify.inputs.objects import object_images
from batch_classify.inputs.state import StateRecorder

log = logging.getLogger(__name__)


class ImageFolder(ListedKind):
    """One subfolder per class: wnid folders map to ImageNet-1k, other names to sorted order."""

    name = "imagefolder"
    urls = True

    @classmethod
    def detect(cls, found: Found) -> bool:
        return (found.exists and not found.is_file and found.cfg.labels is None and found.top.only_folders
                and found.top.first_folder is not None)

    @classmethod
    def enumerate(cls, cfg: DataConfig, state: StateRecorder | None = None) -> Enumeration:
        if is_url(cfg.path):
            root, names = listed_images(cfg, state)
            return image_folder(root, names=names)
        return image_folder(Path(cfg.path), state)

    @classmethod
    def objects_now(cls, cfg: DataConfig) -> Iterator[tuple[str, ObjectInfo]]:
        root, names = object_images(cfg)
        return ((join(root, rel), pin) for rel, pin in names)


class FlatFolder(ListedKind):
    """Images anywhere under a folder; labelled by a CSV of filename,label (``data.labels``)."""

    name = "images"
    urls = True

    @classmethod
    def detect(cls, found: Found) -> bool:
        return found.exists and not found.is_file

    @classmethod
    def enumerate(cls, cfg: DataConfig, state: StateRecorder | None = None) -> Enumeration:
        if is_url(cfg.path):
            if cfg.labels:
                raise InputError(f"data.labels with data.path {cfg.path}: a labels CSV is read for local "
                                 "folders only; name the images in class prefixes (data.kind imagefolder)")
            root, names = listed_images(cfg, state)
            return Enumeration("images", root, notes=[f"{len(names)} image object(s) under {root}"],
                               rows=chunked((rel, None, None, pin) for rel, pin in names))
        path = Path(cfg.path)
        if not path.is_dir():
            raise InputError(f"data.path {path} is not a folder (data.kind: images)")
        return labelled_folder(path, Path(cfg.labels), state) if cfg.labels else image_files(path, state)

    @classmethod
    def objects_now(cls, cfg: DataConfig) -> Iterator[tuple[str, ObjectInfo]]:
        root, names = object_images(cfg)
        return ((join(root, rel), pin) for rel, pin in names)


def listed_images(cfg: DataConfig, state: StateRecorder | None) -> tuple[str, list[tuple[str, ObjectInfo]]]:
    """The image objects under data.path (object_images), each recorded in ``state`` for the
    resume check."""
    root, names = object_images(cfg)
    if state is not None:
        for rel, pin in names:
            state.object(join(root, rel), pin)
    return root, names


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
                if is_dir or is_image(entry.name):
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
            return is_image(parts[-1]) and not any(part.startswith(".") for part in parts)
        if outside is None:
            return False
        digest = line_hash(target)
        if digest in outside:
            return True
        outside.add(digest)
        if len(outside) > Repeats.LIMIT:
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


def image_folder(root: Path | str, state: StateRecorder | None = None,
                 names: list[tuple[str, ObjectInfo]] | None = None) -> Enumeration:
    """One subfolder per class: wnid folders map to ImageNet-1k, other names to sorted order.
    ``names``: the images of a prefix in a store with their identities, listed already (its
    classes are the first parts of their names)."""
    if names is not None:
        class_dirs = sorted({name.split("/", 1)[0] for name, _ in names if "/" in name})
        odd = next((name for name, _ in names
                    if name.split("/", 1)[0] in ("", ".", "..") and "/" in name), None)
        if odd is not None:  # a key no local folder could hold: which class is it?
            raise InputError(f"data.path {root}: the object {root}/{odd} lies in no class prefix (its "
                             f"first part is {odd.split('/', 1)[0]!r}); rename it, or use data.kind: images")
    else:
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

    def rows() -> Iterator[tuple]:
        listed = names if names is not None else ((rel, None) for rel in walk_images(root, state, notes))
        for rel, pin in listed:
            if "/" not in rel:
                raise InputError(f"data.path {root}: image(s) such as {rel!r} lie outside the class "
                                 "subfolders; use data.kind: images for unlabelled folders")
            label = position[rel.split("/", 1)[0]]
            yield (rel, label, None) if pin is None else (rel, label, None, pin)

    return Enumeration("imagefolder", str(root), classes, notes, rows=chunked(rows()))


def image_files(root: Path, state: StateRecorder | None = None) -> Enumeration:
    """Unlabelled images: a folder searched recursively."""
    notes: list[str] = []
    return Enumeration("images", str(root), notes=notes,
                       rows=chunked((rel, None, None) for rel in walk_images(root, state, notes)))


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
    with open_text(labels_path, "data.labels", "a CSV file of filename,label") as handle:
        reader = csv.reader(utf8_lines(handle, labels_path, "data.labels", "CSV"))
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
              and not first_label.lstrip("-").isdigit() and not is_image(first_name))
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
    spellings = Spellings(root)
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
    return Enumeration("images", str(root), notes=notes, rows=chunked(iter(listed)))
