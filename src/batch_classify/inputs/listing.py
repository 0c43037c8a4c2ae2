"""The listing: the input cut into units, written once to ``<output.dir>/input/``.

``units.parquet`` has one row per unit (a range of listed files, a tar, a run of Parquet row
groups, a range of dataset rows); ``listing.parquet`` holds the listed files, for folders
and path lists; ``listing.json`` says what was listed and is written last, so its presence
means the listing is complete. Only the main rank lists; every rank reads the units table
(bounded by the number of units) and the records of the unit in hand, nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
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
from batch_classify.core.digests import add_digests, id_hash, sequence_digest
from batch_classify.core.errors import describe_error
from batch_classify.core.layout import INFO_FILE, INPUT_DIR, ROWS_FILE, STATE_FILE, UNITS_FILE
from batch_classify.core.limits import Limits, NotRegularFile, open_regular
from batch_classify.core.ownership import remove_listing
from batch_classify.inputs.kinds import Enumeration, InputError, enumerate_input, hf_load, map_label
from batch_classify.inputs.state import Change, StateRecorder, check_state

log = logging.getLogger(__name__)

LISTING_FORMAT = 2
"""2: roots absolute and resolved; the input's state recorded in state.parquet."""

MAX_AUTO_UNIT = 10_000
"""Items per unit at most, by default: 1e9 images make ~1e5 unit files."""
TARGET_UNITS = 1024
"""Larger inputs are cut into about this many units, so hundreds of ranks all get work..."""
MIN_AUTO_UNIT = 512
"""...of at least this many items (batches end at unit ends), or 1/64 of a smaller input."""
ROW_GROUP = 8192
"""Rows per row group of listing.parquet: a unit reads at most a few of them."""
HF_SLICE = 256

ROWS_SCHEMA = pa.schema([("id", pa.string()), ("label", pa.int64()), ("path", pa.string())])
UNITS_SCHEMA = pa.schema([("unit", pa.int64()), ("path", pa.string()), ("start", pa.int64()),
                          ("stop", pa.int64()), ("offset", pa.int64()), ("n_items", pa.int64())])
LISTED_KINDS = {"imagefolder", "images", "file_list"}
LISTING_KEYS = ("path", "kind", "labels", "split", "image_column", "label_column", "id_column",
                "label_key", "image_suffixes")
"""The data.* keys that change what is listed (class_subset and real_labels only score)."""


def auto_unit_size(n_items: int, batch_size: int = 1) -> int:
    """Items per unit where ``output.unit_size`` is 0, rounded up to whole batches: batches
    end at unit ends, so a unit of 4 items under a batch size of 16 would run the model on
    batches of 4 (a third slower per image for Lite0 on the CPU)."""
    smallest = min(MIN_AUTO_UNIT, math.ceil(n_items / 64))
    size = max(1, min(MAX_AUTO_UNIT, max(smallest, math.ceil(n_items / TARGET_UNITS))))
    return -(-size // batch_size) * batch_size


@dataclass
class Record:
    """One item of a unit, as the rank enumerates it."""

    id: str
    label: int | None
    payload: str | bytes | None
    """A path to read, or the encoded image's bytes."""
    error: str | None = None
    """Set where the input itself is broken (a truncated tar, a bad label): an error row."""

    def source(self) -> str | BinaryIO:
        return io.BytesIO(self.payload) if isinstance(self.payload, bytes) else self.payload


PARQUET_FAULTS = (OSError, pa.ArrowException)
"""What pyarrow raises for a file or row group it cannot read (ArrowInvalid, ArrowIOError, ...)."""


def _error_rows(ids: list[str], error: str) -> Iterator[Record]:
    for item_id in ids:
        yield Record(item_id, None, None, error)


def local_path(path: str) -> str:
    """A local path (or glob or brace pattern) absolute, with symlinks resolved; a dataset name
    as it is."""
    from batch_classify.inputs.tars import is_pattern

    if os.path.exists(path) or is_pattern(path) or path.startswith((".", "~")):
        return os.path.realpath(os.path.expanduser(path))
    return path


def _declared_bytes(group: Any, columns: set[str]) -> int:
    """Uncompressed bytes of the named top-level columns of a row group, as its footer
    declares them (a struct column's leaves summed)."""
    return sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
               if group.column(i).path_in_schema.split(".")[0] in columns)


def listing_data(cfg: DataConfig) -> dict[str, Any]:
    """The data.* keys that define the listing, with local paths absolute and resolved."""
    values = {key: getattr(cfg, key) for key in LISTING_KEYS}
    values["path"] = local_path(cfg.path)
    if cfg.labels:
        values["labels"] = os.path.realpath(cfg.labels)
    return values


class Listing:
    """A written listing: its summary, its units, and each unit's records on demand."""

    limits = Limits()
    """What one tar member, image cell or row group may cost (the job sets runtime's)."""

    def __init__(self, folder: Path, info: dict[str, Any], units: pa.Table):
        self.folder = folder
        self.info = info
        self.units = {name: units.column(name).to_numpy(zero_copy_only=False)
                      for name in ("start", "stop", "offset", "n_items")}
        self.unit_paths = units.column("path").to_pylist()
        self._rows_file: pq.ParquetFile | None = None
        self._row_starts: list[int] | None = None
        self._hf = None

    # ------------------------------------------------------------ summary

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def root(self) -> str:
        return self.info["root"]

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

    def unit_items(self, unit: int) -> int | None:
        value = self.units["n_items"][unit]
        return None if value is None or value != value else int(value)

    def describe_unit(self, unit: int) -> str:
        if self.kind in LISTED_KINDS or self.kind == "hf":
            return f"rows {int(self.units['start'][unit])}-{int(self.units['stop'][unit]) - 1}"
        if self.kind == "parquet":
            return (f"{self.unit_paths[unit]} row groups {int(self.units['start'][unit])}-"
                    f"{int(self.units['stop'][unit]) - 1}")
        return self.unit_paths[unit]

    # ------------------------------------------------------------ records

    def records(self, unit: int, read_images: bool = True) -> Iterator[Record]:
        """The unit's items in their fixed order (``read_images=False``: ids, labels and input
        errors only, for recounting)."""
        if not 0 <= unit < self.n_units:
            raise IndexError(f"unit {unit} is outside 0..{self.n_units - 1}")
        if self.kind in LISTED_KINDS:
            return self._listed(unit)
        if self.kind == "webdataset":
            return self._tar(unit, read_images)
        if self.kind == "parquet":
            return self._parquet(unit, read_images)
        return self._hf_rows(unit)

    def find(self, unit: int, item_id: str) -> Record | None:
        """The record of one id (for the report's pictures): a scan of its unit."""
        return next((record for record in self.records(unit) if record.id == item_id), None)

    def _listed(self, unit: int) -> Iterator[Record]:
        if self._rows_file is None:
            self._rows_file = pq.ParquetFile(self.folder / ROWS_FILE)
            metadata = self._rows_file.metadata
            starts = [0]
            for group in range(metadata.num_row_groups):
                starts.append(starts[-1] + metadata.row_group(group).num_rows)
            self._row_starts = starts
        start, stop = int(self.units["start"][unit]), int(self.units["stop"][unit])
        starts = self._row_starts
        root = self.root
        for group in range(len(starts) - 1):
            if starts[group + 1] <= start or starts[group] >= stop:
                continue
            table = self._rows_file.read_row_group(group)
            low = max(start, starts[group]) - starts[group]
            high = min(stop, starts[group + 1]) - starts[group]
            table = table.slice(low, high - low)
            for item_id, label, path in zip(*(table.column(c).to_pylist() for c in ("id", "label", "path"))):
                yield Record(item_id, label, path if path is not None else os.path.join(root, item_id))

    def _tar(self, unit: int, read_images: bool = True) -> Iterator[Record]:
        from batch_classify.inputs.tars import iter_tar

        reader = self.info["reader"]
        rel = self.unit_paths[unit]
        for sample in iter_tar(os.path.join(self.root, rel), rel, reader["image_suffixes"],
                               reader["label_key"], read_images=read_images, limits=self.limits):
            yield Record(sample.id, sample.label, sample.image, sample.error)

    def _labels(self, values: list[Any], ids: list[str]) -> Iterator[tuple[int | None, str | None]]:
        spec = self.info["reader"]["label"]
        for value, item_id in zip(values, ids):
            try:
                yield map_label(value, spec), None
            except (ValueError, IndexError, TypeError) as error:
                yield None, f"BadLabel: item {item_id}: {error}"

    @staticmethod
    def _payload(value: Any, folder: str) -> str | bytes | None:
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            return value if os.path.isabs(value) else os.path.join(folder, value)
        return None

    def _emit(self, values: list[Any] | None, ids: list[str], labels: list[Any],
              folder: str) -> Iterator[Record]:
        if values is None:  # ids and labels only
            for item_id, (label, error) in zip(ids, self._labels(labels, ids)):
                yield Record(item_id, label, None, error)
            return
        limit = self.limits.max_image_bytes
        for value, item_id, (label, error) in zip(values, ids, self._labels(labels, ids)):
            payload = self._payload(value, folder)
            if payload is None and error is None:
                error = f"MissingImage: row {item_id} has neither image bytes nor a path"
            if isinstance(payload, bytes) and len(payload) > limit:
                payload, error = None, (f"FileTooLarge: row {item_id}: the image cell is {len(payload)} "
                                        f"bytes, over runtime.max_image_bytes ({limit})")
            yield Record(item_id, label, payload, error)

    def _parquet(self, unit: int, read_images: bool = True) -> Iterator[Record]:
        """The unit's row groups in order. Listing read only the footers: a row group whose
        pages turn out unreadable (corrupt, or a bad disk block) is error rows, one per row,
        so the job goes on and every listed row is accounted for. A file that cannot be opened
        at all fails the unit, as a tar's filesystem errors do: a rerun retries it."""
        reader = self.info["reader"]
        rel = self.unit_paths[unit]
        path = os.path.join(self.root, rel)
        columns = [reader["image_column"]] if read_images else []
        label_column = reader["label"]["column"] if reader["label"] else None
        for extra in (label_column, reader["id_column"]):
            if extra is not None and extra not in columns:
                columns.append(extra)
        position = int(self.units["offset"][unit])
        try:
            file = open_regular(path)
        except NotRegularFile as error:  # a FIFO would block the rank for ever
            n = int(self.units["n_items"][unit])
            ids = ([f"{rel}@{i}" for i in range(position, position + n)] if reader["id_column"]
                   else [str(i) for i in range(position, position + n)])
            yield from _error_rows(ids, f"NotRegularFile: {rel}: {error}")
            return
        with file:
            yield from self._row_groups(unit, pq.ParquetFile(file), rel, path, columns, position,
                                        read_images)

    def _row_groups(self, unit: int, handle: pq.ParquetFile, rel: str, path: str, columns: list[str],
                    position: int, read_images: bool) -> Iterator[Record]:
        reader = self.info["reader"]
        label_column = reader["label"]["column"] if reader["label"] else None
        limit = self.limits.max_row_group_bytes
        # The image column counts even in a recount (read_images=False), so both find the same rows.
        counted = {reader["image_column"], *columns}
        for group in range(int(self.units["start"][unit]), int(self.units["stop"][unit])):
            n = handle.metadata.row_group(group).num_rows
            declared = _declared_bytes(handle.metadata.row_group(group), counted)
            if declared > limit:  # known from the footer: the pages are never read
                yield from _error_rows(self._fallback_ids(handle, group, rel, position, n),
                                       f"RowGroupTooLarge: {rel} row group {group} (rows {position}-"
                                       f"{position + n - 1}): its footer declares {declared} bytes, "
                                       f"over runtime.max_row_group_bytes ({limit})")
                position += n
                continue
            try:
                table = handle.read_row_group(group, columns=columns)
                ids = ([str(v) for v in table.column(reader["id_column"]).to_pylist()] if reader["id_column"]
                       else [str(i) for i in range(position, position + n)])
                labels = table.column(label_column).to_pylist() if label_column else [None] * n
                images = table.column(reader["image_column"]).to_pylist() if read_images else None
            except PARQUET_FAULTS as error:
                yield from _error_rows(self._fallback_ids(handle, group, rel, position, n),
                                       f"CorruptShard: {rel} row group {group} (rows {position}-"
                                       f"{position + n - 1}): {describe_error(error)}")
            else:
                yield from self._emit(images, ids, labels, os.path.dirname(path))
            position += n

    def _fallback_ids(self, handle: pq.ParquetFile, group: int, rel: str, position: int,
                      n: int) -> list[str]:
        """Ids for the rows of a group that cannot be read whole: the id column alone where it
        still reads (a recount reads only ids, and must find the same), else the row index
        (``<file>@<row>`` where ids come from a column)."""
        column = self.info["reader"]["id_column"]
        if column is None:
            return [str(i) for i in range(position, position + n)]
        try:
            return [str(v) for v in handle.read_row_group(group, columns=[column]).column(0).to_pylist()]
        except PARQUET_FAULTS:
            return [f"{rel}@{i}" for i in range(position, position + n)]

    def _hf_rows(self, unit: int) -> Iterator[Record]:
        reader = self.info["reader"]
        if self._hf is None:
            import datasets

            known = {f.name for f in dataclasses.fields(DataConfig)}
            dataset = hf_load(DataConfig(**{k: v for k, v in self.info["data"].items() if k in known}))
            if reader["decode_off"]:
                dataset = dataset.cast_column(reader["image_column"], datasets.Image(decode=False))
            self._hf = dataset
        label_column = reader["label"]["column"] if reader["label"] else None
        start, stop = int(self.units["start"][unit]), int(self.units["stop"][unit])
        for low in range(start, stop, HF_SLICE):
            rows = self._hf[low:min(stop, low + HF_SLICE)]
            n = len(rows[reader["image_column"]])
            ids = ([str(v) for v in rows[reader["id_column"]]] if reader["id_column"]
                   else [str(i) for i in range(low, low + n)])
            labels = rows[label_column] if label_column else [None] * n
            yield from self._emit(rows[reader["image_column"]], ids, labels, os.getcwd())

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers never need the open handles
        return {**self.__dict__, "_rows_file": None, "_row_starts": None, "_hf": None}


# ---------------------------------------------------------------- writing


def _write_rows(enumeration: Enumeration, folder: Path) -> tuple[int, int, str, str]:
    """Stream the enumerated files into listing.parquet; return (items, labelled, the
    order-independent digest of the (id, label) pairs, and the digest of their sequence)."""
    n = n_labelled = 0
    digests = []
    sequence = hashlib.blake2b(digest_size=8)
    temporary = folder / f".{ROWS_FILE}.tmp"
    with pq.ParquetWriter(temporary, ROWS_SCHEMA) as writer:
        for chunk in enumeration.rows:
            writer.write_table(pa.table({"id": chunk.ids, "label": pa.array(chunk.labels, pa.int64()),
                                         "path": pa.array(chunk.paths, pa.string())}, schema=ROWS_SCHEMA),
                               row_group_size=ROW_GROUP)
            n += len(chunk.ids)
            n_labelled += sum(label is not None for label in chunk.labels)
            pairs = [f"{item_id}\t{label}" for item_id, label in zip(chunk.ids, chunk.labels)]
            digests.append(f"{sum(map(id_hash, pairs)) % 2**64:016x}")
            sequence.update("\n".join(pairs).encode("utf-8", "surrogatepass") + b"\n")
    os.replace(temporary, folder / ROWS_FILE)
    return n, n_labelled, add_digests(digests), sequence.hexdigest()


def _row_units(n_items: int, unit_size: int) -> dict[str, list]:
    starts = list(range(0, n_items, unit_size))
    stops = [min(s + unit_size, n_items) for s in starts]
    return {"path": [""] * len(starts), "start": starts, "stop": stops, "offset": starts,
            "n_items": [b - a for a, b in zip(starts, stops)]}


def _parquet_units(shards: list[dict[str, Any]], unit_size: int) -> dict[str, list]:
    """Runs of whole row groups within one file, each up to unit_size rows (a bigger group alone)."""
    units: dict[str, list] = {"path": [], "start": [], "stop": [], "offset": [], "n_items": []}
    offset = 0
    for shard in shards:
        groups = shard["row_groups"]
        first, rows = 0, 0
        for group, count in enumerate(groups + [None]):
            if rows and (count is None or rows + count > unit_size):
                units["path"].append(shard["path"])
                units["start"].append(first)
                units["stop"].append(group)
                units["offset"].append(offset)
                units["n_items"].append(rows)
                offset += rows
                first, rows = group, 0
            if count is None:
                break
            if rows == 0:
                first = group
            rows += count
    return units


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
        info, table = _list_into(cfg, building, unit_size, batch_size)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    remove_listing(final)
    os.replace(building, final)
    return Listing(final, info, table)


def _list_into(cfg: DataConfig, folder: Path, unit_size: int, batch_size: int) -> tuple[dict[str, Any],
                                                                                     pa.Table]:
    """Enumerate the input into ``folder``: rows, units, state, then the info file."""
    state = StateRecorder()
    enumeration = enumerate_input(cfg, state)
    kind = enumeration.kind
    if os.path.exists(enumeration.root):  # ids are relative to it, from any working directory
        enumeration.root = os.path.realpath(enumeration.root)
    for shard in enumeration.shards or ():
        if shard["path"]:  # a tar or a Parquet file: its size and mtime
            state.file(os.path.join(enumeration.root, shard["path"]))
    if kind == "hf" and os.path.isdir(enumeration.root):  # a save_to_disk folder: its few files
        for parent, _, names in os.walk(enumeration.root):
            for name in sorted(names):
                state.file(os.path.join(parent, name))
    if enumeration.rows is not None:
        n_items, n_labelled, items_digest, fingerprint = _write_rows(enumeration, folder)
        if n_items == 0:
            raise InputError(f"data.path {cfg.path}: no image files found (data.kind: {kind})")
        size = unit_size or auto_unit_size(n_items, batch_size)
        units = _row_units(n_items, size)
    elif kind == "parquet":
        n_items = sum(sum(s["row_groups"]) for s in enumeration.shards)
        size = unit_size or auto_unit_size(n_items, batch_size)
        units = _parquet_units(enumeration.shards, size)
        n_labelled = None if enumeration.reader["label"] else 0
    elif kind == "hf":
        n_items = enumeration.shards[0]["rows"]
        size = unit_size or auto_unit_size(n_items, batch_size)
        units = _row_units(n_items, size)
        n_labelled = None if enumeration.reader["label"] else 0
    else:  # webdataset: a unit per tar, sizes known once read
        n_items, size = None, None
        n_labelled = None
        units = {"path": [s["path"] for s in enumeration.shards], "start": [None] * len(enumeration.shards),
                 "stop": [None] * len(enumeration.shards), "offset": [None] * len(enumeration.shards),
                 "n_items": [None] * len(enumeration.shards)}
    if enumeration.rows is None:
        items_digest = add_digests(f"{id_hash(part):016x}" for part in enumeration.fingerprint_parts)
        fingerprint = sequence_digest(enumeration.fingerprint_parts)
    n_units = len(units["path"])
    if n_units == 0:
        raise InputError(f"data.path {cfg.path}: the input holds no items")
    table = pa.table({"unit": list(range(n_units)), **units}, schema=UNITS_SCHEMA)
    pq.write_table(table, folder / UNITS_FILE)
    state.write(folder / STATE_FILE)
    info = {
        "format": LISTING_FORMAT,
        "kind": kind,
        "root": enumeration.root,
        "classes": list(enumeration.classes) if enumeration.classes is not None else None,
        "notes": enumeration.notes + ([] if n_labelled != 0 else ["no labels: labelling mode"]),
        "n_items": n_items,
        "n_labelled": n_labelled,
        "n_units": n_units,
        "unit_size": size,
        "unit_size_configured": unit_size,
        "fingerprint": fingerprint,
        "items_digest": items_digest,
        "reader": enumeration.reader,
        "data": listing_data(cfg),
    }
    temporary = folder / f".{INFO_FILE}.tmp"
    temporary.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(temporary, folder / INFO_FILE)
    return info, table


SHARD_KINDS = {"webdataset", "parquet", "hf"}


def input_changes(listing: Listing, cfg: DataConfig) -> Change | None:
    """What differs between the input now and the input ``listing`` was made from, or None.

    One stat per folder walked and per file read (and a hash of each labels file); shard
    kinds are also named again (their files' names, sizes and footers, as listing read them),
    so a tar or Parquet file added to or removed from the input is found too."""
    state = listing.folder / STATE_FILE
    if not state.exists():
        return Change([f"{state} is missing: the listing cannot be checked against the input"], 1)
    change = check_state(state)
    if change is not None:
        return change
    if listing.kind in SHARD_KINDS:
        now = enumerate_input(cfg)
        parts = now.fingerprint_parts
        if sequence_digest(parts) != listing.info["fingerprint"]:
            before = dict.fromkeys(listing.unit_paths)
            after = dict.fromkeys(shard["path"] for shard in now.shards)
            added = [path for path in after if path not in before]
            removed = [path for path in before if path not in after]
            found = ([f"{len(added)} file(s) added, e.g. {added[0]}"] if added else []) + (
                [f"{len(removed)} file(s) gone, e.g. {removed[0]}"] if removed else [])
            return Change(found or ["its files' sizes, row counts or order differ from the listing's"],
                          max(1, len(found)), missing=bool(removed))
    return None


def read_listing(output: str | Path) -> Listing | None:
    """The complete listing in an output folder, or None."""
    folder = Path(output) / INPUT_DIR
    if not (folder / INFO_FILE).exists():
        return None
    info = json.loads((folder / INFO_FILE).read_text())
    return Listing(folder, info, pq.read_table(folder / UNITS_FILE, schema=UNITS_SCHEMA))


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


def image_sources(output_dir: str | Path) -> Callable[[int, str], str | BinaryIO]:
    """(unit, id) -> the path or bytes of that item's image, from the folder's listing (for the
    report's pictures: each lookup scans one unit). Raises where the listing is gone."""
    listing = read_listing(output_dir)
    if listing is None:
        raise FileNotFoundError(f"{output_dir} has no input listing")

    def source(unit: int, item_id: str) -> str | BinaryIO:
        record = listing.find(unit, item_id)
        if record is None or record.payload is None:
            raise KeyError(f"{item_id!r} is not in unit {unit} of the input any more")
        return record.source()

    return source


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
