"""The interface every input kind implements, and the small types the kinds share.

An input kind is one class in one file of this package (``folders.py``, ``file_list.py``,
``webdataset.py``, ``parquet.py``, ``hf.py``), named once in ``registry.py``. It works in two
phases, as Ray Data's datasources and timm's readers do: on the main rank its class methods
find the input (``detect``), enumerate it (``enumerate``) and cut it into units (``cut``); on
every rank an instance bound to the written listing reads one unit's records (``records``).
The listing, the loader, the report and verify call these methods and never ask which kind
they hold.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

import pyarrow as pa

from batch_classify.core.config import DataConfig
from batch_classify.core.digests import add_digests, id_hash, sequence_digest
from batch_classify.core.errors import UserError
from batch_classify.core.layout import STATE_FILE
from batch_classify.core.limits import file_kind
from batch_classify.core.secrets import redact_url
from batch_classify.core.storage import ObjectInfo, Store, is_url, join, store_for
from batch_classify.inputs.state import Change, StateRecorder, compare_objects, listed_objects

if TYPE_CHECKING:
    from batch_classify.inputs.listing import Listing

IMAGE_EXTENSIONS = frozenset(
    [".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm"]
)


CHUNK_ROWS = 65_536
"""Rows a file listing holds in memory before they go to disk."""

MAX_AUTO_UNIT = 10_000
"""Items per unit at most, by default: 1e9 images make ~1e5 unit files."""


TARGET_UNITS = 1024
"""Larger inputs are cut into about this many units, so hundreds of ranks all get work..."""


MIN_AUTO_UNIT = 512
"""...of at least this many items (batches end at unit ends), or 1/64 of a smaller input."""


def auto_unit_size(n_items: int, batch_size: int = 1) -> int:
    """Items per unit where ``output.unit_size`` is 0, rounded up to whole batches: batches
    end at unit ends, so a unit of 4 items under a batch size of 16 would run the model on
    batches of 4 (a third slower per image for Lite0 on the CPU)."""
    smallest = min(MIN_AUTO_UNIT, math.ceil(n_items / 64))
    size = max(1, min(MAX_AUTO_UNIT, max(smallest, math.ceil(n_items / TARGET_UNITS))))
    return -(-size // batch_size) * batch_size

class InputError(UserError, ValueError):
    """The input cannot be read as configured; the message says what and how to fix it."""


@dataclass
class FileRows:
    """A chunk of a file listing: ids, labels and (where they differ from root/id) paths."""

    ids: list[str]
    labels: list[int | None]
    paths: list[str | None]
    pins: list[ObjectInfo | None] = field(default_factory=list)
    """Objects in a store: each one's identity as listed (None for local files)."""


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
    path: str = ""
    """data.path as configured (for messages)."""

@dataclass
class Record:
    """One item of a unit, as the rank enumerates it."""

    id: str
    label: int | None
    payload: str | bytes | None
    """A path to read, or the encoded image's bytes."""
    error: str | None = None
    """Set where the input itself is broken (a truncated tar, a bad label): an error row."""
    pin: ObjectInfo | None = None
    """The listed version of the object ``payload`` names (an image in a store)."""

    def source(self) -> str | BinaryIO:
        return io.BytesIO(self.payload) if isinstance(self.payload, bytes) else self.payload

def checked_last(records: Iterator[Record], check: Callable[[], None]) -> Iterator[Record]:
    """``records``, the last held back until ``check()`` passed: a unit whose source turns out
    changed when it has been read raises before its last record, so it is never committed."""
    previous = None
    for record in records:
        if previous is not None:
            yield previous
        previous = record
    check()
    if previous is not None:
        yield previous


def error_rows(ids: list[str], error: str) -> Iterator[Record]:
    """One error row per id: items a broken input still accounts for."""
    for item_id in ids:
        yield Record(item_id, None, None, error)


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def chunked(rows: Iterator[tuple]) -> Iterator[FileRows]:
    """Rows of (id, label, path) or, for objects in a store, (id, label, path, identity) in chunks."""
    chunk = FileRows([], [], [])
    for item_id, label, path, *pin in rows:
        chunk.ids.append(item_id)
        chunk.labels.append(label)
        chunk.paths.append(path)
        chunk.pins.append(pin[0] if pin else None)
        if len(chunk.ids) >= CHUNK_ROWS:
            yield chunk
            chunk = FileRows([], [], [])
    if chunk.ids:
        yield chunk


def line_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class Repeats:
    """Whether a key was seen before, from a set of 64-bit hashes of the first
    Repeats.LIMIT keys (then the set is dropped: memory stays bounded). A hit is only
    a candidate: the caller confirms it by a second pass, which also finds where it was first.
    The hashes are Python's own (SipHash, seeded per process): the set lives in one process."""

    LIMIT = 2_000_000
    """Keys checked at most (a set of 64-bit hashes, ~150 MB on the main rank while it lists);
    beyond, verify finds an id twice within a unit."""

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
        if len(self.hashes) >= Repeats.LIMIT:
            self.hashes = None
        return found


def regular_file(path: Path) -> os.stat_result:
    """The stat of a shard file; a FIFO, socket or device named like one is an InputError."""
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise InputError(f"data.path: {path} is a {file_kind(status.st_mode)}, not a regular file; "
                         "replace it with the file, or move it out of the input")
    return status

@dataclass
class Sizing:
    """How big units are: ``output.unit_size`` items, or (0) an automatic size in whole batches."""

    unit_size: int = 0
    batch_size: int = 1

    def size(self, n_items: int) -> int:
        return self.unit_size or auto_unit_size(n_items, self.batch_size)


@dataclass
class Cut:
    """An input cut into units: the columns of ``units.parquet`` and what the listing records."""

    units: dict[str, list]
    """path, start, stop, offset, n_items: one entry per unit (None where unknown until read)."""
    n_items: int | None
    n_labelled: int | None
    unit_size: int | None
    items_digest: str
    """Order-independent digest of the items (with their labels where listed)."""
    fingerprint: str
    """Digest of the sequence of items or shards, order included."""


@dataclass
class Found:
    """What ``data.path`` is, looked at once for every kind's ``detect``: whether it exists, is a
    file, or is a pattern (and the first name it makes), and what a folder's top level holds."""

    cfg: DataConfig
    path: Path
    exists: bool
    is_file: bool
    first_name: str | None
    """A pattern's first name (``{a,b}.tar`` -> ``a.tar``); None where data.path is not a pattern."""

    @functools.cached_property
    def top(self) -> TopLevel:
        return TopLevel.scan(self.path)


HF_MARKERS = frozenset({"dataset_info.json", "dataset_dict.json", "state.json"})
SPARK_MARKERS = frozenset({"_SUCCESS", "_metadata", "_common_metadata", "_temporary"})
"""What Spark, Hive and Dask write beside the part files of a Parquet folder."""
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


@dataclass
class TopLevel:
    """Flags from one pass over a folder's top level (a flat folder may hold millions of names)."""

    hf_markers: bool = False
    parquet_files: bool = False
    tars: bool = False
    delta_log: bool = False
    only_folders: bool = True
    first_folder: str | None = None
    folder: Path | None = None

    @classmethod
    def scan(cls, folder: Path) -> TopLevel:
        top = cls(folder=folder)
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name == "_delta_log":
                    top.delta_log = True
                if name.startswith(".") or name in SPARK_MARKERS:
                    continue
                top.hf_markers = top.hf_markers or name in HF_MARKERS or name.endswith(".arrow")
                top.parquet_files = top.parquet_files or name.lower().endswith(".parquet")
                top.tars = top.tars or is_tar_name(name)
                if entry.is_dir():
                    top.first_folder = name if top.first_folder is None else min(top.first_folder, name)
                else:
                    top.only_folders = False
        return top

    @functools.cached_property
    def parquet_below(self) -> bool:
        """Parquet one level down (a hub layout's data/): only the first folder is looked into, not
        every class folder of an ImageNet-style tree."""
        if not self.only_folders or self.first_folder is None or self.folder is None:
            return False
        with os.scandir(self.folder / self.first_folder) as entries:
            return any(entry.name.lower().endswith(".parquet") for entry in entries)


class InputKind:
    """One kind of input. Class methods run on the main rank (find, enumerate, cut into units);
    an instance is bound to a written listing and reads its units, on any rank."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ()
    """The data.* keys only this kind reads (set for another kind, they are refused)."""
    folder: ClassVar[bool] = False
    """data.path must be a folder: a file given instead is refused with the kind it looks like."""
    item_by_item: ClassVar[bool] = False
    """Every item is a file of its own, named in the listing: one item can be read again alone
    (runtime.retry_errors redoes single rows), and ids are in the listing before any image is."""
    faults: ClassVar[tuple[type[BaseException], ...]] = (OSError, pa.ArrowException)
    """What reading a unit raises where the input cannot be read at all (gone, no permission, being
    rewritten): the unit fails, and a rerun retries it."""
    urls: ClassVar[bool] = False
    """data.path may be a URL of an object store (core/storage.py): the kind lists and reads
    through the store."""
    handles: ClassVar[tuple[str, ...]] = ()
    """Attributes holding open files or datasets: never pickled (DataLoader workers reopen them)."""

    def __init__(self, listing: Listing) -> None:
        self.listing = listing

    @property
    def remote(self) -> bool:
        """Whether the input is in an object store."""
        return is_url(self.listing.root)

    def store(self) -> Store:
        """The input's store, opened with the real data.storage_options (the listing holds them
        in memory, from the config; never those saved, which are redacted)."""
        return store_for(self.listing.root, self.listing.storage_options)

    def pin(self, url: str) -> ObjectInfo | None:
        """The version of a shard object (a tar, a Parquet file) the listing recorded, which its
        reads are pinned to; None for a listing without one."""
        pins = self.__dict__.get("_pins")
        if pins is None:
            state = self.listing.folder / STATE_FILE
            pins = self.__dict__["_pins"] = dict(listed_objects(state)) if state.exists() else {}
        return pins.get(redact_url(url))  # recorded without credentials (state.StateRecorder.object)

    @classmethod
    def objects_now(cls, cfg: DataConfig) -> Iterator[tuple[str, ObjectInfo]]:
        """(url, identity) of the objects a URL input is listed from, as the store lists them now
        (no object read), in the order the listing recorded them."""
        return iter(())

    def shard_location(self, rel: str) -> str:
        """Where a shard of the listing is: a URL, or a local path."""
        return join(self.listing.root, rel) if self.remote else os.path.join(self.listing.root, rel)

    # ------------------------------------------------------------ main rank

    @classmethod
    def detect(cls, found: Found) -> bool:
        """Whether ``data.kind: auto`` means this kind for what data.path is."""
        return False

    @classmethod
    def enumerate(cls, cfg: DataConfig, state: StateRecorder | None = None) -> Enumeration:
        """What data.* names: rows streamed in chunks, or shards; folders walked and files read
        go to ``state`` (the resume check)."""
        raise NotImplementedError

    @classmethod
    def record_state(cls, enumeration: Enumeration, state: StateRecorder) -> None:
        """Record the files the listing depends on beyond those ``enumerate`` recorded."""

    @classmethod
    def cut(cls, enumeration: Enumeration, folder: Path, sizing: Sizing) -> Cut:
        """Cut the enumeration into units (writing what the kind keeps in ``folder``)."""
        raise NotImplementedError

    # ------------------------------------------------------------ any rank

    def records(self, unit: int, read_images: bool = True) -> Iterator[Record]:
        """The unit's items in their fixed order (``read_images=False``: ids, labels and input
        errors only, for recounting)."""
        raise NotImplementedError

    def describe_unit(self, unit: int) -> str:
        """The unit as a person finds it in the input (a tar, a range of rows)."""
        raise NotImplementedError

    def changes(self, cfg: DataConfig) -> Change | None:
        """What differs from the listing beyond the folders and files its state recorded: for a
        URL input, its objects listed again and compared with those recorded."""
        if self.recorded_objects():
            return compare_objects(self.listing.folder / STATE_FILE, type(self).objects_now(cfg))
        return None

    def recorded_objects(self) -> bool:
        """Whether the listing recorded the objects of a URL input (listings made before it did
        are checked as they were then)."""
        state = self.listing.folder / STATE_FILE
        return self.remote and state.exists() and next(listed_objects(state), None) is not None

    def find(self, unit: int, item_id: str) -> Record | None:
        """The record of one id (for the report's pictures): a scan of its unit."""
        return next((record for record in self.records(unit) if record.id == item_id), None)

    def check_reachable(self) -> None:
        """Raise FileNotFoundError where the input as a whole is gone (the report says so once)."""

    @classmethod
    def named_by_id(cls, data_path: Path) -> Path | None:
        """For an output folder without its listing: the folder its ids are paths in, or None
        where ids name no file (the input is listed again)."""
        return None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, **dict.fromkeys(self.handles)}


class ShardKind(InputKind):
    """Kinds whose units are parts of files (tars, row groups, row ranges): listing reads only
    their names, sizes and footers, so a file added or removed is found by naming them again."""

    @classmethod
    def record_state(cls, enumeration: Enumeration, state: StateRecorder) -> None:
        if is_url(enumeration.root):  # objects: their names, sizes and ETags, in name order
            for url, pin in sorted((join(enumeration.root, shard["path"]), ObjectInfo.parse(*shard["object"]))
                                   for shard in enumeration.shards or ()):
                state.object(url, pin)
            return
        for shard in enumeration.shards or ():
            if shard["path"]:  # a tar or a Parquet file: its size and mtime
                state.file(os.path.join(enumeration.root, shard["path"]))

    @staticmethod
    def digests(parts: list[str]) -> tuple[str, str]:
        """(items digest, fingerprint) of the shards' descriptions."""
        return add_digests(f"{id_hash(part):016x}" for part in parts), sequence_digest(parts)

    def changes(self, cfg: DataConfig) -> Change | None:
        if self.recorded_objects():
            return super().changes(cfg)
        listing = self.listing
        now = type(self).enumerate(cfg)
        if sequence_digest(now.fingerprint_parts) == listing.info["fingerprint"]:
            return None
        before = dict.fromkeys(listing.unit_paths)
        after = dict.fromkeys(shard["path"] for shard in now.shards)
        added = [path for path in after if path not in before]
        removed = [path for path in before if path not in after]
        found = ([f"{len(added)} file(s) added, e.g. {added[0]}"] if added else []) + (
            [f"{len(removed)} file(s) gone, e.g. {removed[0]}"] if removed else [])
        return Change(found or ["its files' sizes, row counts or order differ from the listing's"],
                      max(1, len(found)), missing=bool(removed))


def row_units(n_items: int, unit_size: int) -> dict[str, list]:
    """Consecutive ranges of ``unit_size`` rows."""
    starts = list(range(0, n_items, unit_size))
    stops = [min(s + unit_size, n_items) for s in starts]
    return {"path": [""] * len(starts), "start": starts, "stop": stops, "offset": starts,
            "n_items": [b - a for a, b in zip(starts, stops)]}
