"""WebDataset tar shards (the img2dataset layout): name them, then stream their samples.

Every problem in a shard becomes an error record; nothing is merged or dropped silently.
Reading one tar holds one sample's bytes plus the set of its keys, never the whole tar.

Conventions (WebDataset's, made strict):
- A member's key is its path up to the first dot of its basename, the rest is its suffix,
  lower-cased: ``dir/a.b.jpg`` is key ``dir/a``, suffix ``b.jpg``. A name without a dot has
  the suffix ``""``. Consecutive members with one key form one sample.
- Directories and members whose basename starts with a dot are skipped. Any other member
  that is not a regular file (symlink, hard link, device, fifo) makes its sample an error
  record: its data cannot be streamed, and ignoring it would hide it.
- The image is the first member whose suffix, or the suffix's last dot-component, is an
  image suffix (``b.jpg`` counts as ``jpg``). Later image members of the sample are ignored.
- The label is the ``cls`` member (exact suffix), or with ``label_key`` that field of the
  ``json`` member only (the ``cls`` member is then ignored). A missing member or field (or
  a JSON null) is label None.
- A member name that is not UTF-8 appears in ids with its bad bytes as ``\\xNN`` escapes.
- Byte offsets are positions in the tar stream; for a compressed tar, in the
  decompressed stream.
- Filesystem errors (missing file, permission, EIO) are not bad data: they propagate.
- Bounds (``limits.Limits``): a tar that is not a regular file (a FIFO would block) is one
  NotRegularFile record; an image member over runtime.max_image_bytes makes its sample a
  FileTooLarge record, from its header, unread; a compressed tar is inflated a read-sized
  piece at a time and stops with one ShardTooLarge record past
  runtime.max_decompressed_bytes; a label member is read only up to MAX_LABEL_BYTES and a
  JSON label nested deeper than MAX_JSON_DEPTH is a BadLabel. No error text quotes member
  bytes: a bad label is described by its size and shape.
"""

from __future__ import annotations

import bz2
import glob
import json
import lzma
import os
import re
import string
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from braceexpand import UnbalancedBracesError

from batch_classify.core.labels import parse_imagenet_label
from batch_classify.core.limits import Limits, NotRegularFile, file_kind, open_regular

IMAGE_SUFFIXES: tuple[str, ...] = (
    "jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "jpe", "jfif",
)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# Labels are tiny; a bigger member would be read whole only to fail.
MAX_LABEL_BYTES = 1 << 20
# A label document is a flat object; deeper nesting is hostile (and would exhaust the stack).
MAX_JSON_DEPTH = 32
# Read size of tarfile's stream: fewer Python-level reads than its 10 KiB default.
STREAM_CHUNK = 1 << 20
# Errors that mean the bytes are bad (tarfile turns compression errors into ReadError).
_BAD_DATA = (tarfile.TarError, EOFError, zlib.error)
_MAX_LISTED = 8


class ShardSpecError(ValueError):
    """A shard spec that names no tar file, or names one that does not exist."""


@dataclass(frozen=True)
class ShardSample:
    id: str              # "{rel}/{key}"; rel for a shard-level error; "{rel}/{key}@{offset}" for SplitSample
    label: int | None    # ImageNet-1k index (0-999) or None
    image: bytes | None  # the image member's bytes; None for error records or read_images=False
    error: str | None    # None when fine, else "Type: message"


def iter_tar(path: str | os.PathLike | BinaryIO, rel: str, image_suffixes: Sequence[str] = IMAGE_SUFFIXES,
             label_key: str | None = None, read_images: bool = True,
             limits: Limits | None = None) -> Iterator[ShardSample]:
    """Samples of one tar, in tar order; every tar yields at least one record.

    Error types: NotATar, NotRegularFile, TruncatedShard, CorruptShard (a bad header or bad
    compressed data after the start), ShardTooLarge, MissingImage, DuplicateMember,
    NotRegularMember, FileTooLarge, SplitSample, BadLabel, EmptyShard. See the module
    docstring for the rules. ``path`` may be a file already open (an object in a store).
    """
    limits = limits or Limits()
    reader = _TarReader(rel, frozenset(s.lower().lstrip(".") for s in image_suffixes),
                        label_key, read_images, limits)
    try:
        file = path if hasattr(path, "read") else open_regular(path)
    except NotRegularFile as error:
        yield _shard_error(rel, "NotRegularFile", f"{rel}: {error}")
        return
    with file:
        stream = _decompressed(file, limits.max_decompressed_bytes)
        try:
            tar = _ShardTar.open(fileobj=stream, mode="r|", bufsize=STREAM_CHUNK, encoding="utf-8")
        except ShardTooLarge as error:
            yield _shard_error(rel, "ShardTooLarge", f"{rel}: {error}")
            return
        except _BAD_DATA as error:
            yield _shard_error(rel, "NotATar", f"{rel}: cannot be read as a tar ({error})")
            return
        with tar:
            yield from reader.samples(tar)


class ShardTooLarge(Exception):
    """A compressed tar inflates past runtime.max_decompressed_bytes."""


XZ_MEMORY_LIMIT = 256 << 20
COMPRESSED_CHUNK = 64 << 10
_COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


def _decompressed(file, limit: int):
    """The tar stream of ``file``: the file itself, or for a gzip, bzip2 or xz file (known by
    its magic bytes, as tarfile's ``r|*`` does) its bounded decompression."""
    head = file.read(6)
    file.seek(0)
    kind = next((name for magic, name in _COMPRESSIONS if head.startswith(magic)), None)
    return file if kind is None else _Inflated(file, kind, limit)


class _Inflated:
    """A compressed tar's decompressed bytes, read-sized pieces at a time (tarfile's own
    stream inflates a whole compressed read at once: 1 MiB of a gzip bomb is 1 GiB), at most
    ``limit`` in all. Concatenated gzip members (pigz, bgzip) are read as one stream; a stream
    cut short ends where its data does, as tarfile's does."""

    def __init__(self, raw, kind: str, limit: int):
        self.raw, self.kind, self.limit = raw, kind, limit
        self.inflater = self._new()
        self.pending = b""
        self.total = 0
        self.done = False
        self.source_error: OSError | None = None

    def _new(self):
        if self.kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self.kind == "bzip2":
            return bz2.BZ2Decompressor()
        # An xz header names its dictionary size (up to 4 GiB); real ones use at most 64 MiB.
        return lzma.LZMADecompressor(memlimit=XZ_MEMORY_LIMIT)

    def read(self, size: int = -1) -> bytes:
        size = STREAM_CHUNK if size is None or size < 0 else size
        parts, got = [], 0
        while got < size and not self.done:
            piece = self._step(size - got)
            parts.append(piece)
            got += len(piece)
            if self.total + got > self.limit:  # before any more is held
                raise ShardTooLarge(
                    f"its decompressed data passes runtime.max_decompressed_bytes ({self.limit}); "
                    "the rest of the tar is not read")
        self.total += got
        return b"".join(parts)

    def _input(self) -> bytes:
        if not self.pending:
            # Small reads: zlib hands back the unread input as a copy after every call.
            try:
                self.pending = self.raw.read(COMPRESSED_CHUNK)
            except OSError as error:  # the file's (or store's) fault, not bad data: raised as it is
                self.source_error = error
                raise
            if not self.pending:
                self.done = True  # cut short, or the end
        return self.pending

    def _step(self, want: int) -> bytes:
        inflater = self.inflater
        if inflater.eof:  # another gzip member may follow; anything else after it is ignored
            rest = inflater.unused_data or self.raw.read(STREAM_CHUNK)
            if len(rest) < 2:
                rest += self.raw.read(STREAM_CHUNK)
            if self.kind == "gzip" and rest.startswith(b"\x1f\x8b"):
                self.inflater, self.pending = self._new(), rest
            else:
                self.done = True
            return b""
        try:
            if self.kind == "gzip":
                data = self._input()
                if self.done:
                    return b""
                out = inflater.decompress(data, want)
                self.pending = inflater.unconsumed_tail
                return out
            if inflater.needs_input:
                data = self._input()
                if self.done:
                    return b""
                self.pending = b""
                return inflater.decompress(data, want)
            return inflater.decompress(b"", want)
        except (zlib.error, lzma.LZMAError, OSError, EOFError) as error:  # bz2 raises OSError
            if error is self.source_error:
                raise
            raise tarfile.ReadError(f"invalid compressed data ({error})") from None


class _Header(tarfile.TarInfo):
    """Notes why header reading stopped: tarfile's stream mode takes a missing or cut header
    after the first for the end of the archive, which would hide a truncated shard."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.saw_end_marker = True
            raise
        except tarfile.HeaderError as error:
            tar.header_error = error
            raise


class _ShardTar(tarfile.TarFile):
    tarinfo = _Header
    saw_end_marker = False
    header_error: Exception | None = None


@dataclass
class _Sample:
    """The members of one key read so far."""

    key: str
    offset: int  # header offset of its first member
    split: bool  # the key was seen before, after other keys
    members: list[str] = field(default_factory=list)
    suffix_offsets: dict[str, tuple[str, int]] = field(default_factory=dict)
    problem: tuple[str, str] | None = None  # the first structural problem: (type, message)
    image_name: str | None = None
    image: bytes | None = None
    label_name: str | None = None
    label_bytes: bytes | None = None


class _TarReader:
    def __init__(self, rel: str, image_suffixes: frozenset[str], label_key: str | None,
                 read_images: bool, limits: Limits):
        self.rel = rel
        self.limits = limits
        self.image_suffixes = image_suffixes
        self.label_key = label_key
        self.label_suffix = "json" if label_key is not None else "cls"
        self.read_images = read_images

    def samples(self, tar: _ShardTar) -> Iterator[ShardSample]:
        seen_keys: set[str] = set()
        sample: _Sample | None = None
        last: tarfile.TarInfo | None = None
        skipped = 0
        while True:
            try:
                member = tar.next()
            except ShardTooLarge as error:
                yield self._too_large(sample, error)
                return
            except _BAD_DATA as error:
                yield self._damage(tar, sample, last, error)
                return
            if member is None:
                if tar.saw_end_marker:
                    break
                yield self._damage(tar, sample, last, tar.header_error)
                return
            del tar.members[:]  # stream mode keeps every TarInfo; we need none
            last = member
            basename = member.name.rsplit("/", 1)[-1]
            if member.isdir() or not basename or basename.startswith("."):
                skipped += 1
                continue
            key, suffix = split_member_name(member.name)
            if sample is None or key != sample.key:
                if sample is not None:
                    yield self._record(sample)
                sample = _Sample(key, member.offset, split=key in seen_keys)
                seen_keys.add(key)
            try:
                self._add(tar, sample, member, suffix)
            except ShardTooLarge as error:
                yield self._too_large(sample, error)
                return
            except _BAD_DATA as error:
                yield self._damage(tar, sample, last, error)
                return
        if sample is not None:
            yield self._record(sample)
        else:
            note = f" ({skipped} directories or hidden members skipped)" if skipped else ""
            yield _shard_error(self.rel, "EmptyShard", f"{self.rel}: a valid tar with no samples{note}")

    def _add(self, tar: _ShardTar, sample: _Sample, member: tarfile.TarInfo, suffix: str) -> None:
        sample.members.append(member.name)
        earlier = sample.suffix_offsets.get(suffix)
        sample.suffix_offsets.setdefault(suffix, (member.name, member.offset))
        if sample.problem is None and earlier is not None:
            sample.problem = ("DuplicateMember", (
                f"{self.rel}: sample {sample.key!r} has two members with suffix {suffix!r}: "
                f"{earlier[0]!r} at byte {earlier[1]} and {member.name!r} at byte {member.offset}"))
        if sample.problem is None and not member.isreg():
            target = f" to {member.linkname!r}" if member.issym() or member.islnk() else ""
            sample.problem = ("NotRegularMember",
                              f"{self.rel}: sample {sample.key!r}: member {member.name!r} at byte "
                              f"{member.offset} is a {_member_kind(member)}{target}, not a regular file")
        if sample.split or sample.problem is not None:
            return  # an error record: its bytes are not needed
        if sample.image_name is None and self._is_image(suffix):
            sample.image_name = member.name
            limit = self.limits.max_image_bytes
            if member.size > limit:  # a sparse member may claim terabytes in a tiny tar
                sample.problem = ("FileTooLarge", (
                    f"{self.rel}: sample {sample.key!r}: member {member.name!r} at byte {member.offset} "
                    f"is {member.size} bytes, over runtime.max_image_bytes ({limit})"))
            elif self.read_images:
                sample.image = _read_member(tar, member)
        elif suffix == self.label_suffix:
            sample.label_name = member.name
            if member.size <= MAX_LABEL_BYTES:
                sample.label_bytes = _read_member(tar, member)

    def _is_image(self, suffix: str) -> bool:
        return suffix in self.image_suffixes or suffix.rsplit(".", 1)[-1] in self.image_suffixes

    def _record(self, sample: _Sample) -> ShardSample:
        # A name that is not UTF-8 keeps its bytes as surrogates, which Parquet cannot store.
        sample_id = f"{self.rel}/{_printable(sample.key)}"
        members = _listing(sample.members)
        if sample.split:
            return ShardSample(f"{sample_id}@{sample.offset}", None, None, _error(
                "SplitSample", f"{self.rel}: sample {sample.key!r} reappears at byte {sample.offset} after "
                f"other keys (members {members}); its first part is {sample_id}"))
        if sample.problem is not None:
            return ShardSample(sample_id, None, None, _error(*sample.problem))
        if sample.image_name is None:
            return ShardSample(sample_id, None, None, _error(
                "MissingImage", f"{self.rel}: sample {sample.key!r} has no image member (members {members})"))
        try:
            label = self._label(sample)
        except ValueError as error:
            return ShardSample(sample_id, None, None, _error("BadLabel", str(error)))
        return ShardSample(sample_id, label, sample.image, None)

    def _label(self, sample: _Sample) -> int | None:
        """The sample's label; ValueError naming the shard, key, member and value."""
        if sample.label_name is None:
            return None
        where = f"{self.rel}: sample {sample.key!r}, member {sample.label_name!r}"
        if sample.label_bytes is None:
            raise ValueError(f"{where}: over {MAX_LABEL_BYTES} bytes, too large for a label")
        try:
            text = sample.label_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{where}: the label ({len(sample.label_bytes)} bytes) is not UTF-8 "
                             "text") from None
        if self.label_key is None:
            return parse_imagenet_label(text, where)
        where += f" field {self.label_key!r}"
        document = parse_json_label(text, where)
        if not isinstance(document, dict):
            raise ValueError(f"{where}: the JSON is {_json_kind(document)}, not an object")
        value = document.get(self.label_key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where}: the value is {_json_kind(value)}, not an ImageNet-1k "
                             "index (0-999) or wnid")
        return parse_imagenet_label(str(value), where)

    def _too_large(self, pending: _Sample | None, error: ShardTooLarge) -> ShardSample:
        lost = f"; sample {pending.key!r} may be incomplete and is not yielded" if pending else ""
        return _shard_error(self.rel, "ShardTooLarge", f"{self.rel}: {error}{lost}")

    def _damage(self, tar: _ShardTar, pending: _Sample | None, last: tarfile.TarInfo | None,
                error: Exception | None) -> ShardSample:
        """The shard-level record for a tar that stops being readable after its start."""
        end = tar.fileobj.tell()
        if isinstance(error, tarfile.InvalidHeaderError):
            kind, what = "CorruptShard", f"invalid header at byte {tar.offset} ({error})"
        elif not _at_end(tar):
            kind, what = "CorruptShard", f"unreadable data near byte {end} ({error})"
        else:
            kind, what = "TruncatedShard", f"the data ends at byte {end}, {_where(last, end)}"
        lost = f"; sample {pending.key!r} may be incomplete and is not yielded" if pending else ""
        return _shard_error(self.rel, kind, f"{self.rel}: {what}{lost}")


def parse_json_label(text: str, where: str) -> object:
    """A label document, refused (ValueError naming ``where``) past MAX_JSON_DEPTH levels of
    nesting, counted before parsing: the parser recurses once per level."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if data.size:
        # Brackets inside strings do not nest: blank out every string first.
        quoted = np.cumsum((data == ord('"')) & ~_escaped(data)) % 2 == 1
        step = (np.isin(data, (ord("["), ord("{"))).astype(np.int64)
                - np.isin(data, (ord("]"), ord("}"))))
        step[quoted] = 0
        depth = int(np.cumsum(step).max())
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{where}: the JSON nests {depth} levels deep, over the limit of "
                             f"{MAX_JSON_DEPTH} for a label")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at character {error.pos})") from None
    except RecursionError:  # the count above is a bound only for well-formed strings
        raise ValueError(f"{where}: the JSON nests deeper than the limit of {MAX_JSON_DEPTH} "
                         "for a label") from None


def _escaped(data: np.ndarray) -> np.ndarray:
    """Which bytes follow an odd run of backslashes (an escaped quote does not end a string)."""
    backslash = data == ord("\\")
    escaped = np.zeros(data.shape, dtype=bool)
    if backslash.any():
        run = 0
        for index in np.flatnonzero(backslash | np.roll(backslash, 1)):
            if backslash[index]:
                run = run + 1 if index and backslash[index - 1] else 1
            else:
                escaped[index] = run % 2 == 1
                run = 0
    return escaped


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a non-integer number" if isinstance(value, float) else "a number"
    names = {dict: "an object", list: "an array", str: "a string"}
    return names.get(type(value), "null")


def split_member_name(name: str) -> tuple[str, str]:
    """(key, lower-cased suffix) by WebDataset's rule: split at the first dot of the basename."""
    folder, _, basename = name.rpartition("/")
    stem, _, suffix = basename.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_member(tar: _ShardTar, member: tarfile.TarInfo) -> bytes:
    file = tar.extractfile(member)
    return file.read() if file is not None else b""


def _at_end(tar: _ShardTar) -> bool:
    """Whether the (decompressed) stream has no data left: truncation, not corruption."""
    try:
        return not tar.fileobj.read(1)
    except (*_BAD_DATA, ShardTooLarge):
        return False


def _where(last: tarfile.TarInfo | None, end: int) -> str:
    if last is None:
        return "before the first member"
    data_end = last.offset_data + last.size
    next_header = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if end < data_end:
        return (f"inside the data of member {last.name!r} (header at byte {last.offset}, "
                f"data at bytes {last.offset_data}-{data_end})")
    if end < next_header:
        return f"inside the padding after member {last.name!r}"
    if end == next_header:
        return f"after member {last.name!r}, without the end-of-archive marker"
    return f"inside the header at byte {next_header} (after member {last.name!r})"


def _member_kind(member: tarfile.TarInfo) -> str:
    kinds = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
             tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo"}
    return kinds.get(member.type, f"member of tar type {member.type!r}")


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _error(kind: str, message: str) -> str:
    return f"{kind}: {message}"


def _shard_error(rel: str, kind: str, message: str) -> ShardSample:
    return ShardSample(rel, None, None, _error(kind, message))


# Naming shards ------------------------------------------------------------------------------

MAX_PATTERN_NAMES = 1_000_000
"""Names a brace pattern may expand to, counted before any is built. Listing holds 1-2 KB
per shard on the main rank (its path, its unit row, its fingerprint part: 0.8 KB of Python
objects and 2.4 KB of peak RSS per tar, measured listing 100,000 tars), so a million shards
is 1-2 GB there and ten million would be 10-20 GB; 1e9 images in tars of 10,000 are 1e5."""


@dataclass(frozen=True)
class ShardSearch:
    """What a folder of shards is searched for: names ending in ``suffixes``, names starting
    with ``skip_prefixes`` skipped, sorted by path components where ``parts_order``."""

    suffixes: tuple[str, ...] = SHARD_SUFFIXES
    skip_prefixes: tuple[str, ...] = (".",)
    parts_order: bool = False


TARS = ShardSearch()
PARQUET_FILES = ShardSearch((".parquet",), (".", "_"), parts_order=True)
"""Parquet part files: Spark and pyarrow skip names starting with '_' as well."""


def expand_shards(spec: str, root: str | os.PathLike | None = None, notes: list[str] | None = None,
                  what: str = "shard spec", search: ShardSearch = TARS) -> list[Path]:
    """The files that `spec` names: one file, a folder (recursively: names ending in
    `suffixes`, names starting with `skip_prefixes` skipped, symlinked folders not followed,
    sorted by relative path), a glob (sorted), or a brace pattern (in the order written; may
    contain globs; counted first, over MAX_PATTERN_NAMES is refused). A file named twice (two
    spellings, overlapping patterns, a symlink beside its target) is kept once, at its first
    name, and `notes` says so. A relative spec is taken relative to `root` (default: the
    current directory). `parts_order` sorts by path components ('a/x' before 'a-b'), as
    sorting Paths does. Raises ShardSpecError naming `what`."""
    suffixes, skip_prefixes, parts_order = search.suffixes, search.skip_prefixes, search.parts_order
    path = _resolve(spec, root)
    files = _Files(spec, what)
    order = (lambda text: tuple(text.split("/"))) if parts_order else (lambda text: text)
    if path.is_dir():
        found = sorted(_scan_folder(path, suffixes, skip_prefixes), key=lambda item: order(item[0]))
        if not found:
            raise ShardSpecError(f"{what} {spec!r}: folder {str(path)!r} holds no "
                                 f"{', '.join(suffixes)} files")
        real_root = os.path.realpath(path)
        for rel, file, is_link in found:
            files.add(file, os.path.realpath(file) if is_link else os.path.join(real_root, rel))
        return files.done(notes)
    if path.is_file():
        return [path]
    if not is_pattern(str(path)):
        raise ShardSpecError(f"{what} {spec!r}: {str(path)!r} does not exist")
    count, names = brace_names(str(path), f"{what} {spec!r}")
    missing, first_missing = 0, ""
    for name in names:
        if glob.has_magic(name):
            matches = glob.glob(name, recursive=True)
            for match in sorted(matches, key=lambda text: order(text.replace(os.sep, "/"))):
                files.add(Path(match))
        elif files.exists(name):
            files.add(Path(name))
        else:
            missing += 1
            first_missing = first_missing or name
    if missing:
        raise ShardSpecError(f"{what} {spec!r}: {missing} of the {count} files it names do not exist, "
                             f"e.g. {first_missing!r}")
    if not files.kept:
        raise ShardSpecError(f"{what} {spec!r} matches no files")
    return files.done(notes)


class _Files:
    """The files named so far, each once: a file is known by its folder's real path plus its
    name (a folder resolved once, not a stat per file), or by its own real path where the
    folder listing says it is a symlink."""

    def __init__(self, spec: str, what: str):
        self.spec, self.what = spec, what
        self.kept: list[Path] = []
        self.first_name: dict[str, str] = {}
        self.repeats, self.example = 0, ""
        self.listings: dict[str, tuple[set[str], set[str]]] = {}
        self.real_folders: dict[str, str] = {}

    def listing(self, folder: str) -> tuple[set[str], set[str]]:
        """(names, names of symlinks) in `folder`, from one scandir: no stat storm for a
        whole brace range on a parallel filesystem."""
        if folder not in self.listings:
            names: set[str] = set()
            links: set[str] = set()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        names.add(entry.name)
                        if entry.is_symlink():
                            links.add(entry.name)
            except (FileNotFoundError, NotADirectoryError):
                pass
            self.listings[folder] = (names, links)
        return self.listings[folder]

    def exists(self, name: str) -> bool:
        folder, basename = os.path.split(name)
        return basename in self.listing(folder or ".")[0]

    def identity(self, file: Path) -> str:
        folder, basename = os.path.split(str(file))
        folder = folder or "."
        if basename in self.listing(folder)[1]:
            return os.path.realpath(file)
        real = self.real_folders.get(folder)
        if real is None:
            real = self.real_folders[folder] = os.path.realpath(folder)
        return os.path.join(real, basename)

    def add(self, file: Path, identity: str | None = None) -> None:
        identity = identity or self.identity(file)
        first = self.first_name.get(identity)
        if first is None:
            self.first_name[identity] = str(file)
            self.kept.append(file)
            return
        self.repeats += 1
        if not self.example:
            self.example = f"{str(file)!r} twice" if first == str(file) else f"{str(file)!r} is {first!r}"

    def done(self, notes: list[str] | None) -> list[Path]:
        if self.repeats and notes is not None:
            notes.append(f"{self.what} {self.spec!r} names {self.repeats} file(s) a second time ("
                         f"{self.example}); each is read once")
        return self.kept


def shard_root(spec: str, root: str | os.PathLike | None = None) -> Path:
    """The folder that ids are relative to: the folder itself, the parent of a single file, or
    the longest directory prefix of a glob/brace pattern before its first wildcard or brace.
    `root` as in `expand_shards`."""
    path = _resolve(spec, root)
    text = str(path)
    if path.is_dir():
        return path
    if path.exists() or not is_pattern(text):
        return path.parent
    first = min(i for i, char in enumerate(text) if char in "*?[{")
    return Path(os.path.dirname(text[:first]) or ".")


def _resolve(spec: str, root: str | os.PathLike | None) -> Path:
    path = Path(os.path.expanduser(spec))
    return path if root is None or path.is_absolute() else Path(root) / path


def is_pattern(text: str) -> bool:
    """Whether a data.path is a glob or brace pattern rather than a path."""
    return any(char in text for char in "*?[{")


def _scan_folder(folder: Path, suffixes: tuple[str, ...] = SHARD_SUFFIXES,
                 skip_prefixes: tuple[str, ...] = (".",)) -> Iterator[tuple[str, Path, bool]]:
    """(relative posix path, path, whether it is a symlink) of every file under `folder` whose
    name ends in `suffixes`, by scandir without stat (symlinked folders are not followed)."""
    pending = [(folder, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(skip_prefixes):
                    continue
                relative = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), relative + "/"))
                elif entry.name.lower().endswith(suffixes):
                    if not entry.is_file():  # a FIFO would hang a reader; skipping it would lose it
                        try:
                            what = f"a {file_kind(os.stat(entry.path).st_mode)}"
                        except OSError:
                            what = "a broken link"
                        raise ShardSpecError(f"{entry.path} is {what}, not a regular file; replace it with "
                                             f"the file, or move it out of {folder}")
                    yield relative, Path(entry.path), entry.is_symlink()


# Brace patterns: braceexpand's grammar (bash's, with its documented limits), parsed into a
# tree so that the names are counted before any is built, then generated one at a time
# (braceexpand itself turns every range into a tuple first: 1e8 names is a MemoryError).

_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_ALPHABET = string.ascii_uppercase + string.ascii_lowercase
_ESCAPED = re.compile(r"\\(.)")


@dataclass(frozen=True)
class _IntRange:
    values: range
    format: str


# A parsed pattern is a tuple of parts, each a literal str, an _IntRange, or a list of
# alternatives (each itself a parsed pattern).
_Parts = tuple


def brace_names(pattern: str, what: str, limit: int = MAX_PATTERN_NAMES) -> tuple[int, Iterator[str]]:
    """(how many names, the names in order) of a brace pattern, exactly as braceexpand gives
    them; over `limit` names (or unparseable) is a ShardSpecError naming `what` and the count."""
    try:
        parts = _parse_pattern(pattern)
        count = _count(parts)
        escapes = "\\" in pattern
        if not escapes:  # folding would change where braceexpand unescapes (once per level)
            parts = _fixed(parts)
    except UnbalancedBracesError as error:
        raise ShardSpecError(f"{what}: {error}") from None
    except RecursionError:
        raise ShardSpecError(f"{what}: braces nested too deeply to expand") from None
    if count > limit:
        raise ShardSpecError(f"{what}: the brace pattern names {count:,} files, over the limit of "
                             f"{limit:,}; name a folder or a glob instead, or split the input into "
                             "several jobs")

    def names() -> Iterator[str]:
        try:
            yield from _expand_level(parts, escapes)
        except RecursionError:
            raise ShardSpecError(f"{what}: braces nested too deeply to expand") from None

    return count, names()


def _parse_pattern(pattern: str) -> _Parts:
    start = position = depth = 0
    parts: list = []
    while position < len(pattern):
        char = pattern[position]
        if char == "\\":
            position += 2
            continue
        if char == "{":
            if depth == 0 and position > start:
                parts.append(pattern[start:position])
                start = position
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                expression = pattern[start + 1:position]
                item = _parse_expression(expression)
                if item is None:  # not a range or a list: literal braces around it
                    parts.extend(["{", [_parse_pattern(expression)], "}"])
                else:
                    parts.append(item)
                start = position + 1
        position += 1
    if depth != 0:
        raise UnbalancedBracesError(f"Unbalanced braces: '{pattern}'")
    if start < position:
        parts.append(pattern[start:])
    return tuple(parts)


def _parse_expression(expression: str):
    found = _INT_RANGE.match(expression)
    if found:
        first, last, step = found.groups()
        padded = any(s.startswith(("0", "-0")) for s in (first, last) if s not in ("0", "-0"))
        width = max(len(first), len(last)) if padded else 0
        step_size = (int(step) or 1) if step else 1
        low, high = int(first), int(last)
        values = range(low, high + 1, step_size) if low < high else range(low, high - 1, -step_size)
        return _IntRange(values, f"%0{width}d")
    found = _CHAR_RANGE.match(expression)
    if found:
        first, last, step = found.groups()
        step_size = (int(step) or 1) if step else 1
        low, high = _ALPHABET.index(first), _ALPHABET.index(last)
        if low < high:
            chars = _ALPHABET[low:high + 1:step_size]
        else:
            chars = _ALPHABET[low:(high or -len(_ALPHABET)) - 1:-step_size]
        return [(char,) for char in chars]
    return _parse_sequence(expression)


def _parse_sequence(sequence: str) -> list[_Parts] | None:
    start = position = depth = 0
    alternatives: list[_Parts] = []
    while position < len(sequence):
        char = sequence[position]
        if char == "\\":
            position += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            alternatives.append(_parse_pattern(sequence[start:position]))
            start = position + 1
        position += 1
    if depth != 0 or not alternatives:
        return None
    alternatives.append(_parse_pattern(sequence[start:]))
    return alternatives


def _count(parts: _Parts) -> int:
    total = 1
    for part in parts:
        if isinstance(part, _IntRange):
            total *= len(part.values)
        elif isinstance(part, list):
            total *= sum(_count(alternative) for alternative in part)
    return total


def _fixed(parts: _Parts) -> _Parts:
    """The parts with every single-choice part made a literal, literals merged and nested
    lists of alternatives flattened, so that generating a name recurses once per real
    choice, not once per brace."""
    merged: list = []

    def put(piece) -> None:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)

    for part in parts:
        if isinstance(part, list) and len(part) == 1:
            for piece in _fixed(part[0]):
                put(piece)
        elif isinstance(part, list):
            alternatives: list[_Parts] = []
            for alternative in map(_fixed, part):
                if len(alternative) == 1 and isinstance(alternative[0], list):
                    alternatives.extend(alternative[0])
                else:
                    alternatives.append(alternative)
            put(alternatives)
        elif isinstance(part, _IntRange) and len(part.values) == 1:
            put(part.format % part.values[0])
        else:
            put(part)
    return tuple(merged)


def _expand_level(parts: _Parts, escapes: bool) -> Iterator[str]:
    """The names of one level of the pattern; braceexpand unescapes each level's names."""
    for name in _expand(parts, escapes):
        yield _ESCAPED.sub(r"\1", name) if escapes else name


def _expand(parts: _Parts, escapes: bool, index: int = 0) -> Iterator[str]:
    if index == len(parts):
        yield ""
        return
    part = parts[index]
    if isinstance(part, str):
        heads: Iterator[str] = iter((part,))
    elif isinstance(part, _IntRange):
        heads = (part.format % value for value in part.values)
    else:
        heads = (name for alternative in part for name in _expand_level(alternative, escapes))
    for head in heads:
        for tail in _expand(parts, escapes, index + 1):
            yield head + tail
