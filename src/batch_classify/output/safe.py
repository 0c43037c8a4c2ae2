"""What is safe when the output filesystem fails: the units committed so far.

A unit file is written to a temporary name and renamed once whole, so every committed file
counts after any fault; the job's one line says how many there are. Counted from one directory
scan per folder, best effort: a filesystem that fails may not answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from batch_classify.inputs.listing import INFO_FILE, INPUT_DIR
from batch_classify.output.writer import committed_units

METRICS_FILE = "metrics.json"


def _n_units(output: Path) -> int | None:
    try:
        return int(json.loads((output / INPUT_DIR / INFO_FILE).read_text())["n_units"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _one(folder: Path, n_units: int | None) -> tuple[int, int | None] | None:
    try:
        return len(committed_units(folder)), n_units
    except OSError:
        return None


def safe_note(output_dir: str | Path, model_folders: list[Path] | None = None) -> str | None:
    """'3 of 6 units are committed and safe' (for each model's folder where there are several),
    or None where the folder cannot be read."""
    output = Path(output_dir)
    n_units = _n_units(output)
    folders = model_folders or [output]
    counts = [(folder, _one(folder, n_units)) for folder in folders]
    if any(count is None for _, count in counts):
        return "the units committed before the fault are whole (each is renamed into place once written)"
    if len(folders) > 1:
        parts = [f"{done} of {total if total is not None else '?'} for {folder.name}"
                 for folder, (done, total) in counts]
        return "committed and safe: " + ", ".join(parts) + " units"
    done, total = counts[0][1]
    if done == 0:
        return "no unit is committed yet, so nothing is lost"
    if total is not None and done >= total:
        metrics = " and metrics.json is written" if (output / METRICS_FILE).exists() else ""
        return f"all {total} units are committed and safe{metrics}"
    of = f" of {total}" if total is not None else ""
    return f"{done}{of} units are committed and safe, and no partial unit file is kept"
