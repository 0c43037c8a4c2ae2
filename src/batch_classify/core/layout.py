"""Where everything lives in an output folder: every name the job writes, in one place.

    <output.dir>/
      .batch-classify       marker: this folder is a job's (ownership.py)
      .lock                 one job at a time (output/manifest.py)
      .pending.npy          units no rank has finished (pipeline/shard.py)
      manifest.json         what the predictions are of (output/manifest.py)
      config.yaml           the job's configuration
      input/                the listing: units.parquet, listing.parquet, listing.json, state.parquet
      predictions/          unit-000000.parquet ... (and _damaged/ for files a resume set aside)
      metrics.json, timing.json, report.md and its tables and pictures
      report.html, report_files/   the report as a page, and its thumbnails
      models.json, side_by_side.md/.json, comparison.json   (several models in one pass)
"""

from __future__ import annotations

from pathlib import Path

MARKER = ".batch-classify"
LOCK = ".lock"
PENDING_FILE = ".pending.npy"
MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
METRICS = "metrics.json"
TIMING = "timing.json"
COMPARISON = "comparison.json"
MODELS_FILE = "models.json"
SIDE_BY_SIDE = ("side_by_side.md", "side_by_side.json")

REMOTE_FILE = ".remote.json"
"""In a staging folder of an output in a store: the store's URL and options (output/remote.py)."""

INPUT_DIR = "input"
UNITS_FILE = "units.parquet"
ROWS_FILE = "listing.parquet"
INFO_FILE = "listing.json"
STATE_FILE = "state.parquet"
INPUT_FILES = frozenset({INFO_FILE, UNITS_FILE, ROWS_FILE, STATE_FILE})

PREDICTIONS_DIR = "predictions"
DAMAGED_DIR = "_damaged"
"""Inside predictions/: where a resume moves unit files that are damaged or another job's (never
deleted); the leading underscore keeps pyarrow's and pandas' dataset discovery out of it."""

REPORT = "report.md"
PER_CLASS = "per_class.csv"
CONFUSIONS = "confusions.csv"
PER_CLASS_PLOT = "per_class.png"
MISTAKES = "mistakes.jpg"
PREDICTED = "predicted_classes.csv"
PREDICTED_PLOT = "predicted_classes.png"
UNCERTAIN = "least_confident.jpg"
REPORT_HTML = "report.html"
REPORT_FILES = (REPORT, PER_CLASS, CONFUSIONS, PER_CLASS_PLOT, MISTAKES, PREDICTED, PREDICTED_PLOT, UNCERTAIN,
                REPORT_HTML)
REPORT_ASSETS = "report_files"
"""Beside report.html: its thumbnails (and only those), named by a digest of (unit, id)."""

TOP_LEVEL = frozenset({MARKER, LOCK, PENDING_FILE, MANIFEST, CONFIG_FILE, METRICS, TIMING, COMPARISON,
                       MODELS_FILE, *SIDE_BY_SIDE, *REPORT_FILES, REPORT_ASSETS, INPUT_DIR, PREDICTIONS_DIR})
"""Every name the job may write at the top of an output folder (model sub-folders aside)."""


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
