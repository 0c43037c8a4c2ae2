"""Write each finished unit's predictions as one Parquet file: complete or absent."""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PREDICTIONS_DIR = "predictions"

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
accuracy compares `topk_ids` with), null where unknown or unmappable."""


def unit_path(output_dir: str | Path, unit: int) -> Path:
    return Path(output_dir) / PREDICTIONS_DIR / f"unit-{unit:06d}.parquet"


def unit_of(path: Path) -> int | None:
    """The unit number of a committed predictions file, or None for anything else."""
    name = path.name
    if name.startswith("unit-") and name.endswith(".parquet"):
        digits = name[len("unit-"):-len(".parquet")]
        if digits.isdigit():
            return int(digits)
    return None


def write_unit(output_dir: str | Path, unit: int, rows: dict[str, list], metadata: dict[str, Any]) -> Path:
    """Write to a temporary name, fsync, then rename: readers see all of it or none."""
    final = unit_path(output_dir, unit)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    table = pa.Table.from_pydict(rows, schema=SCHEMA).replace_schema_metadata(
        {key: json.dumps(value) for key, value in metadata.items()}
    )
    pq.write_table(table, temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    return final


class UnitWriter:
    """Commits units on a background thread so the accelerator never waits for Parquet."""

    def __init__(self, output_dir: str | Path, metadata: dict[str, Any]):
        self.output_dir = output_dir
        self.metadata = metadata
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-writer")
        self._pending: list[Future] = []

    def submit(self, unit: int, rows: dict[str, list]) -> None:
        self._pending.append(self._pool.submit(write_unit, self.output_dir, unit, rows, self.metadata))
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
