"""What the table kinds (Parquet files, Hugging Face datasets) share: finding the image, label
and id columns, mapping label values, and turning a slice of column values into records."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from batch_classify.core.config import DataConfig
from batch_classify.core.labels import WNID, parse_imagenet_label, wnid_to_index
from batch_classify.inputs.base import InputError, Record, ShardKind


def label_map(feature: Any, column: str) -> tuple[dict[str, Any], tuple[str, ...] | None, str]:
    """(how a rank maps a raw label value, the dataset's own classes or None, a note)."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if all(WNID.match(n) for n in names):
            index = wnid_to_index()
            return ({"column": column, "mode": "lookup", "table": [index[n] for n in names]}, None,
                    f"labels from column {column!r} (wnid class names)")
        if len(names) == 1000:
            return ({"column": column, "mode": "index"}, None,
                    f"labels from column {column!r}; 1000-class ClassLabel taken as ImageNet-1k order")
        return {"column": column, "mode": "index"}, tuple(names), f"labels from column {column!r}"
    return {"column": column, "mode": "parse"}, None, f"labels from column {column!r}"


def map_label(value: Any, spec: dict[str, Any] | None) -> int | None:
    """A raw label value as the label index that ``label_map`` describes (ValueError if bad)."""
    if spec is None or value is None:
        return None
    if spec["mode"] == "parse":
        if value == -1 or value == "-1":
            return None
        return parse_imagenet_label(str(value), f"data.label_column {spec['column']!r}")
    value = int(value)
    if value < 0:
        return None
    return spec["table"][value] if spec["mode"] == "lookup" else value

def find_columns(features: Any, cfg: DataConfig, where: str) -> tuple[str, str | None, Any]:
    """(image column, label column or None, the datasets.Image feature or None) of a table."""
    import datasets

    image_column = cfg.image_column
    if image_column is None:
        typed = [name for name, f in features.items() if isinstance(f, datasets.Image)]
        image_column = typed[0] if len(typed) == 1 else "image"
    if image_column not in features:
        raise InputError(f"data.image_column {image_column!r} is not a column of {where} "
                         f"(columns: {list(features)})")
    label_column = cfg.label_column
    if label_column is None and "label" in features:
        label_column = "label"
    if label_column is not None and label_column not in features:
        raise InputError(f"data.label_column {label_column!r} is not a column of {where} "
                         f"(columns: {list(features)})")
    if cfg.id_column is not None and cfg.id_column not in features:
        raise InputError(f"data.id_column {cfg.id_column!r} is not a column of {where} "
                         f"(columns: {list(features)})")
    return image_column, label_column, features[image_column]

class TableKind(ShardKind):
    """Rows of a table: an image cell (bytes, a path, or a {bytes, path} struct), a label cell
    mapped as the listing's reader says, and an id column or the row's index."""

    keys = ("image_column", "label_column", "id_column")

    def _labels(self, values: list[Any], ids: list[str]) -> Iterator[tuple[int | None, str | None]]:
        spec = self.listing.info["reader"]["label"]
        for value, item_id in zip(values, ids):
            try:
                yield map_label(value, spec), None
            except (ValueError, IndexError, TypeError) as error:
                yield None, f"BadLabel: item {item_id}: {error}"

    @staticmethod
    def _payload(value: Any, folder: str) -> str | bytes | None:
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            return value if os.path.isabs(value) else os.path.join(folder, value)
        return None

    def emit(self, values: list[Any] | None, ids: list[str], labels: list[Any],
             folder: str) -> Iterator[Record]:
        """Records of a slice of rows (``values`` None: ids and labels only); relative paths in
        image cells are relative to ``folder``."""
        if values is None:  # ids and labels only
            for item_id, (label, error) in zip(ids, self._labels(labels, ids)):
                yield Record(item_id, label, None, error)
            return
        limit = self.listing.limits.max_image_bytes
        for value, item_id, (label, error) in zip(values, ids, self._labels(labels, ids)):
            payload = self._payload(value, folder)
            if payload is None and error is None:
                error = f"MissingImage: row {item_id} has neither image bytes nor a path"
            if isinstance(payload, bytes) and len(payload) > limit:
                payload, error = None, (f"FileTooLarge: row {item_id}: the image cell is {len(payload)} "
                                        f"bytes, over runtime.max_image_bytes ({limit})")
            yield Record(item_id, label, payload, error)
