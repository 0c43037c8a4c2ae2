"""The input kinds, by name, and ``data.kind: auto``: which kind data.path is.

A new kind is one file with an ``InputKind`` subclass and one line in ``KINDS``.
"""

from __future__ import annotations

from pathlib import Path

from batch_classify.core.config import DataConfig
from batch_classify.core.storage import is_url
from batch_classify.inputs.base import Enumeration, Found, InputError, InputKind
from batch_classify.inputs.file_list import FileList
from batch_classify.inputs.folders import FlatFolder, ImageFolder
from batch_classify.inputs.hf import HuggingFace
from batch_classify.inputs.objects import check_url_kind, found_url
from batch_classify.inputs.parquet import Parquet
from batch_classify.inputs.state import StateRecorder
from batch_classify.inputs.tars import ShardSpecError, brace_names, is_pattern
from batch_classify.inputs.webdataset import WebDataset

KINDS: tuple[type[InputKind], ...] = (ImageFolder, FlatFolder, FileList, WebDataset, Parquet, HuggingFace)
"""Every kind, as data.kind names them."""
DETECTION = (HuggingFace, Parquet, WebDataset, FileList, ImageFolder, FlatFolder)
"""The order ``data.kind: auto`` asks them in: the first that recognises data.path is it."""
BY_NAME = {kind.name: kind for kind in KINDS}


def kind_named(name: str) -> type[InputKind]:
    try:
        return BY_NAME[name]
    except KeyError:
        raise InputError(f"data.kind {name!r} is not one of {', '.join(BY_NAME)} (or auto)") from None


def found(cfg: DataConfig) -> Found:
    if is_url(cfg.path):
        return found_url(cfg)
    path = Path(cfg.path)
    exists = path.exists()
    first_name = None
    if not exists and is_pattern(cfg.path):
        try:  # what the first name is, as `{a,b}.tar` and `{a.parquet,*.parquet}` end differently
            first_name = next(brace_names(cfg.path, f"data.path {cfg.path!r}")[1], cfg.path)
        except ShardSpecError as error:
            raise InputError(str(error)) from None
    return Found(cfg, path, exists, exists and path.is_file(), first_name)


def detect(cfg: DataConfig) -> type[InputKind]:
    """The kind that ``data.kind: auto`` resolves to."""
    seen = found(cfg)
    for kind in DETECTION:
        if kind.urls >= is_url(cfg.path) and kind.detect(seen):
            return kind
    if seen.first_name is not None:
        raise InputError(f"data.path {cfg.path}: a pattern that names neither .tar nor .parquet "
                         "files; set data.kind")
    if seen.is_file:
        raise InputError(f"data.path {seen.path}: cannot tell what kind of input this file is; set data.kind")
    raise InputError(f"data.path {cfg.path} does not exist")


def detect_kind(cfg: DataConfig) -> str:
    """The name of the kind that ``data.kind: auto`` resolves to."""
    return detect(cfg).name


def _check_fits(kind: type[InputKind], path: Path | None, cfg: DataConfig) -> None:
    """A key the kind would ignore, or a file where a folder kind is set: one line naming the fix."""
    for key in sorted({key for other in KINDS for key in other.keys}, key=_key_order):
        if getattr(cfg, key) is not None and key not in kind.keys:
            kinds = [other.name for other in KINDS if key in other.keys]
            detected = " (detected from data.path)" if cfg.kind == "auto" else ""
            raise InputError(f"data.{key} applies to data.kind {' or '.join(kinds)}, not to data.kind "
                             f"{kind.name}{detected} ({path or cfg.path}); remove it, or set data.kind")
    if path is None or not kind.folder or not path.exists() or path.is_dir():
        return
    seen = Found(cfg, path, True, True, None)
    fits = next((other.name for other in DETECTION if not other.folder and other.detect(seen)), None)
    fix = (f"for this file set data.kind {fits}" if fits else
           "point data.path at the folder of images, or set data.kind to what the file is "
           "(file_list, webdataset, parquet or hf)")
    what = "with one subfolder per class" if kind is ImageFolder else "of images"
    raise InputError(f"data.path {path} is a file, not a folder {what} (data.kind: {kind.name}); {fix}")


def _key_order(key: str) -> int:
    return list(DataConfig.__dataclass_fields__).index(key)


def resolve(cfg: DataConfig) -> type[InputKind]:
    """The kind data.* names, with the keys it reads checked against it."""
    kind = kind_named(cfg.kind) if cfg.kind != "auto" else detect(cfg)
    check_url_kind(kind.name, kind.urls, cfg.path)
    if is_url(cfg.path):
        _check_fits(kind, None, cfg)
        return kind
    path = Path(cfg.path)
    if (kind.folder or kind is FileList) and not path.exists():
        raise InputError(f"data.path {path} does not exist")
    if cfg.labels is not None and kind is not FlatFolder:
        raise InputError(f"data.labels is for a flat folder of images (data.kind: images), "
                         f"not for data.kind: {kind.name}")
    _check_fits(kind, path, cfg)
    return kind


def enumerate_input(cfg: DataConfig, state: StateRecorder | None = None) -> Enumeration:
    """Resolve ``data.*`` into the stream (or shards) the listing is written from; the folders
    walked and the files read go to ``state``."""
    enumeration = resolve(cfg).enumerate(cfg, state)
    enumeration.path = cfg.path
    return enumeration
