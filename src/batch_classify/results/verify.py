"""Verify: prove an output folder complete against its listing, one unit at a time.

Every unit committed, each committed file whole and this job's (its footer as the job checks
it on resume, then every page of it read), every unit's row count equal to the listing's where
the listing knows it, no id twice within a unit, each file's footer consistent with its rows.
With ``recount`` the input is listed again from the filesystem, not from the stored listing
(folders walked, tars and Parquet files named again, tars re-read without decoding): it
must cut into the same units, and every unit's ids must match the committed ids exactly
(count and order-independent digest), so an image added, removed or renamed since shows.
Memory is bounded by one unit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch_classify.core.config import DataConfig
from batch_classify.core.digests import ids_digest
from batch_classify.core.errors import UserError, describe_error
from batch_classify.core.layout import DAMAGED_DIR, PREDICTIONS_DIR, unit_of, unit_path
from batch_classify.core.secrets import restore_url
from batch_classify.inputs.listing import Listing, read_listing, write_listing
from batch_classify.output.committed import Identity, describe_damage, read_footers
from batch_classify.output.manifest import read_manifest
from batch_classify.output.writer import committed_units

SHOW = 20


class VerifyError(UserError, ValueError):
    """The folder cannot be verified (not an output folder, or no listing in it)."""


@dataclass
class Verification:
    n_units: int
    n_expected: int | None
    n_rows: int = 0
    missing_units: list[str] = field(default_factory=list)
    """Each missing unit with what it holds (a tar, a row range)."""
    count_mismatches: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)
    unexpected_files: list[str] = field(default_factory=list)
    partial_files: list[str] = field(default_factory=list)
    recount_mismatches: list[str] = field(default_factory=list)
    unreadable_files: list[str] = field(default_factory=list)
    """Committed unit files that are damaged or another job's, each with what is wrong and the fix."""
    recounted: bool = False

    @property
    def complete(self) -> bool:
        return not (self.missing_units or self.count_mismatches or self.duplicated_ids
                    or self.unexpected_files or self.recount_mismatches or self.unreadable_files)

    def summary(self, limit: int = SHOW) -> str:
        expected = f" of {self.n_expected} items" if self.n_expected is not None else ""
        lines = [f"{self.n_units - len(self.missing_units)} of {self.n_units} units committed; "
                 f"{self.n_rows} rows{expected}"]
        for title, values in (("missing units", self.missing_units),
                              ("row counts that differ from the listing", self.count_mismatches),
                              ("ids written twice within a unit", self.duplicated_ids),
                              ("files that are no unit of this job", self.unexpected_files),
                              ("units whose ids differ from the input now", self.recount_mismatches),
                              ("unit files that are damaged or another job's", self.unreadable_files),
                              ("partial files (ignored, removed by the next run)", self.partial_files)):
            if values:
                shown = "; ".join(map(str, values[:limit]))
                more = f" ... and {len(values) - limit} more" if len(values) > limit else ""
                lines.append(f"{title} ({len(values)}): {shown}{more}")
        if self.recounted and not self.recount_mismatches:
            lines.append("every committed unit's ids match the input, enumerated again")
        lines.append("complete" if self.complete else "INCOMPLETE: run the same job again to finish it")
        return "\n".join(lines)


def _file_ids(path: Path) -> list[str]:
    """The file's ids, every column of it decoded on the way (page checksums verified where the
    file has them): a damaged page anywhere fails here, not in a later reader."""
    ids: list[str] = []
    with pq.ParquetFile(path, page_checksum_verification=True) as parquet:
        for batch in parquet.iter_batches(batch_size=65_536):
            ids.extend(batch.column("id").to_pylist())
    return ids


def verify(output_dir: str | Path, recount: bool = False) -> Verification:
    """Check every unit of the folder's listing; see the module docstring."""
    output = Path(output_dir)
    manifest = read_manifest(output)
    if manifest is None:
        raise VerifyError(f"{output} has no manifest.json: not a batch-classify output folder")
    listing = read_listing(output)
    if listing is None:
        raise VerifyError(f"{output} has no input listing (input/listing.json): written by an older "
                          "batch-classify, or the job never got past listing")
    result = Verification(n_units=listing.n_units, n_expected=listing.n_items, recounted=recount)
    committed = committed_units(output)
    folder = output / PREDICTIONS_DIR
    if folder.is_dir():
        result.partial_files = sorted(p.name for p in folder.iterdir()
                                      if unit_of(p) is None and p.name != DAMAGED_DIR)
    result.unexpected_files = [unit_path(output, u).name for u in sorted(committed) if u >= listing.n_units]
    with contextlib.ExitStack() as stack:
        fresh = stack.enter_context(_listed_again(output, listing)) if recount else None
        if fresh is not None:
            result.recount_mismatches.extend(_layout_changes(listing, fresh))
        _check_units(output, listing, manifest, committed, result, fresh)
    return result


@contextlib.contextmanager
def _listed_again(output: Path, listing: Listing) -> Iterator[Listing]:
    """The input listed afresh from the filesystem (the stored listing's data.* and unit size),
    in a temporary folder inside the output folder (a listing of a large input is large)."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    data = {key: value for key, value in listing.info["data"].items() if key in known}
    data["path"] = restore_url(data["path"], listing.root)  # saved redacted: the real one is in memory
    cfg = DataConfig(**data, storage_options=listing.storage_options)
    with tempfile.TemporaryDirectory(prefix=".recount-", dir=output) as folder:
        yield write_listing(cfg, Path(folder), listing.info["unit_size"] or 0)


def _layout_changes(listing: Listing, fresh: Listing) -> list[str]:
    """Where the input listed now is cut into other units than the stored listing."""
    if fresh.n_units != listing.n_units or fresh.n_items != listing.n_items:
        items = (f", {fresh.n_items} items (listed: {listing.n_items})"
                 if fresh.n_items is not None else "")
        return [f"the input now makes {fresh.n_units} units (listed: {listing.n_units}){items}"]
    return [f"unit {unit}: {fresh.describe_unit(unit)} now, {listing.describe_unit(unit)} when listed"
            for unit in range(listing.n_units) if fresh.describe_unit(unit) != listing.describe_unit(unit)]


def _check_units(output: Path, listing: Listing, manifest: dict, committed: set[int],
                 result: Verification, fresh: Listing | None) -> None:
    ours = [(unit, unit_path(output, unit)) for unit in sorted(committed) if unit < listing.n_units]
    # Per unit only what is compared below (a footer's parsed counts would weigh 100 MB at 1e5 units)
    footers = {footer.unit: (footer.problem, None) if footer.problem is not None else
               (None, (footer.stats["n"], footer.stats["ids_digest"]))
               for footer in read_footers(ours, Identity.of(manifest), strict=True)}
    for unit in range(listing.n_units):
        if unit not in committed:
            result.missing_units.append(f"unit {unit} ({listing.describe_unit(unit)})")
            continue
        path = unit_path(output, unit)
        problem, counted = footers[unit]
        if problem is not None:
            result.unreadable_files.append(describe_damage(unit, path, problem))
            continue
        try:
            ids = _file_ids(path)
        except (OSError, pa.ArrowException) as error:
            problem = f"its rows cannot be read ({describe_error(error)})"
            result.unreadable_files.append(describe_damage(unit, path, problem, repaired_by_job=False))
            continue
        result.n_rows += len(ids)
        digest = ids_digest(ids)
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            twice = next(i for i in ids if i in seen or seen.add(i))
            result.duplicated_ids.append(f"{twice!r} in unit {unit}")
        expected = listing.unit_items(unit)
        if expected is not None and expected != len(ids):
            result.count_mismatches.append(f"unit {unit} ({listing.describe_unit(unit)}): {len(ids)} rows, "
                                           f"{expected} listed")
        if counted is not None and counted != (len(ids), digest):
            result.count_mismatches.append(describe_damage(
                unit, path, "its footer's counts or id digest do not match its rows (changed since written)",
                repaired_by_job=False))
        if fresh is not None:
            again = ([record.id for record in fresh.records(unit, read_images=False)]
                     if unit < fresh.n_units else [])
            if len(again) != len(ids) or ids_digest(again) != digest:
                result.recount_mismatches.append(
                    f"unit {unit} ({listing.describe_unit(unit)}): {len(ids)} rows committed, "
                    f"{len(again)} items in the input now")
