"""Inputs: turn ``data.*`` into one fixed, ordered list of items with stable ids and labels."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .config import DataConfig
from .labels import WNID, parse_imagenet_label, wnid_to_index

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    [".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm"]
)


class InputError(ValueError):
    """The input cannot be read as configured; the message says what and how to fix it."""


@dataclass
class Items:
    """The job's items in their fixed order. Picklable, so DataLoader workers can read them."""

    kind: str
    root: str
    ids: list[str]
    labels: list[int | None]
    classes: tuple[str, ...] | None = None
    """Names of the dataset's classes; None when labels are ImageNet-1k indices."""
    paths: list[str] | None = None
    dataset: Any = None
    image_column: str | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        return any(label is not None for label in self.labels)

    def open(self, index: int) -> BinaryIO | str:
        """A path or a binary stream holding item ``index``'s encoded image."""
        if self.paths is not None:
            return self.paths[index]
        value = self.dataset[index][self.image_column]
        if isinstance(value, dict):
            if value.get("bytes"):
                return io.BytesIO(value["bytes"])
            if value.get("path"):
                return value["path"]
            raise ValueError("dataset row has neither image bytes nor a path")
        if isinstance(value, (bytes, bytearray)):
            return io.BytesIO(value)
        if isinstance(value, str):
            return value
        raise TypeError(f"image column {self.image_column!r} holds {type(value).__name__}")

    def save(self, path: Path) -> None:
        """Write a file-based listing for the other ranks (atomically), so only one rank lists."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.paths is None:
            raise ValueError("only file listings are shared through a file")
        table = pa.table({"id": self.ids, "label": pa.array(self.labels, pa.int64()),
                          "path": self.paths})
        meta = {"kind": self.kind, "root": self.root, "notes": self.notes,
                "classes": list(self.classes) if self.classes is not None else None}
        table = table.replace_schema_metadata({"items": json.dumps(meta)})
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(table, temporary)
        os.replace(temporary, path)

    @classmethod
    def load_saved(cls, path: Path) -> Items:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"items"])
        classes = tuple(meta["classes"]) if meta["classes"] is not None else None
        return cls(kind=meta["kind"], root=meta["root"], ids=table.column("id").to_pylist(),
                   labels=table.column("label").to_pylist(), classes=classes,
                   paths=table.column("path").to_pylist(), notes=meta["notes"])

    def fingerprint(self) -> str:
        """A hash of the ordered ids and labels: equal for the same dataset listing."""
        digest = hashlib.sha256()
        for item_id, label in zip(self.ids, self.labels):
            digest.update(f"{item_id}\t{label}\n".encode())
        return digest.hexdigest()


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _walk_images(root: Path) -> list[str]:
    """Image files under root, relative, in sorted order (os.scandir: one stat-free pass)."""
    found: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                child = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=True):
                    stack.append(child)
                elif _is_image(entry.name):
                    found.append(child)
    return sorted(found)


def _file_items(kind: str, root: Path, rel_paths: list[str], labels: list[int | None],
                classes: tuple[str, ...] | None, notes: list[str] | None = None) -> Items:
    return Items(
        kind=kind,
        root=str(root),
        ids=rel_paths,
        labels=labels,
        classes=classes,
        paths=[str(root / p) for p in rel_paths],
        notes=notes or [],
    )


def image_folder(root: Path) -> Items:
    """One subfolder per class: wnid folders map to ImageNet-1k, other names to sorted order."""
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise InputError(f"data.path {root} has no class subfolders (data.kind: imagefolder)")
    rel_paths = _walk_images(root)
    if not rel_paths:
        raise InputError(f"data.path {root}: no image files found in its class subfolders")
    stray = [p for p in rel_paths if "/" not in p]
    if stray:
        raise InputError(
            f"data.path {root}: {len(stray)} image(s) such as {stray[0]!r} lie outside the class "
            "subfolders; use data.kind: images for unlabelled folders"
        )
    if all(WNID.match(name) for name in class_dirs):
        index = wnid_to_index()
        unknown = [name for name in class_dirs if name not in index]
        if unknown:
            raise InputError(
                f"data.path {root}: folder {unknown[0]!r} looks like a wnid but is not an "
                "ImageNet-1k class"
            )
        labels: list[int | None] = [index[p.split("/", 1)[0]] for p in rel_paths]
        return _file_items("imagefolder", root, rel_paths, labels, None,
                           ["wnid folders mapped to the ImageNet-1k index"])
    position = {name: i for i, name in enumerate(class_dirs)}
    labels = [position[p.split("/", 1)[0]] for p in rel_paths]
    return _file_items("imagefolder", root, rel_paths, labels, tuple(class_dirs),
                       ["class folders mapped in sorted order"])


def image_files(root: Path) -> Items:
    """Unlabelled images: a folder searched recursively."""
    rel_paths = _walk_images(root)
    if not rel_paths:
        raise InputError(f"data.path {root}: no image files found (extensions: "
                         f"{' '.join(sorted(IMAGE_EXTENSIONS))})")
    return _file_items("images", root, rel_paths, [None] * len(rel_paths), None)


def file_list(list_path: Path) -> Items:
    """Unlabelled images named one per line in a text file (relative to the file's folder)."""
    root = list_path.parent
    rel_paths = []
    for line in list_path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rel_paths.append(line)
    if not rel_paths:
        raise InputError(f"data.path {list_path}: the file list names no images")
    duplicated = len(rel_paths) - len(set(rel_paths))
    if duplicated:
        raise InputError(f"data.path {list_path}: {duplicated} path(s) are listed twice")
    items = _file_items("file_list", root, rel_paths, [None] * len(rel_paths), None)
    items.paths = [p if os.path.isabs(p) else str(root / p) for p in rel_paths]
    return items


def _read_label_rows(labels_path: Path) -> list[tuple[str, str]]:
    """(filename, label) rows of a labels CSV; understands Kaggle's LOC_val_solution.csv."""
    if labels_path.suffix.lower() == ".txt":
        raise InputError(
            f"data.labels {labels_path}: a plain list of numbers such as the ILSVRC2012 devkit's "
            "validation_ground_truth.txt numbers classes in the devkit's own order, not the "
            "standard sorted-wnid order, and names no files; convert it to a CSV of "
            "filename,wnid (or use Kaggle's LOC_val_solution.csv)"
        )
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


def labelled_folder(root: Path, labels_path: Path) -> Items:
    """A flat folder plus a labels CSV. The CSV defines the items: a listed file that is
    missing becomes an error row at run time rather than vanishing."""
    rows = _read_label_rows(labels_path)
    on_disk = _walk_images(root)
    on_disk_set = set(on_disk)
    by_stem: dict[str, str] = {}
    for rel in on_disk:
        by_stem.setdefault(os.path.splitext(rel)[0], rel)
    rel_paths: list[str] = []
    labels: list[int | None] = []
    for line_number, (name, label) in enumerate(rows, start=1):
        where = f"data.labels {labels_path}, row {line_number}"
        rel = name if name in on_disk_set or os.path.splitext(name)[1] else by_stem.get(name, name)
        rel_paths.append(rel)
        labels.append(parse_imagenet_label(label, where))
    duplicated = len(rel_paths) - len(set(rel_paths))
    if duplicated:
        raise InputError(f"data.labels {labels_path}: {duplicated} file(s) are listed twice")
    notes = ["labels from " + labels_path.name]
    unlisted = len(on_disk_set - set(rel_paths))
    if unlisted:
        note = f"{unlisted} image file(s) in {root} are not in the labels file and are skipped"
        log.warning(note)
        notes.append(note)
    return _file_items("images", root, rel_paths, labels, None, notes)


def _hf_load(cfg: DataConfig):
    import datasets

    path = Path(cfg.path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                          or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file() and path.suffix == ".parquet":
        loaded = datasets.load_dataset("parquet", data_files=str(path))
    elif path.is_dir() and list(path.glob("**/*.parquet")) and not (path / "README.md").exists():
        files = sorted(str(p) for p in path.glob("**/*.parquet"))
        loaded = datasets.load_dataset("parquet", data_files=files)
    else:
        loaded = datasets.load_dataset(cfg.path, split=cfg.split)
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if cfg.split is not None:
            if cfg.split not in loaded:
                raise InputError(f"data.split {cfg.split!r} not in the dataset's splits {splits}")
            return loaded[cfg.split]
        if len(splits) == 1:
            return loaded[splits[0]]
        if "validation" in loaded:
            return loaded["validation"]
        raise InputError(f"data.split: the dataset has splits {splits}; choose one")
    return loaded


def hf_dataset(cfg: DataConfig) -> Items:
    """A Hugging Face dataset with an image column (bytes or path) and an optional label column."""
    import datasets

    dataset = _hf_load(cfg)
    features = dataset.features
    image_column = cfg.image_column
    if image_column is None:
        typed = [name for name, f in features.items() if isinstance(f, datasets.Image)]
        image_column = typed[0] if len(typed) == 1 else "image"
    if image_column not in features:
        raise InputError(
            f"data.image_column {image_column!r} is not a column of the dataset "
            f"(columns: {list(features)})"
        )
    if isinstance(features[image_column], datasets.Image):
        # Keep the bytes encoded here: the DataLoader workers decode them.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))

    label_column = cfg.label_column
    if label_column is None and "label" in features:
        label_column = "label"
    if label_column is not None and label_column not in features:
        raise InputError(
            f"data.label_column {label_column!r} is not a column of the dataset "
            f"(columns: {list(features)})"
        )
    classes: tuple[str, ...] | None = None
    labels: list[int | None]
    notes = [f"Hugging Face dataset, image column {image_column!r}"]
    if label_column is None:
        labels = [None] * len(dataset)
    else:
        raw = dataset[label_column]
        feature = features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            names = feature.names
            if all(WNID.match(n) for n in names):
                index = wnid_to_index()
                labels = [None if v is None or v < 0 else index[names[v]] for v in raw]
            elif len(names) == 1000:
                labels = [None if v is None or v < 0 else int(v) for v in raw]
                notes.append("1000-class ClassLabel taken as ImageNet-1k order")
            else:
                classes = tuple(names)
                labels = [None if v is None or v < 0 else int(v) for v in raw]
        else:
            where = f"data.label_column {label_column!r}"
            labels = [None if v is None or v == -1 else parse_imagenet_label(str(v), where)
                      for v in raw]
        notes.append(f"labels from column {label_column!r}")

    if cfg.id_column is not None:
        if cfg.id_column not in features:
            raise InputError(f"data.id_column {cfg.id_column!r} is not a column of the dataset")
        ids = [str(v) for v in dataset[cfg.id_column]]
        if len(set(ids)) != len(ids):
            raise InputError(f"data.id_column {cfg.id_column!r} holds duplicate ids")
    else:
        ids = [str(i) for i in range(len(dataset))]
    return Items(kind="hf", root=cfg.path, ids=ids, labels=labels, classes=classes,
                 dataset=dataset, image_column=image_column, notes=notes)


def detect_kind(cfg: DataConfig) -> str:
    """The source kind that ``data.kind: auto`` resolves to."""
    path = Path(cfg.path)
    if not path.exists():
        return "hf"  # a dataset name that datasets.load_dataset resolves
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return "hf"
        if path.suffix.lower() in {".txt", ".lst", ".list"}:
            return "file_list"
        raise InputError(f"data.path {path}: cannot tell what kind of input this file is; "
                         "set data.kind")
    names = [e for e in os.scandir(path) if not e.name.startswith(".")]
    if any(n.name in {"dataset_info.json", "dataset_dict.json", "state.json"} for n in names):
        return "hf"
    if any(n.name.endswith(".arrow") or n.name.endswith(".parquet") for n in names):
        return "hf"
    if cfg.labels is not None:
        return "images"
    if names and all(n.is_dir() for n in names):
        return "imagefolder"
    return "images"


def load_items(cfg: DataConfig) -> Items:
    """Resolve ``data.*`` into the job's ordered items."""
    kind = cfg.kind if cfg.kind != "auto" else detect_kind(cfg)
    path = Path(cfg.path)
    if kind != "hf" and not path.exists():
        raise InputError(f"data.path {path} does not exist")
    if cfg.labels is not None and kind not in {"images"}:
        raise InputError(f"data.labels is for a flat folder of images (data.kind: images), "
                         f"not for data.kind: {kind}")
    if kind == "imagefolder":
        items = image_folder(path)
    elif kind == "images":
        if not path.is_dir():
            raise InputError(f"data.path {path} is not a folder (data.kind: images)")
        items = labelled_folder(path, Path(cfg.labels)) if cfg.labels else image_files(path)
    elif kind == "file_list":
        items = file_list(path)
    else:
        items = hf_dataset(cfg)
    if not items.labelled:
        items.notes.append("no labels: labelling mode")
    return items
