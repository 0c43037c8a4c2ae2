"""Write each finished unit's predictions as one Parquet file: complete or absent."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch_classify.core.digests import ids_digest
from batch_classify.core.errors import error_type
from batch_classify.core.faults import replacing
from batch_classify.core.layout import PREDICTIONS_DIR, unit_of, unit_path
from batch_classify.models.embeddings import embedding_array, embedding_field
from batch_classify.output.remote import publish_unit

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("label", pa.int64()),
    ("target", pa.int64()),
    ("topk_ids", pa.list_(pa.int64())),
    ("topk_labels", pa.list_(pa.string())),
    ("topk_scores", pa.list_(pa.float32())),
    ("error", pa.string()),
])
"""`label`: the dataset's label; `target`: that label in the model's output space (what
accuracy compares `topk_ids` with), null where unknown or unmappable. With output.embeddings
an `embedding` column follows: fixed-size list of float16 (null on error rows)."""


UNIT_STATS_KEY = "unit"
"""Schema-metadata key of a unit file's own counts (JSON), so totals come from the footers."""


def unit_stats(rows: dict[str, list]) -> dict[str, Any]:
    """The counts a unit file carries in its metadata: aggregate sums them without the rows."""
    n_errors, errors_by_type = 0, Counter()
    n_labelled = n_scored = top1 = top5 = 0
    top5_available = True
    for label, target, topk, error in zip(rows["label"], rows["target"], rows["topk_ids"], rows["error"]):
        n_labelled += label is not None
        if error is not None:
            n_errors += 1
            errors_by_type[error_type(error)] += 1
            continue
        if target is None or not topk:
            continue
        n_scored += 1
        top1 += topk[0] == target
        top5 += target in topk[:5]
        top5_available = top5_available and len(topk) >= 5
    return {"n": len(rows["id"]), "n_errors": n_errors,
            "errors_by_type": dict(sorted(errors_by_type.items())),
            "n_labelled": n_labelled, "n_scored": n_scored, "top1_hits": top1, "top5_hits": top5,
            "top5_available": top5_available, "ids_digest": ids_digest(rows["id"]),
            "n_distinct": len(set(rows["id"]))}  # one unit's ids: aggregate need not read them again


def read_unit_stats(path: str | Path) -> dict[str, Any] | None:
    """A committed unit file's counts from its footer alone (None for files that predate them)."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(UNIT_STATS_KEY.encode())
    return json.loads(raw) if raw is not None else None


def committed_units(output_dir: str | Path) -> set[int]:
    """Numbers of the units whose file is committed (one directory scan, no stat per file)."""
    folder = Path(output_dir) / PREDICTIONS_DIR
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {unit for entry in entries if (unit := unit_of(Path(entry.name))) is not None}


def write_unit(output_dir: str | Path, unit: int, rows: dict[str, list], metadata: dict[str, Any],
               embedding_dim: int | None = None) -> Path:
    """Write to a temporary name, fsync, then rename: readers see all of it or none."""
    final = unit_path(output_dir, unit)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    stats = {UNIT_STATS_KEY: {"unit": unit, **unit_stats(rows)}}
    table = pa.Table.from_pydict({name: rows[name] for name in SCHEMA.names}, schema=SCHEMA)
    if embedding_dim is not None:
        table = table.append_column(embedding_field(embedding_dim),
                                    embedding_array(rows["embedding"], embedding_dim))
    table = table.replace_schema_metadata(
        {key: json.dumps(value) for key, value in {**metadata, **stats}.items()}
    )
    with replacing(final, temporary, named=temporary):  # a full disk: no partial file stays
        pq.write_table(table, temporary, write_page_checksum=True)  # verify finds a damaged page
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
    publish_unit(output_dir, final)  # an output in a store: one PUT of the whole file
    return final


class UnitWriter:
    """Commits units on a background thread so the accelerator never waits for Parquet."""

    def __init__(self, output_dir: str | Path, metadata: dict[str, Any], embedding_dim: int | None = None):
        self.output_dir = output_dir
        self.metadata = metadata
        self.embedding_dim = embedding_dim
        self.complete: Callable[[str | Path, int, dict[str, list]], dict[str, list]] | None = None
        """Completes a unit's rows before they are written (runtime.retry_errors merges redone
        rows into the committed file's: output/redo.py)."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-writer")
        self._pending: list[Future] = []

    def _write(self, unit: int, rows: dict[str, list]) -> Path:
        if self.complete is not None:
            rows = self.complete(self.output_dir, unit, rows)
        return write_unit(self.output_dir, unit, rows, self.metadata, self.embedding_dim)

    def submit(self, unit: int, rows: dict[str, list]) -> None:
        self._pending.append(self._pool.submit(self._write, unit, rows))
        still_running = []
        for future in self._pending:
            if future.done():
                future.result()  # a failed write stops the job now, not at the end
            else:
                still_running.append(future)
        self._pending = still_running

    def close(self) -> None:
        """Wait for every write; re-raise the first failure."""
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown(wait=True)
