"""WebDataset tars (``webdataset``): one unit per tar, its samples read only by the rank that
runs it (``tars.py`` reads them, within the limits)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from batch_classify.core.config import DataConfig
from batch_classify.core.storage import ObjectInfo, is_url
from batch_classify.inputs.base import (
    Cut,
    Enumeration,
    Found,
    InputError,
    Record,
    ShardKind,
    Sizing,
    checked_last,
    is_tar_name,
    regular_file,
)
from batch_classify.inputs.objects import expand_urls, relative, store_of
from batch_classify.inputs.state import StateRecorder
from batch_classify.inputs.tars import (
    IMAGE_SUFFIXES,
    TARS,
    ShardSpecError,
    expand_shards,
    iter_tar,
    shard_root,
)

log = logging.getLogger(__name__)
_said_block_size: list[int] = []


class WebDataset(ShardKind):
    name = "webdataset"
    keys = ("label_key", "image_suffixes")
    urls = True

    @classmethod
    def detect(cls, found: Found) -> bool:
        if found.first_name is not None:
            return is_tar_name(found.first_name)
        if found.is_file:
            return is_tar_name(found.path.name)
        return found.exists and found.top.tars

    @classmethod
    def enumerate(cls, cfg: DataConfig, state: StateRecorder | None = None) -> Enumeration:
        return webdataset(cfg)

    @classmethod
    def objects_now(cls, cfg: DataConfig) -> Iterator[tuple[str, ObjectInfo]]:
        return iter(sorted(expand_urls(cfg, TARS, [])[1].items()))

    @classmethod
    def cut(cls, enumeration: Enumeration, folder: Path, sizing: Sizing) -> Cut:
        """A unit per tar; sizes are known once read."""
        n = len(enumeration.shards)
        units = {"path": [s["path"] for s in enumeration.shards], "start": [None] * n, "stop": [None] * n,
                 "offset": [None] * n, "n_items": [None] * n}
        return Cut(units, None, None, None, *cls.digests(enumeration.fingerprint_parts))

    def describe_unit(self, unit: int) -> str:
        rel = self.listing.unit_paths[unit]
        return self.shard_location(rel) if self.remote else rel

    def records(self, unit: int, read_images: bool = True) -> Iterator[Record]:
        listing = self.listing
        reader = listing.info["reader"]
        rel = listing.unit_paths[unit]
        source = self.shard_location(rel)
        url, pin, store = source, None, None
        if self.remote:  # streamed in a few large ranged GETs, each of the version listed
            store, pin = self.store(), self.pin(source)
            source = store.open(url, pin=pin)
            if not _said_block_size:
                _said_block_size.append(store.block_size)
                log.info("reading tars from %s in ranged GETs of %d MiB (data.storage_options.block_size)",
                         listing.root, store.block_size >> 20)
        records = (Record(sample.id, sample.label, sample.image, sample.error)
                   for sample in iter_tar(source, rel, reader["image_suffixes"], reader["label_key"],
                                          read_images=read_images, limits=listing.limits))
        if store is None:
            yield from records
            return
        yield from checked_last(records, lambda: store.check(url, pin))


def webdataset(cfg: DataConfig) -> Enumeration:
    """WebDataset tars: one unit each; samples are only read by the rank that runs the tar."""

    if is_url(cfg.path):
        return _tar_objects(cfg)
    root = shard_root(cfg.path)
    notes: list[str] = []
    try:
        tars = expand_shards(cfg.path, notes=notes, what="data.path")
    except ShardSpecError as error:
        hint = ("; for a folder of images set data.kind images, or imagefolder for one subfolder per "
                "class" if Path(cfg.path).is_dir() else "")
        raise InputError(f"{error} (data.kind: webdataset){hint}") from None
    for note in notes:
        log.warning(note)
    shards, parts = [], []
    named: dict[str, Path] = {}
    for tar in tars:
        rel = Path(os.path.relpath(tar, root)).as_posix()  # a symlinked tar keeps its own name
        if named.setdefault(rel, tar) is not tar:  # ids start with rel: two tars cannot share it
            raise InputError(f"data.path {cfg.path}: {str(named[rel])!r} and {str(tar)!r} are different "
                             f"files but both would be named {rel!r} in ids; name them without '..'")
        shards.append({"path": rel})
        parts.append(f"{rel}\t{regular_file(tar).st_size}")
    return _enumeration(cfg, str(root), shards, parts, [f"{len(tars)} WebDataset tar(s)", *notes])


def _tar_objects(cfg: DataConfig) -> Enumeration:
    """Tars in an object store: named from the store's listing (sizes included), never opened."""
    notes: list[str] = []
    root, objects = expand_urls(cfg, TARS, notes)
    for note in notes:
        log.warning(note)
    shards, parts = [], []
    for url, pin in objects.items():
        rel = relative(url, root)
        shards.append({"path": rel, "object": [pin.size, pin.token]})
        parts.append(f"{rel}\t{pin.size}")
    block = store_of(cfg).block_size
    notes = [f"{len(shards)} WebDataset tar(s) under {root}, read in ranged GETs of {block >> 20} MiB",
             *notes]
    return _enumeration(cfg, root, shards, parts, notes)


def _enumeration(cfg: DataConfig, root: str, shards: list[dict], parts: list[str],
                 notes: list[str]) -> Enumeration:
    suffixes = [s.lower().lstrip(".") for s in (cfg.image_suffixes or IMAGE_SUFFIXES)]
    notes = [*notes, f"labels from the .json field {cfg.label_key!r}" if cfg.label_key else
             "labels from .cls members where present (ImageNet-1k indices)"]
    return Enumeration("webdataset", root, None, notes, shards=shards,
                       reader={"image_suffixes": suffixes, "label_key": cfg.label_key},
                       fingerprint_parts=parts)
