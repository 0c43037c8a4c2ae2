"""What the listed input looked like when it was listed, and a cheap check that it still does.

A listing is only valid for the input it listed. Listing records, next to the units, the
state of everything the listing was made from: each folder it walked (its mtime and entry
count), each shard or list file (size and mtime), each labels file (a hash of its bytes).
A resume checks that state before it trusts the listing: one ``stat`` per folder or file,
no walk of the images. A folder whose mtime falls within ``RACY_NS`` of the moment it was
read may have changed within the filesystem's timestamp granularity without a new mtime,
so for those alone the entries are counted again (git's "racily clean" rule).

An input in an object store has no mtimes to stat: listing records each object it listed
(its URL, size and ETag or version), and a resume lists the same prefixes again (no object is
read) and compares, object by object (``compare_objects``).

Rows stream to ``input/state.parquet`` in chunks; memory is bounded by a chunk, not by the
number of folders.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch_classify.core.secrets import redact_url
from batch_classify.core.storage import ObjectInfo

RACY_NS = 2_000_000_000
"""A folder modified less than this before it was read is re-counted on every check."""
CHUNK = 16_384
SHOW = 3

SCHEMA = pa.schema([("kind", pa.string()), ("path", pa.string()), ("mtime_ns", pa.int64()),
                    ("size", pa.int64()), ("entries", pa.int64()), ("read_ns", pa.int64()),
                    ("digest", pa.string())])
"""kind: ``folder`` (mtime_ns, entries, read_ns), ``file`` (mtime_ns, size), ``content``
(size, digest: sha256 of the bytes) or ``object`` (an object in a store: its URL, size, and
digest: its ETag and version, ``ObjectInfo.token``). Paths are absolute and resolved."""


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a (small) file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_entries(path: str | os.PathLike) -> int:
    with os.scandir(path) as entries:
        return sum(1 for _ in entries)


class StateRecorder:
    """Collects the state rows while the input is enumerated; ``write`` streams them out."""

    def __init__(self) -> None:
        self._chunks: list[pa.Table] = []
        self._rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self._writer: pq.ParquetWriter | None = None
        self._target: Path | None = None
        self.n_rows = 0

    def _add(self, row: tuple) -> None:
        """One row: (kind, path, mtime_ns, size, entries, read_ns, digest), None where it does not apply."""
        for name, value in zip(SCHEMA.names, row):
            self._rows[name].append(value)
        self.n_rows += 1
        if len(self._rows["kind"]) >= CHUNK:
            self._flush()

    def folder(self, path: str | os.PathLike, status: os.stat_result, entries: int, read_ns: int) -> None:
        """A folder that was read: its stat taken before the read, its entry count, and when."""
        self._add(("folder", os.fspath(path), status.st_mtime_ns, None, entries, read_ns, None))

    def file(self, path: str | os.PathLike, status: os.stat_result | None = None) -> None:
        """A file whose size and mtime the listing depends on (a shard, a list of paths)."""
        status = status or os.stat(path)
        self._add(("file", os.fspath(path), status.st_mtime_ns, status.st_size, None, None, None))

    def content(self, path: str | os.PathLike) -> None:
        """A small file whose bytes the listing depends on (a labels CSV)."""
        self._add(("content", os.fspath(path), None, os.stat(path).st_size, None, None, content_digest(path)))

    def object(self, url: str, info: ObjectInfo) -> None:
        """An object of a store the listing was made from, as the store's listing gave it (its URL
        without credentials: a password in the host part stays in memory)."""
        self._add(("object", redact_url(url), None, info.size, None, None, info.token))

    def _flush(self) -> None:
        if not self._rows["kind"]:
            return
        table = pa.table(self._rows, schema=SCHEMA)
        self._rows = {name: [] for name in SCHEMA.names}
        if self._target is None:  # not written yet: keep the chunk (small inputs never get here)
            self._chunks.append(table)
            return
        self._writer.write_table(table)

    def write(self, path: Path) -> None:
        """Write every row to ``path`` (atomically: a temporary name, then a rename)."""
        temporary = path.with_name(f".{path.name}.tmp")
        self._target = path
        with pq.ParquetWriter(temporary, SCHEMA) as writer:
            self._writer = writer
            for table in self._chunks:
                writer.write_table(table)
            self._chunks = []
            self._flush()
            writer.write_table(pa.table({name: [] for name in SCHEMA.names}, schema=SCHEMA))
        self._writer = None
        os.replace(temporary, path)


@dataclass
class Change:
    """What differs between the listed input and the input now, and how many such changes."""

    found: list[str]
    n: int
    missing: bool = False
    """Some listed file or folder is gone or unreadable: a fault of the filesystem as often as
    a change of the data (a mount missing), so never a reason to list again on its own."""

    def describe(self) -> str:
        more = f" (and {self.n - len(self.found)} more)" if self.n > len(self.found) else ""
        return "; ".join(self.found) + more


def _batches(path: Path) -> Iterator[dict[str, list]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK):
        yield batch.to_pydict()


class _Gone(Exception):
    """A listed path that is gone or unreadable; its message says which."""


def _stat(path: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise _Gone(f"{what}{path} no longer exists") from None
    except OSError as error:
        raise _Gone(f"{what}{path} cannot be read ({error.strerror})") from None


def _folder_change(path: str, mtime_ns: int, entries: int, read_ns: int) -> str | None:
    if _stat(path, "folder ").st_mtime_ns != mtime_ns:
        return f"folder {path} was modified after it was listed (files added, removed or renamed)"
    if read_ns - mtime_ns < RACY_NS:
        now = count_entries(path)
        if now != entries:
            return f"folder {path} holds {now} entries, {entries} when listed"
    return None


def _file_change(path: str, mtime_ns: int, size: int) -> str | None:
    status = _stat(path, "")
    if status.st_size != size:
        return f"{path} is {status.st_size} bytes, {size} when listed"
    if status.st_mtime_ns != mtime_ns:
        return f"{path} was modified after it was listed"
    return None


def _content_change(path: str, size: int, digest: str) -> str | None:
    if _stat(path, "").st_size == size and content_digest(path) == digest:
        return None
    return f"{path} was edited after it was listed"


def check_state(path: Path) -> Change | None:
    """The changes since the state at ``path`` was recorded, or None where there are none."""
    found: list[str] = []
    n, missing = 0, False
    for rows in _batches(path):
        for kind, name, mtime_ns, size, entries, read_ns, digest in zip(*(rows[c] for c in SCHEMA.names)):
            if kind == "object":
                continue  # compared with a new listing of the store: compare_objects
            try:
                if kind == "folder":
                    change = _folder_change(name, mtime_ns, entries, read_ns)
                elif kind == "file":
                    change = _file_change(name, mtime_ns, size)
                else:
                    change = _content_change(name, size, digest)
            except _Gone as gone:
                change, missing = str(gone), True
            if change is not None:
                n += 1
                if len(found) < SHOW:
                    found.append(change)
    return Change(found, n, missing) if n else None


def listed_objects(path: Path) -> Iterator[tuple[str, ObjectInfo]]:
    """(url, identity) of the objects recorded at ``path``, in the order listed."""
    for rows in _batches(path):
        for kind, url, size, token in zip(rows["kind"], rows["path"], rows["size"], rows["digest"]):
            if kind == "object":
                yield url, ObjectInfo.parse(size, token)


def compare_objects(path: Path, now: Iterable[tuple[str, ObjectInfo]]) -> Change | None:
    """The objects added, gone or replaced (another size or ETag) between those recorded at
    ``path`` and ``now`` (a new listing, in the same order: by name), or None. Streams both."""
    before, after = listed_objects(path), ((redact_url(url), info) for url, info in now)
    old, new = next(before, None), next(after, None)
    counts = {"added": 0, "gone": 0, "replaced": 0}
    first: dict[str, str] = {}
    while old is not None or new is not None:
        if new is None or (old is not None and old[0] < new[0]):
            counts["gone"] += 1
            first.setdefault("gone", old[0])
            old = next(before, None)
        elif old is None or new[0] < old[0]:
            counts["added"] += 1
            first.setdefault("added", new[0])
            new = next(after, None)
        else:
            if not old[1].same(new[1]):
                counts["replaced"] += 1
                first.setdefault("replaced", f"{old[0]} ({old[1].describe()} when listed, "
                                             f"{new[1].describe()} now)")
            old, new = next(before, None), next(after, None)
    found = [f"{counts[what]} object(s) {what}, e.g. {first[what]}" for what in counts if counts[what]]
    return Change(found, len(found)) if found else None


def listed_files(path: Path) -> list[str]:
    """The files (shards) recorded at ``path``, in order: what a re-expansion must name again."""
    names: list[str] = []
    for rows in _batches(path):
        names.extend(name for kind, name in zip(rows["kind"], rows["path"]) if kind == "file")
    return names


def now_ns() -> int:
    return time.time_ns()
