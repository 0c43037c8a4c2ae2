"""Verify: check an output folder against its manifest without rerunning anything."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .aggregate import read_predictions
from .config import DataConfig
from .inputs import load_items
from .manifest import read_manifest
from .shard import unit_ranges
from .writer import PREDICTIONS_DIR, unit_of, unit_path


@dataclass
class Verification:
    n_expected: int
    n_rows: int
    missing_units: list[int] = field(default_factory=list)
    missing_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)
    unexpected_ids: list[str] = field(default_factory=list)
    partial_files: list[str] = field(default_factory=list)
    dataset_changed: bool = False

    @property
    def complete(self) -> bool:
        return not (self.missing_units or self.missing_ids or self.duplicated_ids
                    or self.unexpected_ids or self.dataset_changed)

    def summary(self, limit: int = 20) -> str:
        lines = [f"{self.n_rows} of {self.n_expected} items have a row"]
        if self.dataset_changed:
            lines.append("the input no longer matches the manifest's dataset fingerprint")
        for title, values in (("missing units", self.missing_units),
                              ("missing ids", self.missing_ids),
                              ("ids written twice", self.duplicated_ids),
                              ("ids not in the input", self.unexpected_ids),
                              ("partial files (ignored, removed by the next run)", self.partial_files)):
            if values:
                shown = ", ".join(map(str, values[:limit]))
                more = f" ... and {len(values) - limit} more" if len(values) > limit else ""
                lines.append(f"{title} ({len(values)}): {shown}{more}")
        lines.append("complete" if self.complete else "INCOMPLETE: run the same job again to finish it")
        return "\n".join(lines)


def verify(output_dir: str | Path) -> Verification:
    """Every input id present exactly once; list what is missing, doubled or partial."""
    output = Path(output_dir)
    manifest = read_manifest(output)
    if manifest is None:
        raise FileNotFoundError(f"{output} has no manifest.json: not a batch-classify output folder")
    n_items = manifest["dataset"]["n_items"]
    units = unit_ranges(n_items, manifest["job"]["unit_size"])
    folder = output / PREDICTIONS_DIR
    partial = sorted(p.name for p in folder.iterdir() if unit_of(p) is None) if folder.exists() else []
    table = read_predictions(output)
    counts = Counter(table.column("id").to_pylist())
    result = Verification(
        n_expected=n_items,
        n_rows=table.num_rows,
        missing_units=[u for u in range(len(units)) if not unit_path(output, u).exists()],
        duplicated_ids=sorted(i for i, c in counts.items() if c > 1),
        partial_files=partial,
    )
    items = load_items(DataConfig(**manifest["config"]["data"]))
    result.dataset_changed = items.fingerprint() != manifest["dataset"]["fingerprint"]
    expected = set(items.ids)
    result.missing_ids = [i for i in items.ids if i not in counts]
    result.unexpected_ids = sorted(i for i in counts if i not in expected)
    return result
