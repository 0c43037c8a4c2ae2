"""Parquet files with an image column (``parquet``): units are runs of whole row groups, read by
the rank that runs them; listing reads only the footers."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch_classify.core.config import DataConfig
from batch_classify.core.errors import describe_error
from batch_classify.core.limits import NotRegularFile, open_regular
from batch_classify.core.storage import ObjectChanged, ObjectInfo, SeekableObject, Store, StoreError, is_url
from batch_classify.inputs.base import (
    CHUNK_ROWS,
    Cut,
    Enumeration,
    Found,
    InputError,
    Record,
    Repeats,
    Sizing,
    checked_last,
    error_rows,
    regular_file,
)
from batch_classify.inputs.columns import TableKind, find_columns, label_map
from batch_classify.inputs.objects import expand_urls, relative, store_of
from batch_classify.inputs.state import StateRecorder
from batch_classify.inputs.tars import PARQUET_FILES, ShardSpecError, expand_shards, shard_root

log = logging.getLogger(__name__)

FOOTER_BYTES = 256 << 10
"""Bytes read from an object's end for its footer: one ranged GET for most files."""
MERGE_GAP = 64 << 10
"""Column chunks of a unit closer than this are fetched in one ranged GET."""
FAULTS = (OSError, pa.ArrowException)
"""What pyarrow raises for a file or row group it cannot read (ArrowInvalid, ArrowIOError, ...)."""


class Parquet(TableKind):
    name = "parquet"
    urls = True

    @classmethod
    def detect(cls, found: Found) -> bool:
        if found.first_name is not None:
            return found.first_name.lower().endswith(".parquet")
        if found.is_file:
            return found.path.suffix.lower() == ".parquet"
        if not found.exists:
            return False
        if found.path.suffix.lower() == ".parquet":
            return True  # Spark's table.parquet/ folder of part files
        top = found.top
        return top.delta_log or top.parquet_files or top.parquet_below  # a Delta table is refused, with why

    @classmethod
    def enumerate(cls, cfg: DataConfig, state: StateRecorder | None = None) -> Enumeration:
        return parquet(cfg)

    @classmethod
    def objects_now(cls, cfg: DataConfig) -> Iterator[tuple[str, ObjectInfo]]:
        return iter(sorted(expand_urls(cfg, PARQUET_FILES, [])[1].items()))

    @classmethod
    def cut(cls, enumeration: Enumeration, folder: Path, sizing: Sizing) -> Cut:
        n_items = sum(sum(s["row_groups"]) for s in enumeration.shards)
        size = sizing.size(n_items)
        n_labelled = None if enumeration.reader["label"] else 0
        return Cut(parquet_units(enumeration.shards, size), n_items, n_labelled, size,
                   *cls.digests(enumeration.fingerprint_parts))

    def describe_unit(self, unit: int) -> str:
        units = self.listing.units
        rel = self.listing.unit_paths[unit]
        where = self.shard_location(rel) if self.remote else rel
        return f"{where} row groups {int(units['start'][unit])}-{int(units['stop'][unit]) - 1}"

    def records(self, unit: int, read_images: bool = True) -> Iterator[Record]:
        """The unit's row groups in order. Listing read only the footers: a row group whose
        pages turn out unreadable (corrupt, or a bad disk block) is error rows, one per row,
        so the job goes on and every listed row is accounted for. A file that cannot be opened
        at all fails the unit, as a tar's filesystem errors do: a rerun retries it."""
        listing = self.listing
        reader = listing.info["reader"]
        rel = listing.unit_paths[unit]
        path = os.path.join(listing.root, rel)
        columns = [reader["image_column"]] if read_images else []
        label_column = reader["label"]["column"] if reader["label"] else None
        for extra in (label_column, reader["id_column"]):
            if extra is not None and extra not in columns:
                columns.append(extra)
        group = RowGroups(unit, rel, columns, int(listing.units["offset"][unit]))
        if self.remote:
            path = self.shard_location(rel)
            store, pin = self.store(), self.pin(path)
            with self._fetch(unit, path, columns, pin) as file:
                group.source = file
                records = self._row_groups(pq.ParquetFile(file), group, read_images, path.rsplit("/", 1)[0])
                yield from checked_last(records, lambda: store.check(path, pin))
            return
        try:
            file = open_regular(path)
        except NotRegularFile as error:  # a FIFO would block the rank for ever
            n = int(listing.units["n_items"][unit])
            position = group.position
            ids = ([f"{rel}@{i}" for i in range(position, position + n)] if reader["id_column"]
                   else [str(i) for i in range(position, position + n)])
            yield from error_rows(ids, f"NotRegularFile: {rel}: {error}")
            return
        with file:
            yield from self._row_groups(pq.ParquetFile(file), group, read_images, os.path.dirname(path))

    def _fetch(self, unit: int, url: str, columns: list[str], pin: ObjectInfo | None) -> ObjectRanges:
        """The unit's row groups of an object, only the columns asked for: the footer in one
        ranged GET, then those column chunks in as few as their offsets allow, each retried and
        of the version listed; pyarrow then reads them from memory."""
        store = self.store()
        units = self.listing.units
        groups = range(int(units["start"][unit]), int(units["stop"][unit]))
        file = ObjectRanges(store, url, pin.size if pin is not None else store.size(url), pin)
        metadata = pq.read_metadata(file)
        for start, stop in chunk_ranges(metadata, groups, {*columns}):
            file.fetch(start, stop)
        file.seek(0)
        return file

    def _row_groups(self, handle: pq.ParquetFile, run: RowGroups, read_images: bool,
                    folder: str) -> Iterator[Record]:
        reader = self.listing.info["reader"]
        label_column = reader["label"]["column"] if reader["label"] else None
        limit = self.listing.limits.max_row_group_bytes
        rel, position = run.rel, run.position
        # The image column counts even in a recount (read_images=False), so both find the same rows.
        counted = {reader["image_column"], *run.columns}
        units = self.listing.units
        for group in range(int(units["start"][run.unit]), int(units["stop"][run.unit])):
            n = handle.metadata.row_group(group).num_rows
            declared = _declared_bytes(handle.metadata.row_group(group), counted)
            if declared > limit:  # known from the footer: the pages are never read
                yield from error_rows(self._fallback_ids(handle, group, run, position, n),
                                      f"RowGroupTooLarge: {rel} row group {group} (rows {position}-"
                                      f"{position + n - 1}): its footer declares {declared} bytes, "
                                      f"over runtime.max_row_group_bytes ({limit})")
                position += n
                continue
            try:
                table = handle.read_row_group(group, columns=run.columns)
                ids = ([str(v) for v in table.column(reader["id_column"]).to_pylist()] if reader["id_column"]
                       else [str(i) for i in range(position, position + n)])
                labels = table.column(label_column).to_pylist() if label_column else [None] * n
                images = table.column(reader["image_column"]).to_pylist() if read_images else None
            except FAULTS as error:
                run.raise_store_failure(error)
                yield from error_rows(self._fallback_ids(handle, group, run, position, n),
                                      f"CorruptShard: {rel} row group {group} (rows {position}-"
                                      f"{position + n - 1}): {describe_error(error)}")
            else:
                yield from self.emit(images, ids, labels, folder)
            position += n

    def _fallback_ids(self, handle: pq.ParquetFile, group: int, run: RowGroups, position: int,
                      n: int) -> list[str]:
        """Ids for the rows of a group that cannot be read whole: the id column alone where it
        still reads (a recount reads only ids, and must find the same), else the row index
        (``<file>@<row>`` where ids come from a column)."""
        column, rel = self.listing.info["reader"]["id_column"], run.rel
        if column is None:
            return [str(i) for i in range(position, position + n)]
        try:
            return [str(v) for v in handle.read_row_group(group, columns=[column]).column(0).to_pylist()]
        except FAULTS as error:
            run.raise_store_failure(error)
            return [f"{rel}@{i}" for i in range(position, position + n)]

class RowGroups:
    """The run of row groups a unit reads: its file, the columns wanted, the first row's index."""

    def __init__(self, unit: int, rel: str, columns: list[str], position: int) -> None:
        self.unit, self.rel, self.columns, self.position = unit, rel, columns, position
        self.source: ObjectRanges | None = None

    def raise_store_failure(self, error: BaseException) -> None:
        """A read pyarrow failed because the store did (a fault past its retries, the object
        changed) fails the unit, as a file that cannot be read does: it is not bad data."""
        if self.source is not None and self.source.failure is not None:
            raise self.source.failure from error


class ObjectRanges(SeekableObject):
    """An object in a store as a file for pyarrow: reads are served from the byte ranges
    fetched so far (``fetch``), a read outside them is one more ranged GET. Every GET is
    retried and of the version ``pin``; the first that fails is kept in ``failure``."""

    def __init__(self, store: Store, url: str, size: int, pin: ObjectInfo | None) -> None:
        super().__init__()
        self.store, self.url, self.size, self.pin = store, url, size, pin
        self.parts: list[tuple[int, bytes]] = []
        self.position = 0
        self.failure: OSError | None = None
        self.fetch(max(0, size - FOOTER_BYTES), size)  # the footer, in one GET

    def fetch(self, start: int, stop: int) -> None:
        try:
            data = self.store.read_range(self.url, start, stop, self.pin)
        except OSError as error:
            self.failure = self.failure or error
            raise
        self.parts.append((start, data))

    def read(self, size: int = -1) -> bytes:
        start = self.position
        stop = self.size if size is None or size < 0 else min(self.size, start + size)
        if stop <= start:
            return b""
        for first, data in self.parts:
            if first <= start and stop <= first + len(data):
                break
        else:
            self.fetch(start, stop)
            first, data = self.parts[-1]
        self.position = stop
        return data[start - first:stop - first]


def chunk_ranges(metadata: Any, groups: range, columns: set[str]) -> list[tuple[int, int]]:
    """The byte ranges of the named top-level columns' chunks in ``groups``, those within
    MERGE_GAP of each other merged."""
    ranges = []
    for group in groups:
        row_group = metadata.row_group(group)
        for i in range(row_group.num_columns):
            chunk = row_group.column(i)
            if chunk.path_in_schema.split(".")[0] not in columns:
                continue
            dictionary = chunk.dictionary_page_offset if chunk.has_dictionary_page else None
            start = dictionary if dictionary else chunk.data_page_offset
            ranges.append((start, start + chunk.total_compressed_size))
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and start - merged[-1][1] <= MERGE_GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def _declared_bytes(group: Any, columns: set[str]) -> int:
    """Uncompressed bytes of the named top-level columns of a row group, as its footer
    declares them (a struct column's leaves summed)."""
    return sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
               if group.column(i).path_in_schema.split(".")[0] in columns)


def parquet_units(shards: list[dict[str, Any]], unit_size: int) -> dict[str, list]:
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

def _parquet_files(cfg: DataConfig, notes: list[str]) -> tuple[Path, list[Path]]:
    """The Parquet files of data.path: one file; a folder searched recursively (Spark's
    ``table.parquet/`` of ``part-*.parquet`` files and Hive ``key=value/`` subfolders
    included), skipping names that start with '.' or '_' as Spark and pyarrow do (a
    ``_temporary/`` folder holds a write in progress); a glob; or a brace pattern. A folder
    among the matches of a pattern is searched the same way. Each file is read once."""
    path = Path(cfg.path)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir() and (path / "_delta_log").is_dir():
        raise InputError(f"data.path {path} is a Delta Lake table: its folder also holds the files of "
                         "rows deleted or rewritten since, so reading every file would count them; "
                         "export the current version to Parquet files and point data.path at them")

    def expand(spec: str) -> list[Path]:
        try:
            return expand_shards(spec, notes=notes, what="data.path", search=PARQUET_FILES)
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


class Sources:
    """The Parquet files of data.path, local or objects in a store: names, sizes, and handles
    that read only what is asked for (an object's footer in one ranged GET)."""

    def __init__(self, cfg: DataConfig, notes: list[str]) -> None:
        self.store = store_of(cfg) if is_url(cfg.path) else None
        self.footers: dict[Any, Any] = {}
        if self.store is not None:
            self.root, self.objects = expand_urls(cfg, PARQUET_FILES, notes)
            self.files: list[Any] = list(self.objects)
        else:
            root, self.files = _parquet_files(cfg, notes)
            self.root = str(root)

    def rel(self, file: Any) -> str:
        if self.store is not None:
            return relative(file, self.root)
        return Path(os.path.relpath(file, self.root)).as_posix()

    def size(self, file: Any) -> int:
        return self.objects[file].size if self.store is not None else file.stat().st_size

    def open(self, file: Any) -> pq.ParquetFile:
        if self.store is None:
            return pq.ParquetFile(file)
        pin = self.objects[file]
        return pq.ParquetFile(ObjectRanges(self.store, file, pin.size, pin))

    def footer(self, file: Any) -> Any:
        if file not in self.footers:
            self.footers = {file: self._footer(file)}  # the first file's is asked for twice
        return self.footers[file]

    def _footer(self, file: Any) -> Any:
        if self.store is None:
            regular_file(file)  # reading a FIFO's footer would wait for ever
        try:
            if self.store is not None:
                return self.store.call(file, lambda: self.open(file).metadata)
            return pq.read_metadata(file)
        except (FileNotFoundError, PermissionError, ObjectChanged, StoreError) as error:
            raise InputError(f"data.path: {error}") from None
        except Exception as error:
            raise InputError(f"data.path: {file} is not a readable Parquet file ({error})") from None


def parquet(cfg: DataConfig) -> Enumeration:
    """Parquet files with an image column ({bytes, path} struct, bytes, or path strings):
    units are runs of row groups, read by the rank that runs them; only footers are read here."""
    import datasets

    notes: list[str] = []
    sources = Sources(cfg, notes)
    root, files, footer = sources.root, sources.files, sources.footer
    for note in notes:
        log.warning(note)
    schema = footer(files[0]).schema.to_arrow_schema()  # the columns, as the first file has them
    try:
        features = datasets.Features.from_arrow_schema(schema)
    except Exception:  # columns datasets has no feature type for: read them as plain values
        features = {name: None for name in schema.names}
    image_column, label_column, _ = find_columns(features, cfg, str(files[0]))
    needed = {image_column, label_column, cfg.id_column} - {None}
    shards, parts = [], []
    for file in files:
        metadata = footer(file)
        missing = needed - set(metadata.schema.to_arrow_schema().names)
        if missing:  # found now, not as a crash when a rank reaches the file
            raise InputError(f"data.path: {file} has no column {', '.join(sorted(missing))} (the "
                             f"first file, {sources.rel(files[0])}, has it); every file needs the same "
                             "columns")
        rel = sources.rel(file)
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        shards.append({"path": rel, "row_groups": groups})
        if sources.store is not None:  # the version listed, which every read is pinned to
            shards[-1]["object"] = [sources.objects[file].size, sources.objects[file].token]
        parts.append(f"{rel}\t{metadata.num_rows}\t{sources.size(file)}")
    reader = {"image_column": image_column, "id_column": cfg.id_column, "label": None}
    if cfg.id_column is not None:
        notes += _check_parquet_ids(sources, cfg.id_column)
    classes, notes = None, [f"{len(files)} Parquet file(s), image column {image_column!r}", *notes]
    if label_column is not None:
        reader["label"], classes, note = label_map(features[label_column], label_column)
        notes.append(note)
    return Enumeration("parquet", str(root), classes, notes, shards=shards, reader=reader,
                       fingerprint_parts=parts)


def _check_parquet_ids(sources: Sources, column: str) -> list[str]:
    """Refuse an id column with a null (it would become the id 'None') or, over the first
    Repeats.LIMIT rows, a repeated id; nulls further on are found from the footers'
    statistics, or by reading that row group's id column where a footer has none. A row group
    whose id column cannot be read is left to the run, which makes its rows error rows."""
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
        for file in sources.files:
            handle = sources.open(file)
            rel = sources.rel(file)
            row = 0
            for batch in batches(handle.metadata, range(handle.metadata.num_row_groups)):
                if seen >= Repeats.LIMIT:
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

    repeats, stopped = Repeats(), []
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
    for file in sources.files:  # past the checked rows: the footers' null counts
        handle = sources.open(file)
        metadata = handle.metadata
        chunk = next((i for i in range(metadata.num_columns)
                      if metadata.schema.column(i).path.split(".")[0] == column), None)
        start = 0
        for group in range(metadata.num_row_groups):
            statistics = metadata.row_group(group).column(chunk).statistics if chunk is not None else None
            if statistics is None or not statistics.has_null_count or statistics.null_count:
                values = ids(handle, [group])[0]
                if values is not None and values.null_count:
                    rel = sources.rel(file)
                    raise null(rel, group, start + first_null(values))
            start += metadata.row_group(group).num_rows
    return [f"repeated ids checked over the first {Repeats.LIMIT} rows only; nulls in all"]
