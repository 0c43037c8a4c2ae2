"""``data.path`` as a URL: what it names in the store (``Found``), and the objects a prefix, a
glob or a brace pattern names, with their sizes from the store's paginated listing (no object
is read). The kinds that read from a URL (``InputKind.urls``) build on these."""

from __future__ import annotations

import glob
import io
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path

from batch_classify.core.config import DataConfig
from batch_classify.core.storage import (
    ObjectInfo,
    Store,
    identity,
    is_folder_marker,
    is_url,
    problem_of,
    side_mistake,
    store_for,
    unnamable,
)
from batch_classify.inputs.base import (
    HF_MARKERS,
    SPARK_MARKERS,
    Found,
    InputError,
    TopLevel,
    is_image,
    is_tar_name,
)
from batch_classify.inputs.tars import ShardSearch, ShardSpecError, brace_names, is_pattern


def store_of(cfg: DataConfig) -> Store:
    return store_for(cfg.path, cfg.storage_options)


def _refused(error: BaseException, cfg: DataConfig) -> InputError | None:
    """A missing bucket or a refusal of the input's store, as one line naming it (input side)."""
    mistake = side_mistake(error, {"data.path": cfg.path})
    return None if mistake is None else InputError(str(mistake))


def url_pattern(url: str) -> bool:
    """Whether a URL is a glob or brace pattern (its scheme and host aside)."""
    return is_pattern(url.split("://", 1)[1])


def url_root(spec: str, is_file: bool) -> str:
    """The URL that ids are relative to: a prefix itself, an object's parent, or a pattern's
    longest prefix before its first wildcard or brace."""
    if url_pattern(spec):
        head, rest = spec.split("://", 1)
        first = min(i for i, char in enumerate(rest) if char in "*?[{")
        return f"{head}://{posixpath.dirname(rest[:first])}"
    return spec.rsplit("/", 1)[0] if is_file else spec.rstrip("/")


def relative(url: str, root: str) -> str:
    """``url``'s key below ``root``, as written: one separator dropped, never more (the keys
    ``a//b`` and ``a/b`` are two objects)."""
    rest = url[len(root):]
    return rest[1:] if rest.startswith("/") and not root.endswith("/") else rest


def skipped(rel: str, prefixes: tuple[str, ...] = (".",)) -> bool:
    """Whether a key below a prefix is left out as a local file would be: a part of it starts
    with one of ``prefixes`` (a hidden name). The parts ``.`` and ``..`` hide nothing: in a key
    they are names like any other, read as written."""
    return any(part.startswith(prefixes) and part not in (".", "..") for part in rel.split("/"))


def check_nameable(cfg: DataConfig, urls: Iterable[str]) -> None:
    """Refuse, in one line, an object that the store's client would read as another one."""
    for url in urls:
        why = unnamable(url, cfg.storage_options)
        if why is not None:
            raise InputError(f"data.path {cfg.path}: the object {url} cannot be read: {why}; rename it, "
                             "or copy it to a key without that")


def found_url(cfg: DataConfig) -> Found:
    """What a URL names, for ``detect``: a pattern (its first name), an object, or a prefix
    (its top level from one listing)."""
    path = Path(cfg.path.split("://", 1)[1])  # its name and suffix, for the kinds' detect
    if url_pattern(cfg.path):
        try:
            first = next(brace_names(cfg.path, f"data.path {cfg.path!r}")[1], cfg.path)
        except ShardSpecError as error:
            raise InputError(str(error)) from None
        return Found(cfg, path, False, False, first)
    store = store_of(cfg)
    try:
        info = store.info(cfg.path)
    except FileNotFoundError as error:
        raise _refused(error, cfg) or InputError(
            f"data.path {cfg.path} does not exist (no object or prefix of that name)") from None
    except PermissionError as error:
        raise _refused(error, cfg) or InputError(f"data.path {cfg.path}: {error}") from None
    found = Found(cfg, path, True, info.get("type") == "file", None)
    if not found.is_file:
        found.top = _top_level(store, cfg.path)
    return found


def _top_level(store: Store, url: str) -> TopLevel:
    top = TopLevel()
    listed = store.path(url).rstrip("/")
    entries = store.call(url, lambda: store.fs.ls(listed, detail=True))
    for entry in entries:
        if entry["name"].rstrip("/") == listed or entry.get("type") != "directory" and is_folder_marker(
                entry.get("Key", entry["name"]), entry.get("size")):
            continue  # the prefix's own marker (``val/``), or a folder's beside it (``n01_$folder$``)
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".") or name in SPARK_MARKERS:
            continue
        top.hf_markers = top.hf_markers or name in HF_MARKERS
        top.parquet_files = top.parquet_files or name.lower().endswith(".parquet")
        top.tars = top.tars or is_tar_name(name)
        if entry.get("type") == "directory":
            top.first_folder = name if top.first_folder is None else min(top.first_folder, name)
        else:
            top.only_folders = False
    return top


def expand_urls(cfg: DataConfig, search: ShardSearch, notes: list[str]) -> tuple[str, dict[str, ObjectInfo]]:
    """(root, {url: identity}) of the objects data.path names: one object; a prefix (every
    object under it whose name ends in the search's suffixes, skipping names that start with
    its skip prefixes, in name order); a glob; or a brace pattern (in the order written, globs
    allowed). Each object is named once. Sizes and ETags come from the listing."""
    spec, store = cfg.path, store_of(cfg)
    what = f"data.path {spec!r}"
    try:
        if url_pattern(spec):
            found = _pattern(store, spec, what, notes)
            check_nameable(cfg, found)
            return url_root(spec, False), found
        check_nameable(cfg, [spec])
        info = store.info(spec)
    except FileNotFoundError as error:
        raise _refused(error, cfg) or InputError(f"{what}: no object or prefix of that name") from None
    except (PermissionError, ShardSpecError) as error:
        raise _refused(error, cfg) or InputError(f"{what}: {error}") from None
    if info.get("type") == "file":
        return url_root(spec, True), {spec: identity(store.protocol, info)}
    root = url_root(spec, False)
    found = {url: pin for url, pin in store.find_objects(root).items()
             if url.lower().endswith(search.suffixes)
             and not skipped(relative(url, root), search.skip_prefixes)}
    if not found:
        raise InputError(f"{what}: no {', '.join(search.suffixes)} objects under it")
    check_nameable(cfg, found)
    return root, found


def _pattern(store: Store, spec: str, what: str, notes: list[str]) -> dict[str, ObjectInfo]:
    count, names = brace_names(spec, what)
    found: dict[str, ObjectInfo] = {}
    listings: dict[str, dict[str, ObjectInfo]] = {}
    missing, first_missing, repeats = 0, "", 0
    for name in names:
        if glob.has_magic(name.split("://", 1)[1]):
            matches = store.glob_objects(name)
        else:
            parent = name.rsplit("/", 1)[0]
            if parent not in listings:  # one listing per prefix, not a HEAD per name
                listings[parent] = _listing(store, parent)
            pin = listings[parent].get(name)
            if pin is None and store.protocol in ("http", "https"):
                pin = _head(store, name)
            matches = {} if pin is None else {name: pin}
            if not matches:
                missing += 1
                first_missing = first_missing or name
        for url, pin in matches.items():
            if url in found:
                repeats += 1
            found[url] = pin
    if missing:
        raise ShardSpecError(f"{missing} of the {count} objects it names do not exist, "
                             f"e.g. {first_missing!r}")
    if not found:
        raise ShardSpecError("matches no objects")
    if repeats:
        notes.append(f"{what} names {repeats} object(s) a second time; each is read once")
    return found


def _listing(store: Store, prefix: str) -> dict[str, ObjectInfo]:
    if store.protocol in ("http", "https"):
        return {}  # no listing over plain HTTP: each name is asked for
    try:
        found = store.ls_objects(prefix)
    except FileNotFoundError as error:
        if problem_of(error) == "missing bucket":
            raise  # not a missing object: the whole pattern's bucket
        return {}
    return {url: pin for url, pin in found.items() if not is_folder_marker(url, pin.size)}


def _head(store: Store, url: str) -> ObjectInfo | None:
    try:
        return store.object_info(url)
    except FileNotFoundError:
        return None


def object_images(cfg: DataConfig) -> tuple[str, list[tuple[str, ObjectInfo]]]:
    """(root, (each image object under it relative to it, its identity), in path order) from
    one paginated listing: no object is read. Names with a part starting with '.' are
    skipped, as local hidden files are; folder markers are no images."""
    root = cfg.path.rstrip("/")
    names = []
    for url, pin in store_of(cfg).find_objects(root).items():
        rel = relative(url, root)
        if is_image(rel.rsplit("/", 1)[-1]) and not skipped(rel):
            check_nameable(cfg, [url])
            names.append((rel, pin))
    return root, names


class PrefixIdentities:
    """The identity of objects named one by one (a list of URLs), from one listing per prefix
    (never a HEAD per object where the store lists): the last ``KEEP`` prefixes' listings are
    held, so lines grouped by prefix list each prefix once."""

    KEEP = 4

    def __init__(self, store: Store) -> None:
        self.store = store
        self.listings: dict[str, dict[str, ObjectInfo]] = {}

    def __call__(self, url: str) -> ObjectInfo | None:
        if self.store.protocol in ("http", "https"):
            return _head(self.store, url)
        parent = url.rsplit("/", 1)[0]
        if parent not in self.listings:
            if len(self.listings) >= self.KEEP:
                self.listings.pop(next(iter(self.listings)))
            self.listings[parent] = _listing(self.store, parent)
        return self.listings[parent].get(url)


def object_lines(cfg: DataConfig, pin: ObjectInfo | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text object: a list of image URLs or keys (of the version
    ``pin`` where given)."""
    try:
        text = store_of(cfg).read(cfg.path, pin).decode("utf-8-sig")
    except (FileNotFoundError, PermissionError) as error:
        raise InputError(f"data.path {cfg.path}: {error}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"data.path {cfg.path}: not UTF-8 text ({error.reason}); save the list as UTF-8"
                         ) from None
    for number, line in enumerate(io.StringIO(text, newline=""), 1):  # lines end as a local list's do
        line = line.strip()
        if line and not line.startswith("#"):
            if "\0" in line:
                raise InputError(f"data.path {cfg.path}, line {number}: a NUL byte: this is not a text "
                                 "list of image paths (data.kind: file_list)")
            yield number, line


def check_url_kind(kind_name: str, reads_urls: bool, path: str) -> None:
    if is_url(path) and not reads_urls:
        raise InputError(f"data.path {path}: data.kind {kind_name} reads local paths only; from a store, "
                         "use webdataset, parquet, imagefolder, images or file_list, or copy the dataset "
                         "to a local folder")
