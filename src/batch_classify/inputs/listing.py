"""The listing: the input cut into units, written once to ``<output.dir>/input/``.

``units.parquet`` has one row per unit (a range of listed files, a tar, a run of Parquet row
groups, a range of dataset rows); ``listing.parquet`` holds the listed files, for folders
and path lists; ``listing.json`` says what was listed and is written last, so its presence
means the listing is complete. Only the main rank lists; every rank reads the units table
(bounded by the number of units) and the records of the unit in hand, nothing else. What
differs between kinds is behind the kind's interface (``base.InputKind``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from batch_classify.core.config import DataConfig
from batch_classify.core.layout import INFO_FILE, INPUT_DIR, STATE_FILE, UNITS_FILE
from batch_classify.core.limits import Limits
from batch_classify.core.ownership import remove_listing
from batch_classify.core.secrets import (
    live_options,
    redact,
    redact_config,
    redact_text,
    redact_url,
    restore_url,
    signed_query,
)
from batch_classify.core.storage import is_url
from batch_classify.inputs.base import InputError, InputKind, Record, Sizing
from batch_classify.inputs.registry import kind_named, resolve
from batch_classify.inputs.state import Change, StateRecorder, check_state
from batch_classify.inputs.tars import is_pattern

log = logging.getLogger(__name__)

LISTING_FORMAT = 2

UNITS_SCHEMA = pa.schema([("unit", pa.int64()), ("path", pa.string()), ("start", pa.int64()),
                          ("stop", pa.int64()), ("offset", pa.int64()), ("n_items", pa.int64())])
LISTING_KEYS = ("path", "kind", "labels", "split", "image_column", "label_column", "id_column",
                "label_key", "image_suffixes")
"""The data.* keys that change what is listed (class_subset and real_labels only score)."""

def local_path(path: str) -> str:
    """A local path (or glob or brace pattern) absolute, with symlinks resolved; a dataset name
    as it is."""

    if is_url(path):
        return path
    if os.path.exists(path) or is_pattern(path) or path.startswith((".", "~")):
        return os.path.realpath(os.path.expanduser(path))
    return path


def listing_data(cfg: DataConfig) -> dict[str, Any]:
    """The data.* keys that define the listing, with local paths absolute and resolved, as they
    are saved: a URL's credentials redacted (a rerun with another password lists the same)."""
    values = {key: getattr(cfg, key) for key in LISTING_KEYS}
    values["path"] = local_path(cfg.path)
    if cfg.labels:
        values["labels"] = os.path.realpath(cfg.labels)
    return redact_config(values)

class Listing:
    """A written listing: its summary, its units, and each unit's records on demand (read by
    the input kind's reader)."""

    limits = Limits()
    """What one tar member, image cell or row group may cost (the job sets runtime's)."""

    def __init__(self, folder: Path, info: dict[str, Any], units: pa.Table,
                 storage_options: dict[str, Any] | None = None, root: str | None = None):
        self.folder = folder
        self.info = info
        self.storage_options = storage_options
        """The real data.storage_options (from the config, in memory; listing.json holds them
        redacted): what every read of the input opens its store with."""
        self.live_root = root or info["root"]
        self.units = {name: units.column(name).to_numpy(zero_copy_only=False)
                      for name in ("start", "stop", "offset", "n_items")}
        self.unit_paths = units.column("path").to_pylist()
        self.reader: InputKind = kind_named(info["kind"])(self)

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def root(self) -> str:
        """Where ids are relative to (a URL as given, credentials included: never shown as it is)."""
        return self.live_root

    @property
    def n_units(self) -> int:
        return self.info["n_units"]

    @property
    def n_items(self) -> int | None:
        return self.info["n_items"]

    @property
    def classes(self) -> tuple[str, ...] | None:
        return None if self.info["classes"] is None else tuple(self.info["classes"])

    @property
    def labelled(self) -> bool | None:
        """Whether any item has a label; None while unknown (tars are only read when run)."""
        n = self.info["n_labelled"]
        if n is None:
            return None
        return n > 0

    @property
    def faults(self) -> tuple[type[BaseException], ...]:
        """What reading a unit raises where the input cannot be read at all."""
        return self.reader.faults

    def unit_items(self, unit: int) -> int | None:
        value = self.units["n_items"][unit]
        return None if value is None or value != value else int(value)

    def describe_unit(self, unit: int) -> str:
        return self.reader.describe_unit(unit)

    def records(self, unit: int, read_images: bool = True) -> Iterator[Record]:
        """The unit's items in their fixed order (``read_images=False``: ids, labels and input
        errors only, for recounting)."""
        if not 0 <= unit < self.n_units:
            raise IndexError(f"unit {unit} is outside 0..{self.n_units - 1}")
        return self.reader.records(unit, read_images)

    def find(self, unit: int, item_id: str) -> Record | None:
        """The record of one id (for the report's pictures): a scan of its unit."""
        return self.reader.find(unit, item_id)


# ---------------------------------------------------------------- writing


def write_listing(cfg: DataConfig, output: Path, unit_size: int = 0, batch_size: int = 1) -> Listing:
    """List the input (main rank only) into ``output/input``; return the listing. Units hold
    ``unit_size`` items, else an automatic size in whole batches of ``batch_size``.

    The listing is written beside the folder's old one and takes its place once complete: an
    input that cannot be listed (a mistake, a file gone) leaves the old listing as it was."""
    final = Path(output) / INPUT_DIR
    remove_listing(final, dry_run=True)  # refused now, not after a long listing
    building = Path(output) / f".{INPUT_DIR}.tmp"
    remove_listing(building)  # a listing interrupted before it was complete
    building.mkdir(parents=True)
    try:
        info, table, root = _list_into(cfg, building, Sizing(unit_size, batch_size))
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    remove_listing(final)
    os.replace(building, final)
    return Listing(final, info, table, cfg.storage_options, root)

def _list_into(cfg: DataConfig, folder: Path, sizing: Sizing) -> tuple[dict[str, Any], pa.Table, str]:
    """Enumerate the input into ``folder``: rows, units, state, then the info file. Returns the
    info, the units and the root as listed (the info holds it redacted)."""
    if signed_query(cfg.path):
        raise InputError(f"data.path {redact_url(cfg.path)}: its query carries credentials (a signed URL "
                         "or a token) that the listing and the rows would save; give the plain URL, and the "
                         "credentials in data.storage_options (e.g. client_kwargs.headers) or the store's "
                         "environment")
    state = StateRecorder()
    kind = resolve(cfg)
    enumeration = kind.enumerate(cfg, state)
    enumeration.path = cfg.path
    if os.path.exists(enumeration.root):  # ids are relative to it, from any working directory
        enumeration.root = os.path.realpath(enumeration.root)
    kind.record_state(enumeration, state)
    cut = kind.cut(enumeration, folder, sizing)
    n_units = len(cut.units["path"])
    if n_units == 0:
        raise InputError(f"data.path {cfg.path}: the input holds no items")
    table = pa.table({"unit": list(range(n_units)), **cut.units}, schema=UNITS_SCHEMA)
    pq.write_table(table, folder / UNITS_FILE)
    state.write(folder / STATE_FILE)
    info = {
        "format": LISTING_FORMAT,
        "kind": kind.name,
        "root": redact_url(enumeration.root),
        "classes": list(enumeration.classes) if enumeration.classes is not None else None,
        "notes": [redact_text(note) for note in enumeration.notes]
        + ([] if cut.n_labelled != 0 else ["no labels: labelling mode"]),
        "n_items": cut.n_items,
        "n_labelled": cut.n_labelled,
        "n_units": n_units,
        "unit_size": cut.unit_size,
        "unit_size_configured": sizing.unit_size,
        "fingerprint": cut.fingerprint,
        "items_digest": cut.items_digest,
        "reader": enumeration.reader,
        "data": listing_data(cfg),
        "storage_options": redact(cfg.storage_options or {}),
    }
    temporary = folder / f".{INFO_FILE}.tmp"
    temporary.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(temporary, folder / INFO_FILE)
    return info, table, enumeration.root


def input_changes(listing: Listing, cfg: DataConfig) -> Change | None:
    """What differs between the input now and the input ``listing`` was made from, or None.

    One stat per folder walked and per file read (and a hash of each labels file); shard
    kinds are also named again (their files' names, sizes and footers, as listing read them),
    so a tar or Parquet file added to or removed from the input is found too."""
    state = listing.folder / STATE_FILE
    if not state.exists():
        return Change([f"{state} is missing: the listing cannot be checked against the input"], 1)
    return check_state(state) or listing.reader.changes(cfg)


def read_listing(output: str | Path, storage_options: dict[str, Any] | None = None,
                 data_path: str | None = None) -> Listing | None:
    """The complete listing in an output folder, or None. Its input is read with
    ``storage_options``, the real data.storage_options (listing.json holds them redacted; default:
    those this process was given for the input's store, else none) and, where the listed root
    had credentials in its URL, those of ``data_path`` (data.path as configured)."""
    folder = Path(output) / INPUT_DIR
    if not (folder / INFO_FILE).exists():
        return None
    info = json.loads((folder / INFO_FILE).read_text())
    root = restore_url(info["root"], data_path) if data_path else info["root"]
    if storage_options is None:
        storage_options = live_options(root)
    return Listing(folder, info, pq.read_table(folder / UNITS_FILE, schema=UNITS_SCHEMA), storage_options,
                   root)


def share_listing(source_output: str | Path, target_output: str | Path) -> None:
    """Put the listing of ``source_output`` into ``target_output`` too (hard links where the
    filesystem allows, else copies; the info file last, so a reader sees all of it or none)."""
    source, target = Path(source_output) / INPUT_DIR, Path(target_output) / INPUT_DIR
    if (target / INFO_FILE).exists() and (target / INFO_FILE).read_text() == (source / INFO_FILE).read_text():
        return
    remove_listing(target)
    target.mkdir(parents=True)
    for name in (*(p.name for p in source.iterdir() if p.name != INFO_FILE), INFO_FILE):
        try:
            os.link(source / name, target / name)
        except OSError:
            shutil.copy2(source / name, target / name)


def matches(listing: Listing, cfg: DataConfig, unit_size: int) -> bool:
    """Whether ``listing`` is what ``cfg`` and ``output.unit_size`` would list."""
    return (listing.info.get("format") == LISTING_FORMAT and listing.info["data"] == listing_data(cfg)
            and (unit_size == 0 or listing.info["unit_size_configured"] == unit_size))

def item_sources(output_dir: str | Path, manifest: dict[str, Any]) -> Callable[[int, str], str | BinaryIO]:
    """(unit, id) -> the path or bytes of that item's image (for the report's pictures: each
    lookup scans one unit of the folder's listing). Raises where the input as a whole is gone.
    A folder without its listing (written by hand) names files by id where its kind does, else
    its input is listed again, whole."""
    listing = read_listing(output_dir)
    if listing is not None:
        listing.reader.check_reachable()

        def source(unit: int, item_id: str) -> str | BinaryIO:
            record = listing.find(unit, item_id)
            if record is None or record.payload is None:
                raise KeyError(f"{item_id!r} is not in unit {unit} of the input any more")
            return record.source()

        return source
    data = dict(manifest.get("config", {}).get("data", {}))
    data["storage_options"] = live_options(data.get("path", "")) if data.get("storage_options") else None
    kind = kind_named(manifest["dataset"].get("kind"))
    folder = kind.named_by_id(Path(data.get("path", manifest["dataset"]["path"])))
    if folder is not None:
        return lambda unit, item_id: str(folder / item_id)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    items = load_items(DataConfig(**{k: v for k, v in data.items() if k in known}))
    position = {item_id: i for i, item_id in enumerate(items.ids)}
    return lambda unit, item_id: items.open(position[item_id])


@dataclass
class Items:
    """A small input held in memory, in listing order (bench and tests; jobs read units)."""

    kind: str
    root: str
    ids: list[str]
    labels: list[int | None]
    payloads: list[str | bytes | None]
    classes: tuple[str, ...] | None
    notes: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        return any(label is not None for label in self.labels)

    @functools.cached_property
    def paths(self) -> list[str] | None:
        """Every item's file path, or None where some come as bytes (tars, Parquet, datasets)."""
        return self.payloads if all(isinstance(p, str) for p in self.payloads) else None

    def open(self, index: int) -> str | BinaryIO:
        payload = self.payloads[index]
        return io.BytesIO(payload) if isinstance(payload, bytes) else payload


def load_items(cfg: DataConfig, limit: int | None = None) -> Items:
    """The first ``limit`` items (all by default) of a small input, listed in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="batch-classify-items-") as folder:
        listing = write_listing(cfg, Path(folder))
        ids, labels, payloads = [], [], []
        for unit in range(listing.n_units):
            for record in listing.records(unit):
                if record.error is None:
                    ids.append(record.id)
                    labels.append(record.label)
                    payloads.append(record.payload)
                if limit is not None and len(ids) >= limit:
                    break
            if limit is not None and len(ids) >= limit:
                break
        return Items(listing.kind, listing.root, ids, labels, payloads, listing.classes,
                     listing.info["notes"])
