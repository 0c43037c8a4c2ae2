"""Compare two output folders (two models, or two runs) item by item, joined on id."""

from __future__ import annotations

import math
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from batch_classify.core.labels import imagenet_classes
from batch_classify.core.layout import MANIFEST, PREDICTIONS_DIR
from batch_classify.core.text import percent
from batch_classify.output.committed import Footer, Identity, describe_damage, first_unreadable, read_footers
from batch_classify.output.manifest import read_manifest
from batch_classify.output.units import int_column, iter_batches, top1_and_decoded, top1_names, unit_files
from batch_classify.results.report.names import model_is_imagenet, shorten

TOP_CLASSES = 10


BUCKET_ROWS = 1_000_000
"""Rows per hash bucket when units of the two folders hold different ids and the join goes
through temporary files."""

JOIN_COLUMNS = ["id", "target", "topk_ids", "topk_labels", "error"]


class CompareError(RuntimeError):
    """A folder cannot be compared; the message says which and why."""


@dataclass
class Side:
    """One output folder: its manifest, unit files with their row counts and footer id keys, and
    the model's class names as its rows are read."""

    folder: Path
    manifest: dict[str, Any]
    files: dict[int, Path]
    rows: dict[int, int]
    keys: dict[int, tuple[int, str]]
    """(rows, id digest) of each unit whose footer carries them."""
    suffix: str
    named: dict[int, tuple[int, str]] = field(default_factory=dict)
    """Top-1 index -> (unit, name the model gave it there): the last row of the highest unit
    read wins, whatever order the units are read in. Bounded by the classes."""

    @property
    def n(self) -> int:
        return sum(self.rows.values())

    @property
    def names(self) -> dict[int, str]:
        return {index: name for index, (_, name) in self.named.items()}

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([("id", pa.string()), (f"target_{self.suffix}", pa.int64()),
                          (f"top1_{self.suffix}", pa.int64()), (f"decoded_{self.suffix}", pa.bool_())])

    def batches(self, unit: int) -> Iterator[pa.RecordBatch]:
        """(id, target, top-1 or null, decoded) of one unit file, in record batches."""
        for batch in iter_batches(self.files[unit], JOIN_COLUMNS):
            top1, decoded = top1_and_decoded(batch)
            for index, name in top1_names(batch, top1, decoded, skip_empty=True).items():
                if self.named.get(index, (-1, None))[0] <= unit:
                    self.named[index] = (unit, name)
            top1_or_null = pa.array(top1, mask=~decoded)
            yield pa.RecordBatch.from_arrays(
                [batch.column("id"), batch.column("target"), top1_or_null, pa.array(decoded)],
                schema=self.schema)

    def unit_table(self, unit: int) -> pa.Table:
        return pa.Table.from_batches(list(self.batches(unit)), schema=self.schema)


def _side(output_dir: str | Path, suffix: str) -> Side:
    folder = Path(output_dir)
    if not folder.is_dir():
        raise CompareError(f"{folder} is not a folder")
    missing = [name for name in (MANIFEST, PREDICTIONS_DIR + "/") if not (folder / name).exists()]
    if missing:
        raise CompareError(f"{folder} is not a batch-classify output folder "
                           f"(no {' or '.join(missing)} in it)")
    manifest = read_manifest(folder)
    side = Side(folder, manifest, {}, {}, {}, suffix)
    damaged: list[Footer] = []
    for footer in read_footers(unit_files(folder), Identity.of(manifest), strict=False, check_unit=False):
        if footer.problem is not None:
            damaged.append(footer)
            continue
        side.files[footer.unit], side.rows[footer.unit] = footer.path, footer.num_rows
        if footer.stats is not None:
            side.keys[footer.unit] = (footer.stats["n"], footer.stats["ids_digest"])
    if damaged:
        more = f" ({len(damaged) - 1} more such file(s))" if len(damaged) > 1 else ""
        first = damaged[0]
        raise CompareError(f"{folder}: {describe_damage(first.unit, first.path, first.problem)}{more}")
    return side


def paired_units(a: Side, b: Side) -> list[tuple[int, int]]:
    """Pairs (unit of A, unit of B) that hold exactly the same ids, by their footers' row counts
    and order-independent id digests: only such pairs can be joined file by file. (A fingerprint
    and unit size in common do not prove it: a labels CSV in another order lists the same items
    in other units.) A digest that two units of one side share pairs neither."""
    def by_key(side: Side) -> dict[tuple[int, str], int | None]:
        keys: dict[tuple[int, str], int | None] = {}
        for unit, key in side.keys.items():
            if key[0] > 0:
                keys[key] = None if key in keys else unit
        return keys

    keys_a, keys_b = by_key(a), by_key(b)
    return sorted((unit, keys_b[key]) for key, unit in keys_a.items()
                  if unit is not None and keys_b.get(key) is not None)


@dataclass
class Tally:
    """What the comparison reports, summed over joined pieces: bounded by the classes."""

    n_common: int = 0
    n_both: int = 0
    n_agree: int = 0
    n_target_a: int = 0
    class_n: Counter = field(default_factory=Counter)
    class_differ: Counter = field(default_factory=Counter)
    n_labelled: int = 0
    right_a: int = 0
    right_b: int = 0
    only_a_right: int = 0
    only_b_right: int = 0

    def add(self, joined: pa.Table) -> None:
        """Add rows joined on id: target_a, top1_a, decoded_a and the same for b."""
        column = {name: joined.column(name).combine_chunks() for name in joined.column_names}
        both = _bools(column["decoded_a"]) & _bools(column["decoded_b"])
        target_a, target_b = int_column(column["target_a"])[both], int_column(column["target_b"])[both]
        top1_a, top1_b = int_column(column["top1_a"])[both], int_column(column["top1_b"])[both]
        same = top1_a == top1_b
        self.n_common += joined.num_rows
        self.n_both += int(both.sum())
        self.n_agree += int(same.sum())
        self.n_target_a += int((target_a >= 0).sum())
        keys = np.where(target_a >= 0, target_a, top1_a)
        self.class_n.update(_counts(keys[keys >= 0]))
        self.class_differ.update(_counts(keys[(keys >= 0) & ~same]))
        labelled = (target_a >= 0) & (target_b >= 0)
        right_a, right_b = (top1_a == target_a)[labelled], (top1_b == target_b)[labelled]
        self.n_labelled += int(labelled.sum())
        self.right_a += int(right_a.sum())
        self.right_b += int(right_b.sum())
        self.only_a_right += int((right_a & ~right_b).sum())
        self.only_b_right += int((right_b & ~right_a).sum())


def _bools(array: pa.Array) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=bool)


def _counts(values: np.ndarray) -> dict[int, int]:
    unique, counts = np.unique(values, return_counts=True)
    return dict(zip(unique.tolist(), counts.tolist()))


def _join(left: pa.Table, right: pa.Table) -> pa.Table:
    return left.join(right, keys="id", join_type="inner")


def join_by_unit(a: Side, b: Side, pairs: list[tuple[int, int]], tally: Tally) -> None:
    """Units that hold the same ids on both sides: join file pair by file pair."""
    for unit_a, unit_b in pairs:
        tally.add(_join(a.unit_table(unit_a), b.unit_table(unit_b)))


def _bucket_of(ids: pa.Array, buckets: int) -> np.ndarray:
    hashes = np.fromiter((zlib.crc32(item.encode()) for item in ids.to_pylist()), dtype=np.int64,
                         count=len(ids))
    return (hashes % buckets).astype(np.int32)


def _partition(side: Side, units: list[int], folder: Path, buckets: int) -> None:
    """Write the rows of the side's ``units`` into ``buckets`` Parquet partitions by a hash of the id."""
    schema = side.schema.append(pa.field("bucket", pa.int32()))

    def with_bucket() -> Iterator[pa.RecordBatch]:
        for unit in units:
            for batch in side.batches(unit):
                yield batch.append_column("bucket", pa.array(_bucket_of(batch.column("id"), buckets)))

    ds.write_dataset(with_bucket(), folder, schema=schema, format="parquet",
                     partitioning=ds.partitioning(pa.schema([("bucket", pa.int32())])),
                     max_open_files=min(buckets, 900) + 1, min_rows_per_group=4096,
                     existing_data_behavior="overwrite_or_ignore")


def _bucket(side: Side, folder: Path, bucket: int) -> pa.Table:
    path = folder / str(bucket)
    if not path.is_dir():
        return side.schema.empty_table()
    return ds.dataset(path, format="parquet", schema=side.schema).to_table()


def join_by_bucket(a: Side, b: Side, units_a: list[int], units_b: list[int], tally: Tally) -> None:
    """Units whose ids differ between the folders: hash-partition both sides' rows to temporary
    Parquet files (in $TMPDIR), about BUCKET_ROWS rows a bucket, then join bucket by bucket.
    Where one side has no such unit, no id of the other's can match: its rows are only read
    (for the class names)."""
    if not units_a or not units_b:
        for side, units in ((a, units_a), (b, units_b)):
            for unit in units:
                for _ in side.batches(unit):
                    pass
        return
    rows = max(sum(side.rows[u] for u in units) for side, units in ((a, units_a), (b, units_b)))
    buckets = max(1, math.ceil(rows / BUCKET_ROWS))
    with tempfile.TemporaryDirectory(prefix="batch-classify-compare-") as temporary:
        folder_a, folder_b = Path(temporary) / "a", Path(temporary) / "b"
        _partition(a, units_a, folder_a, buckets)
        _partition(b, units_b, folder_b, buckets)
        for bucket in range(buckets):
            tally.add(_join(_bucket(a, folder_a, bucket), _bucket(b, folder_b, bucket)))


def _join_all(a: Side, b: Side, tally: Tally) -> None:
    pairs = paired_units(a, b)
    joined_a, joined_b = {u for u, _ in pairs}, {u for _, u in pairs}
    join_by_unit(a, b, pairs, tally)
    join_by_bucket(a, b, sorted(set(a.files) - joined_a), sorted(set(b.files) - joined_b), tally)


def _class_namer(manifest: dict[str, Any], a: Side, b: Side):
    """Name of a model-space class index: ImageNet's name where the model reports ImageNet-1k,
    else the name the models gave it in their predictions (A's before B's)."""
    imagenet = model_is_imagenet(manifest.get("model", {}))
    seen = {**b.names, **a.names}

    def name(index: int) -> str:
        if imagenet and 0 <= index < 1000:
            return shorten(imagenet_classes()[1][index])
        return seen.get(index, f"class {index}")

    return name


def _same_items(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs listed the same items, in whatever order (the order-independent digest
    where both manifests have it; the fingerprint, which also fixes the order, otherwise)."""
    key = "items_digest" if a.get("items_digest") and b.get("items_digest") else "fingerprint"
    return a.get(key) == b.get(key)


def compare(dir_a: str | Path, dir_b: str | Path) -> dict[str, Any]:
    """Join two outputs on id: top-1 agreement, ids on one side only, per-class disagreement
    (by target where labelled, else by A's top-1) and, where labelled, each side's top-1 on the
    rows both scored. Memory is bounded by a unit file (or a hash bucket), not the rows."""
    a, b = _side(dir_a, "a"), _side(dir_b, "b")
    tally = Tally()
    try:
        _join_all(a, b, tally)
    except (OSError, pa.ArrowException) as error:
        for side in (a, b):
            found = first_unreadable(sorted(side.files.items()))
            if found is not None:
                damage = describe_damage(*found, repaired_by_job=False)
                raise CompareError(f"{side.folder}: {damage}") from error
        raise  # no unit file is at fault (a full $TMPDIR, say)
    manifest_a, manifest_b = a.manifest, b.manifest
    result: dict[str, Any] = {
        "a": {"dir": str(dir_a), "model": manifest_a.get("model", {}).get("name"), "n": a.n},
        "b": {"dir": str(dir_b), "model": manifest_b.get("model", {}).get("name"), "n": b.n},
        "same_dataset": _same_items(manifest_a["dataset"], manifest_b["dataset"]),
        "n_common": tally.n_common,
        "n_only_a": a.n - tally.n_common,
        "n_only_b": b.n - tally.n_common,
        "n_both_decoded": tally.n_both,
        "n_agree": tally.n_agree,
        "agreement": tally.n_agree / tally.n_both if tally.n_both else None,
        "classes_by": _keyed_by(tally.n_target_a, tally.n_both),
        "classes": _class_disagreement(tally, _class_namer(manifest_a, a, b)),
        "labelled": _labelled(tally),
    }
    return result


def _keyed_by(n_targets: int, n: int) -> str:
    if n_targets == n:
        return "target"
    return "top-1 of A" if n_targets == 0 else "target, else top-1 of A"


def _class_disagreement(tally: Tally, name) -> list[dict[str, Any]]:
    """Classes by number of disagreeing rows, then by rate; only those with any."""
    classes = [{"class_index": key, "name": name(key), "n": tally.class_n[key], "n_differ": differ,
                "rate": differ / tally.class_n[key]}
               for key, differ in sorted(tally.class_differ.items()) if differ]
    classes.sort(key=lambda c: (-c["n_differ"], -c["rate"], c["class_index"]))
    return classes[:TOP_CLASSES]


def _labelled(tally: Tally) -> dict[str, Any] | None:
    """Each side's top-1 on the rows both scored, and where exactly one of them is right."""
    if not tally.n_labelled:
        return None
    n = tally.n_labelled
    return {"n": n, "top1_a": tally.right_a / n, "top1_b": tally.right_b / n,
            "only_a_right": tally.only_a_right, "only_b_right": tally.only_b_right}


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as text for a terminal."""
    a, b = result["a"], result["b"]
    lines = [f"A  {a['dir']}  model {a['model']}  ({a['n']} rows)",
             f"B  {b['dir']}  model {b['model']}  ({b['n']} rows)"]
    if not result["same_dataset"]:
        lines.append("note: the manifests name different datasets (their items differ)")
    lines += [
        f"ids in both       {result['n_common']}  (only in A: {result['n_only_a']}, "
        f"only in B: {result['n_only_b']})",
        f"both decoded      {result['n_both_decoded']}",
        f"top-1 agreement   {percent(result['agreement'])}  "
        f"({result['n_agree']} of {result['n_both_decoded']})",
    ]
    labelled = result["labelled"]
    if labelled is not None:
        lines += [
            f"top-1 accuracy    A {percent(labelled['top1_a'])}   B {percent(labelled['top1_b'])}  "
            f"(on the {labelled['n']} rows both scored)",
            f"only one right    A {labelled['only_a_right']}   B {labelled['only_b_right']}",
        ]
    classes = result["classes"]
    if classes:
        width = max(len(c["name"]) for c in classes)
        lines += ["", f"classes where they differ most (by {result['classes_by']}):",
                  f"  {'class':<{width}}  {'n':>6}  {'differ':>6}  {'rate':>7}"]
        lines += [f"  {c['name']:<{width}}  {c['n']:>6}  {c['n_differ']:>6}  {percent(c['rate']):>7}"
                  for c in classes]
    return "\n".join(lines)
