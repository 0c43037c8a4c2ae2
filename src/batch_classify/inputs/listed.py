"""Kinds whose items are files named in the listing (folders and path lists): their rows are
streamed into ``input/listing.parquet`` once, and a unit is a range of those rows."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch_classify.core.digests import add_digests, id_hash
from batch_classify.core.faults import describe_read_error
from batch_classify.core.layout import ROWS_FILE
from batch_classify.core.secrets import redact_url
from batch_classify.core.storage import ObjectChanged, ObjectInfo, is_url, join, store_for
from batch_classify.inputs.base import Cut, Enumeration, InputError, InputKind, Record, Sizing, row_units

FETCH_BATCH = 64
"""Objects fetched at once where items are in a store: latency, not bandwidth, bounds small images."""
ROW_GROUP = 8192
"""Rows per row group of listing.parquet: a unit reads at most a few of them."""


ROWS_SCHEMA = pa.schema([("id", pa.string()), ("label", pa.int64()), ("path", pa.string()),
                         ("size", pa.int64()), ("pin", pa.string())])
"""size and pin (``ObjectInfo.token``): an object's identity as listed, which its read is pinned to."""


class ListedKind(InputKind):
    """Items are files; their ids, labels and paths are in the listing's rows file."""

    folder = True
    item_by_item = True
    handles = ("_rows_file", "_row_starts")

    def __init__(self, listing) -> None:
        super().__init__(listing)
        self._rows_file: pq.ParquetFile | None = None
        self._row_starts: list[int] | None = None

    @classmethod
    def cut(cls, enumeration: Enumeration, folder: Path, sizing: Sizing) -> Cut:
        n_items, n_labelled, items_digest, fingerprint = write_rows(enumeration, folder)
        if n_items == 0:
            raise InputError(f"data.path {enumeration.path}: no image files found (data.kind: {cls.name})")
        size = sizing.size(n_items)
        return Cut(row_units(n_items, size), n_items, n_labelled, size, items_digest, fingerprint)

    def describe_unit(self, unit: int) -> str:
        units = self.listing.units
        return f"rows {int(units['start'][unit])}-{int(units['stop'][unit]) - 1}"

    def records(self, unit: int, read_images: bool = True) -> Iterator[Record]:
        rows = self._rows(unit)
        if not read_images:
            return rows
        return self._fetched(rows)

    def _fetched(self, rows: Iterator[Record]) -> Iterator[Record]:
        """Items that are objects in a store come with their bytes, fetched FETCH_BATCH at a time
        concurrently, each of the version listed; one that is gone or forbidden is an error row,
        as a missing file is; one that changed since listing fails the unit."""
        batch: list[Record] = []
        for record in rows:
            batch.append(record)
            if len(batch) == FETCH_BATCH:
                yield from self._fetch(batch)
                batch = []
        yield from self._fetch(batch)

    def _fetch(self, batch: list[Record]) -> Iterator[Record]:
        urls = [record.payload for record in batch if is_url(record.payload)]
        if not urls:
            yield from batch
            return
        pins = {record.payload: record.pin for record in batch if record.pin is not None}
        fetched = store_for(urls[0], self.listing.storage_options).read_many(urls, pins)
        for record in batch:
            data = fetched.get(record.payload) if is_url(record.payload) else record.payload
            limit = self.listing.limits.max_image_bytes
            if isinstance(data, ObjectChanged):  # rows of another version: the unit is not committed
                raise data
            if isinstance(data, BaseException):  # after the store's retries: marked transient where so
                yield Record(record.id, record.label, None, describe_read_error(data))
            elif isinstance(data, bytes) and len(data) > limit:
                yield Record(record.id, record.label, None, f"FileTooLarge: {redact_url(record.payload)} is "
                             f"{len(data)} bytes, over runtime.max_image_bytes ({limit})")
            else:
                yield Record(record.id, record.label, data, record.error)

    def _rows(self, unit: int) -> Iterator[Record]:
        listing = self.listing
        if self._rows_file is None:
            self._rows_file = pq.ParquetFile(listing.folder / ROWS_FILE)
            metadata = self._rows_file.metadata
            starts = [0]
            for group in range(metadata.num_row_groups):
                starts.append(starts[-1] + metadata.row_group(group).num_rows)
            self._row_starts = starts
        start, stop = int(listing.units["start"][unit]), int(listing.units["stop"][unit])
        starts = self._row_starts
        root, remote = listing.root, self.remote
        for group in range(len(starts) - 1):
            if starts[group + 1] <= start or starts[group] >= stop:
                continue
            table = self._rows_file.read_row_group(group)
            low = max(start, starts[group]) - starts[group]
            high = min(stop, starts[group + 1]) - starts[group]
            table = table.slice(low, high - low)
            columns = [table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
                       for c in ROWS_SCHEMA.names]
            for item_id, label, path, size, pin in zip(*columns):
                yield Record(item_id, label, path if path is not None else
                             join(root, item_id) if remote else os.path.join(root, item_id),
                             pin=ObjectInfo.parse(size, pin) if pin is not None else None)

    def check_reachable(self) -> None:
        if self.remote:
            return  # each object is asked for when read; one gone is an error row
        if not os.path.isdir(self.listing.root):
            raise FileNotFoundError(f"the image folder {self.listing.root} does not exist (moved or "
                                    "removed?)")

    @classmethod
    def named_by_id(cls, data_path: Path) -> Path | None:
        if not data_path.is_dir():
            raise FileNotFoundError(f"the image folder {data_path} does not exist (moved or removed?)")
        return data_path


def write_rows(enumeration: Enumeration, folder: Path) -> tuple[int, int, str, str]:
    """Stream the enumerated files into listing.parquet; return (items, labelled, the
    order-independent digest of the (id, label) pairs, and the digest of their sequence)."""
    n = n_labelled = 0
    digests = []
    sequence = hashlib.blake2b(digest_size=8)
    temporary = folder / f".{ROWS_FILE}.tmp"
    with pq.ParquetWriter(temporary, ROWS_SCHEMA) as writer:
        for chunk in enumeration.rows:
            pins = chunk.pins or [None] * len(chunk.ids)
            columns = {"id": chunk.ids, "label": chunk.labels, "path": chunk.paths,
                       "size": [p.size if p else None for p in pins],
                       "pin": [p.token if p else None for p in pins]}
            writer.write_table(pa.table(columns, schema=ROWS_SCHEMA), row_group_size=ROW_GROUP)
            n += len(chunk.ids)
            n_labelled += sum(label is not None for label in chunk.labels)
            pairs = [f"{item_id}\t{label}" for item_id, label in zip(chunk.ids, chunk.labels)]
            digests.append(f"{sum(map(id_hash, pairs)) % 2**64:016x}")
            sequence.update("\n".join(pairs).encode("utf-8", "surrogatepass") + b"\n")
    os.replace(temporary, folder / ROWS_FILE)
    return n, n_labelled, add_digests(digests), sequence.hexdigest()
