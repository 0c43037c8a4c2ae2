"""Hugging Face datasets (``hf``): a ``save_to_disk`` folder, a file ``datasets`` loads, or a
dataset name on the hub; units are row ranges, read by the rank that runs them."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batch_classify.core.config import DataConfig
from batch_classify.inputs.base import (
    CHUNK_ROWS,
    HF_MARKERS,
    Cut,
    Enumeration,
    Found,
    InputError,
    Record,
    Repeats,
    Sizing,
    row_units,
)
from batch_classify.inputs.columns import TableKind, find_columns, label_map
from batch_classify.inputs.state import StateRecorder

HF_SLICE = 256
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class HuggingFace(TableKind):
    name = "hf"
    keys = (*TableKind.keys, "split")
    handles = ("_dataset",)

    def __init__(self, listing) -> None:
        super().__init__(listing)
        self._dataset = None

    @classmethod
    def detect(cls, found: Found) -> bool:
        if not found.exists:  # a dataset name that datasets.load_dataset resolves
            return found.first_name is None and bool(HUB_ID.match(found.cfg.path)) and \
                not found.cfg.path.startswith(".")
        return not found.is_file and found.top.hf_markers

    @classmethod
    def enumerate(cls, cfg: DataConfig, state: StateRecorder | None = None) -> Enumeration:
        return hf_dataset(cfg)

    @classmethod
    def record_state(cls, enumeration: Enumeration, state: StateRecorder) -> None:
        if os.path.isdir(enumeration.root):  # a save_to_disk folder: its few files
            for parent, _, names in os.walk(enumeration.root):
                for name in sorted(names):
                    state.file(os.path.join(parent, name))

    @classmethod
    def cut(cls, enumeration: Enumeration, folder: Path, sizing: Sizing) -> Cut:
        n_items = enumeration.shards[0]["rows"]
        size = sizing.size(n_items)
        return Cut(row_units(n_items, size), n_items, None if enumeration.reader["label"] else 0, size,
                   *cls.digests(enumeration.fingerprint_parts))

    def describe_unit(self, unit: int) -> str:
        units = self.listing.units
        return f"rows {int(units['start'][unit])}-{int(units['stop'][unit]) - 1}"

    def records(self, unit: int, read_images: bool = True) -> Iterator[Record]:
        listing = self.listing
        reader = listing.info["reader"]
        if self._dataset is None:
            import datasets

            known = {f.name for f in dataclasses.fields(DataConfig)}
            dataset = hf_load(DataConfig(**{k: v for k, v in listing.info["data"].items() if k in known}))
            if reader["decode_off"]:
                dataset = dataset.cast_column(reader["image_column"], datasets.Image(decode=False))
            self._dataset = dataset
        label_column = reader["label"]["column"] if reader["label"] else None
        start, stop = int(listing.units["start"][unit]), int(listing.units["stop"][unit])
        for low in range(start, stop, HF_SLICE):
            rows = self._dataset[low:min(stop, low + HF_SLICE)]
            n = len(rows[reader["image_column"]])
            ids = ([str(v) for v in rows[reader["id_column"]]] if reader["id_column"]
                   else [str(i) for i in range(low, low + n)])
            labels = rows[label_column] if label_column else [None] * n
            yield from self.emit(rows[reader["image_column"]], ids, labels, os.getcwd())


def hf_load(cfg: DataConfig):
    """The Hugging Face dataset (one split), memory-mapped, its image column left encoded."""
    import datasets

    path = Path(cfg.path)
    if path.is_file() and path.suffix.lower() not in {".parquet", ".arrow"}:
        raise InputError(f"data.path {path} is a file that data.kind hf cannot load: give a folder written "
                         "by save_to_disk, a .parquet file or a dataset name on the hub (or set data.kind "
                         "to what the file is)")
    try:
        if path.is_dir() and any((path / marker).exists() for marker in HF_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():  # data.kind: hf asked for explicitly
            loaded = datasets.load_dataset(path.suffix.lower().lstrip("."), data_files=str(path))
        else:
            loaded = datasets.load_dataset(cfg.path, split=cfg.split)
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = "a local path" if path.exists() else "not a local path, and"
        raise InputError(f"data.path {cfg.path!r}: {where} datasets could not load it as a dataset "
                         f"({type(error).__name__}: {first})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if cfg.split is not None:
            if cfg.split not in loaded:
                raise InputError(f"data.split {cfg.split!r} not in the dataset's splits {splits}")
            loaded = loaded[cfg.split]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        elif "validation" in loaded:
            loaded = loaded["validation"]
        else:
            raise InputError(f"data.split: the dataset has splits {splits}; choose one")
    return loaded


def _check_dataset_ids(dataset: Any, column: str) -> list[str]:
    """As _check_parquet_ids, for a Hugging Face dataset: nulls over every row (the Arrow
    column's null count), repeats over the first Repeats.LIMIT rows."""
    ids = dataset.select_columns([column])
    upto = min(len(ids), Repeats.LIMIT)

    def id_rows(start: int = 0, stop: int = upto) -> Iterator[tuple[int, Any]]:
        for low in range(start, stop, CHUNK_ROWS):
            for offset, value in enumerate(ids[low:min(stop, low + CHUNK_ROWS)][column]):
                yield low + offset, value

    def null(row: int) -> InputError:
        return InputError(f"data.id_column {column!r}: row {row} of the dataset has no id (null); fill "
                          "the column, or drop data.id_column to number the rows instead")

    repeats = Repeats()
    for row, value in id_rows():
        if value is None:
            raise null(row)
        key = str(value)
        if repeats.candidate(key):
            first = next((r for r, v in id_rows() if v is not None and str(v) == key and r != row), None)
            if first is not None:
                raise InputError(f"data.id_column {column!r}: id {key!r} is on row {first} and again on row "
                                 f"{row}; ids must be unique: choose another column, or drop "
                                 "data.id_column to number the rows instead")
    if upto == len(ids):
        return []
    if getattr(dataset, "_indices", None) is None and dataset.data.column(column).null_count == 0:
        return [f"repeated ids checked over the first {Repeats.LIMIT} rows only; nulls in all"]
    for row, value in id_rows(upto, len(ids)):
        if value is None:
            raise null(row)
    return [f"repeated ids checked over the first {Repeats.LIMIT} rows only; nulls in all"]


def hf_dataset(cfg: DataConfig) -> Enumeration:
    """A Hugging Face dataset: units are row ranges, read by the rank that runs them."""
    import datasets

    dataset = hf_load(cfg)
    image_column, label_column, feature = find_columns(dataset.features, cfg, "the dataset")
    reader: dict[str, Any] = {"image_column": image_column, "id_column": cfg.id_column, "label": None,
                              "decode_off": isinstance(feature, datasets.Image)}
    classes, notes = None, [f"Hugging Face dataset, image column {image_column!r}"]
    if label_column is not None:
        reader["label"], classes, note = label_map(dataset.features[label_column], label_column)
        notes.append(note)
    if cfg.id_column is not None:
        notes += _check_dataset_ids(dataset, cfg.id_column)
    shards = [{"path": "", "rows": len(dataset)}]
    return Enumeration("hf", cfg.path, classes, notes, shards=shards, reader=reader,
                       fingerprint_parts=[str(getattr(dataset, "_fingerprint", "")), str(len(dataset))])
