"""``runtime.retry_errors``: a rerun classifies again the error rows of committed units.

A read that failed for a transient reason (a network mount's blip) is a committed error row
marked transient; once the mount is back, ``retry_errors transient`` (or ``all``, for every
error row) makes the next run redo them. Which units hold such rows is known from their
footers' ``errors_by_type``, without reading rows. Such a unit is pending again; the rank that
claims it reads only the ids to redo (``Redo.select``), classifies those items, and commits
the unit again whole: the new rows merged into the committed file's, in its row order, written
to a temporary file and renamed over it (``Redo.merge``, through ``writer.write_unit``). The
unit keeps its ids, so its id digest and the job's exactly-once checks hold; its counts are
computed again from the merged rows. Interrupted, the old file stays as it was.

Only inputs listed item by item (folders, file lists) are redone row by row; a tar, Parquet
or dataset unit holding such a row is classified again whole (its error rows may stand for a
shard, not an item), and its file replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from batch_classify.core.faults import TRANSIENT_MARK, is_transient_message
from batch_classify.core.layout import unit_path
from batch_classify.output.committed import Identity, read_footers

log = logging.getLogger("batch_classify")

MODES = ("none", "transient", "all")


def _wanted_types(errors_by_type: dict[str, int], mode: str) -> int:
    """How many of a footer's error rows ``mode`` redoes."""
    if mode == "all":
        return sum(errors_by_type.values())
    if mode == "transient":
        return sum(n for kind, n in errors_by_type.items() if kind.endswith(TRANSIENT_MARK))
    return 0


@dataclass
class RedoPlan:
    """The committed units of one folder holding error rows to classify again."""

    units: set[int] = field(default_factory=set)
    rows: int = 0
    """Error rows to redo in them."""

    def describe(self, mode: str) -> str:
        kind = "transient error rows" if mode == "transient" else "error rows"
        return (f"runtime.retry_errors {mode}: {self.rows} {kind} in {len(self.units)} committed "
                "unit(s) are classified again")


def plan_redo(output_dir: str | Path, committed: Iterable[int], identity: Identity, mode: str) -> RedoPlan:
    """The committed units (already checked) whose footer counts error rows ``mode`` redoes."""
    plan = RedoPlan()
    if mode == "none":
        return plan
    files = [(unit, unit_path(output_dir, unit)) for unit in sorted(committed)]
    for footer in read_footers(files, identity, strict=True):
        if footer.problem is not None or footer.stats is None:
            continue
        rows = _wanted_types(footer.stats["errors_by_type"], mode)
        if rows:
            plan.units.add(footer.unit)
            plan.rows += rows
    return plan


def _redo_ids(path: Path, mode: str) -> set[str]:
    table = pq.read_table(path, columns=["id", "error"])
    pairs = zip(table.column("id").to_pylist(), table.column("error").to_pylist())
    if mode == "all":
        return {item_id for item_id, error in pairs if error is not None}
    return {item_id for item_id, error in pairs if is_transient_message(error)}


class Redo:
    """On the rank that claims a unit: which of its items to classify (``select``), and the
    committed file's rows to merge the new ones into before the unit is written (``merge``)."""

    def __init__(self, folders: list[Path], item_by_item: bool, mode: str):
        self.folders = folders
        self.row_by_row = item_by_item
        self.mode = mode
        self.partial: dict[int, set[str]] = {}
        """Units redone row by row, with their ids to redo (set by select, read by merge)."""

    def select(self, unit: int) -> set[str] | None:
        """The ids of ``unit`` to classify: None for all of them (a unit not committed in every
        folder, or one that is not redone row by row), else those of its rows to redo."""
        if self.mode == "none":
            return None
        paths = [unit_path(folder, unit) for folder in self.folders]
        if not all(path.exists() for path in paths):
            return None
        if not self.row_by_row:
            log.info("unit %d is classified again whole (runtime.retry_errors %s)", unit, self.mode)
            return None
        ids: set[str] = set()
        for path in paths:
            ids |= _redo_ids(path, self.mode)
        self.partial[unit] = ids
        return ids

    def merge(self, output_dir: str | Path, unit: int, rows: dict[str, list]) -> dict[str, list]:
        """The unit's rows to write: ``rows`` alone, or for a unit redone row by row, the
        committed file's rows with each redone id's row replaced, in the file's order."""
        if unit not in self.partial:
            return rows
        committed = pq.read_table(unit_path(output_dir, unit)).to_pydict()
        position = {item_id: index for index, item_id in enumerate(committed["id"])}
        if len(position) != len(committed["id"]):
            raise RuntimeError(f"unit {unit}: an id appears twice in its committed file")
        columns = [name for name in rows if name in committed]
        if set(columns) != set(committed):
            raise RuntimeError(f"unit {unit}: the committed file's columns {sorted(committed)} differ "
                               f"from the rows' {sorted(rows)}")
        for index, item_id in enumerate(rows["id"]):
            where = position.get(item_id)
            if where is None:
                raise RuntimeError(f"unit {unit}: id {item_id!r} was redone but is not in its committed file")
            for name in columns:
                committed[name][where] = rows[name][index]
        return committed

