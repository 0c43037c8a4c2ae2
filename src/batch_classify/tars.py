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
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import UnbalancedBracesError, braceexpand

from batch_classify.labels import parse_imagenet_label
from batch_classify.limits import Limits, NotRegularFile, open_regular

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


def iter_tar(path: str | os.PathLike, rel: str, image_suffixes: Sequence[str] = IMAGE_SUFFIXES,
             label_key: str | None = None, read_images: bool = True,
             limits: Limits | None = None) -> Iterator[ShardSample]:
    """Samples of one tar, in tar order; every tar yields at least one record.

    Error types: NotATar, NotRegularFile, TruncatedShard, CorruptShard (a bad header or bad
    compressed data after the start), ShardTooLarge, MissingImage, DuplicateMember,
    NotRegularMember, FileTooLarge, SplitSample, BadLabel, EmptyShard. See the module
    docstring for the rules.
    """
    limits = limits or Limits()
    reader = _TarReader(rel, frozenset(s.lower().lstrip(".") for s in image_suffixes),
                        label_key, read_images, limits)
    try:
        file = open_regular(path)
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
            self.pending = self.raw.read(COMPRESSED_CHUNK)
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

def expand_shards(spec: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The tar files that `spec` names: one file, a folder (recursively: *.tar, *.tar.gz, *.tgz,
    hidden names skipped, symlinked folders not followed, sorted by relative path), a glob
    (sorted), or a brace pattern (in the order written; may contain globs). A relative spec is
    taken relative to `root` (default: the current directory). Raises ShardSpecError."""
    path = _resolve(spec, root)
    if path.is_dir():
        found = sorted(_scan_folder(path), key=lambda item: item[0])
        if not found:
            raise ShardSpecError(f"shard spec {spec!r}: folder {str(path)!r} holds no "
                                 f"{', '.join(SHARD_SUFFIXES)} files")
        return [tar for _, tar in found]
    if path.is_file():
        return [path]
    if not is_pattern(str(path)):
        raise ShardSpecError(f"shard spec {spec!r}: {str(path)!r} does not exist")
    try:
        expanded = list(dict.fromkeys(braceexpand(str(path))))
    except UnbalancedBracesError as error:
        raise ShardSpecError(f"shard spec {spec!r}: {error}") from None
    tars: list[Path] = []
    missing: list[str] = []
    listings: dict[str, set[str]] = {}
    for name in expanded:
        if glob.has_magic(name):
            tars.extend(Path(match) for match in sorted(glob.glob(name, recursive=True)))
        elif _exists(name, listings):
            tars.append(Path(name))
        else:
            missing.append(name)
    if missing:
        raise ShardSpecError(f"shard spec {spec!r}: {len(missing)} of the {len(expanded)} files it names "
                             f"do not exist, e.g. {missing[0]!r}")
    tars = list(dict.fromkeys(tars))
    if not tars:
        raise ShardSpecError(f"shard spec {spec!r} matches no files")
    return tars


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


def _scan_folder(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every shard file under `folder`, by scandir without stat."""
    pending = [(folder, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                relative = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), relative + "/"))
                elif entry.name.lower().endswith(SHARD_SUFFIXES) and entry.is_file():
                    yield relative, Path(entry.path)


def _exists(name: str, listings: dict[str, set[str]]) -> bool:
    """Whether file `name` exists, by listing its folder once: one scandir for a whole brace
    range instead of a stat per shard (stat storms hurt parallel filesystems)."""
    folder, _, basename = name.rpartition(os.sep)
    folder = folder or ("." if not name.startswith(os.sep) else os.sep)
    if folder not in listings:
        try:
            with os.scandir(folder) as entries:
                listings[folder] = {entry.name for entry in entries}
        except (FileNotFoundError, NotADirectoryError):
            listings[folder] = set()
    return basename in listings[folder]
