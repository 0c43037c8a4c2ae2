"""A text file naming one image per line (``file_list``), relative to the file's folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from batch_classify.core.config import DataConfig
from batch_classify.core.secrets import redact_url
from batch_classify.core.storage import ObjectInfo, canonical_url, is_url, join, unnamable
from batch_classify.inputs.base import Enumeration, Found, InputError, Repeats, chunked
from batch_classify.inputs.listed import ListedKind
from batch_classify.inputs.objects import PrefixIdentities, object_lines, store_of
from batch_classify.inputs.state import StateRecorder

LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})


class FileList(ListedKind):
    """Unlabelled images named one per line; ids are the lines as written."""

    name = "file_list"
    folder = False
    urls = True

    @classmethod
    def detect(cls, found: Found) -> bool:
        return found.is_file and found.path.suffix.lower() in LIST_SUFFIXES

    @classmethod
    def enumerate(cls, cfg: DataConfig, state: StateRecorder | None = None) -> Enumeration:
        if is_url(cfg.path):
            return object_list(cfg, state)
        path = Path(cfg.path)
        if state is not None:
            state.file(os.path.realpath(path))
        return file_list(path)

    @classmethod
    def named_by_id(cls, data_path: Path) -> Path | None:
        return super().named_by_id(data_path.parent)

    @classmethod
    def objects_now(cls, cfg: DataConfig) -> Iterator[tuple[str, ObjectInfo]]:
        """The list object, then each object it names in line order (one listing per prefix)."""
        store = store_of(cfg)
        pin = store.object_info(cfg.path, fresh=True)
        yield cfg.path, pin
        identities, root = PrefixIdentities(store), cfg.path.rsplit("/", 1)[0]
        for _, line in object_lines(cfg, pin):
            url = line if is_url(line) else join(root, line)
            found = identities(url) if url.startswith(store.protocol + "://") else None
            if found is not None:
                yield url, found


def utf8_lines(handle, path: Path, key: str = "data.path", noun: str = "list") -> Iterator[str]:
    """The lines of a text file opened as UTF-8; bytes that are not UTF-8 are an InputError."""
    try:
        yield from handle
    except UnicodeDecodeError as error:
        raise InputError(f"{key} {path}: not UTF-8 text ({error.reason}); save the {noun} as UTF-8"
                         ) from None


def open_text(path: Path, key: str, what: str):
    """A text file opened as UTF-8 (a leading byte-order mark dropped), or a one-line InputError."""
    if path.is_dir():
        raise InputError(f"{key} {path} is a folder, not {what}")
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise InputError(f"{key} {path} does not exist") from None
    except OSError as error:
        raise InputError(f"{key} {path} cannot be read ({error.strerror})") from None


class Spellings:
    """One spelling per file for the same-file checks: `x`, `./x`, `d/../x`, `//x` and the
    absolute path, relative to `root` or not, through a symlinked folder or not. Each folder
    is resolved once (a small cache), never each file: a symlinked file is not resolved."""

    CACHE = 65_536

    def __init__(self, root: Path):
        self.root = os.path.abspath(root)
        self.real_root = os.path.realpath(root)
        self.folders: dict[str, str] = {}

    def key(self, name: str) -> str:
        """The file's absolute path, its folder resolved."""
        folder, basename = os.path.split(os.path.join(self.root, name))
        if basename in ("", ".", ".."):
            return os.path.realpath(os.path.join(self.root, name))
        real = self.folders.get(folder)
        if real is None:
            if len(self.folders) >= self.CACHE:
                self.folders.clear()
            real = self.folders[folder] = os.path.realpath(folder)
        return os.path.join(real, basename)

    def relative(self, name: str) -> str:
        """`name` as a path relative to root where the file lies under it, else absolute."""
        key = self.key(name)
        if key.startswith(self.real_root.rstrip(os.sep) + os.sep):
            return Path(key[len(self.real_root.rstrip(os.sep)) + 1:]).as_posix()
        if not os.path.isabs(name) and ".." not in Path(name).parts:  # under a symlinked subfolder
            return Path(os.path.normpath(name)).as_posix()
        return os.path.normpath(os.path.join(self.root, name))


def refuse_unnamable(list_path: Path | str, number: int, line: str, why: str | None) -> None:
    if why is not None:
        raise InputError(f"data.path {list_path}, line {number}: {line!r} cannot be read ({why}); rename "
                         "the object, or copy it to a key without that")


def refuse_credentials(list_path: Path | str, number: int, line: str) -> None:
    """A line naming a URL with credentials in it: the listing and the rows would save them."""
    if is_url(line) and redact_url(line) != line:
        raise InputError(f"data.path {redact_url(str(list_path))}, line {number}: {redact_url(line)!r} "
                         "carries credentials (a password or a signed query) that the listing and the "
                         "prediction rows would save; list the objects by plain URL or key, and give the "
                         "credentials in data.storage_options or the store's environment")


def file_list(list_path: Path) -> Enumeration:
    """Unlabelled images named one per line in a text file (relative to the file's folder).
    Ids are the lines as written (stripped); a file named twice, in any spelling, is refused."""
    root = list_path.parent
    notes: list[str] = []
    spellings = Spellings(root)
    open_text(list_path, "data.path", "a text file of image paths (data.kind: file_list); for a "
               "folder of images set data.kind images, or imagefolder for one subfolder per class").close()

    def entries() -> Iterator[tuple[int, str]]:
        with open_text(list_path, "data.path", "a text file of image paths") as handle:
            for number, line in enumerate(utf8_lines(handle, list_path), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if "\0" in line:
                    raise InputError(f"data.path {list_path}, line {number}: a NUL byte: this is not a text "
                                     "list of image paths (data.kind: file_list)")
                if is_url(line):
                    refuse_credentials(list_path, number, line)
                    refuse_unnamable(list_path, number, line, unnamable(line))
                yield number, line

    def rows() -> Iterator[tuple[str, None, str | None]]:
        repeats = Repeats()
        for number, line in entries():
            if repeats.checking:
                key = spellings.key(line)
                if repeats.candidate(key):
                    first = next(((n, text) for n, text in entries()
                                  if n < number and spellings.key(text) == key), None)
                    if first is not None:
                        again = (f"{line!r} is listed twice (again on line {number}), first on line "
                                 f"{first[0]}" if first[1] == line else
                                 f"line {number} {line!r} and line {first[0]} {first[1]!r} name the "
                                 "same file")
                        raise InputError(f"data.path {list_path}: {again}; list each file once")
                if not repeats.checking:
                    notes.append(f"repeated files checked for the first {Repeats.LIMIT} lines only")
            yield line, None, line if os.path.isabs(line) or is_url(line) else None

    return Enumeration("file_list", str(root), notes=notes, rows=chunked(rows()))


def object_list(cfg: DataConfig, state: StateRecorder | None = None) -> Enumeration:
    """A list that is itself an object: lines are URLs, or keys relative to the list's prefix,
    named as a local list names files (``./x``, ``x//y`` and ``d/../x`` are ``x``, ``x/y`` and
    ``x``; ``s3a://`` is ``s3://``). Ids are the lines as written; an object named twice, in any
    spelling, is refused. The list and each object it names (in this store) are recorded with
    their identities, from one listing per prefix; the reads are pinned to them."""
    root = cfg.path.rsplit("/", 1)[0]
    notes: list[str] = []
    store = store_of(cfg)
    try:
        pin = store.object_info(cfg.path)
    except (FileNotFoundError, PermissionError) as error:
        raise InputError(f"data.path {cfg.path}: {error}") from None
    if state is not None:
        state.object(cfg.path, pin)
    identities = PrefixIdentities(store)

    def named(number: int, line: str) -> tuple[str, str]:
        """(the URL the line names, in the line's scheme; the same in one spelling, for comparing)."""
        refuse_credentials(cfg.path, number, line)
        url = line if is_url(line) else join(root, line)
        try:
            key = canonical_url(url)
        except ValueError as error:
            raise InputError(f"data.path {cfg.path}, line {number}: {line!r} names no object ({error}); "
                             "name the objects inside the bucket") from None
        url = f"{url.split('://', 1)[0]}://{key.split('://', 1)[1]}"
        refuse_unnamable(cfg.path, number, line, unnamable(url, cfg.storage_options))
        return url, key

    def rows() -> Iterator[tuple]:
        repeats = Repeats()
        for number, line in object_lines(cfg, pin):
            url, key = named(number, line)
            if repeats.checking:
                if repeats.candidate(key):
                    first = next(((n, text) for n, text in object_lines(cfg, pin)
                                  if n < number and named(n, text)[1] == key), None)
                    if first is not None:
                        again = (f"{line!r} is listed twice (again on line {number}), first on line "
                                 f"{first[0]}" if first[1] == line else
                                 f"line {number} {line!r} and line {first[0]} {first[1]!r} name the "
                                 f"same object {key}")
                        raise InputError(f"data.path {cfg.path}: {again}; list each object once")
                if not repeats.checking:
                    notes.append(f"repeated objects checked for the first {Repeats.LIMIT} lines only")
            path = url if is_url(line) or url != join(root, line) else None
            found = identities(url) if url.startswith(store.protocol + "://") else None
            if found is None:  # gone (an error row when read) or in another store: read unpinned
                yield line, None, path
                continue
            if state is not None:
                state.object(url, found)
            yield line, None, path, found

    return Enumeration("file_list", root, notes=notes, rows=chunked(rows()))
