"""The output folder's manifest: what job these results belong to, fixed at the first run."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from batch_classify.core.errors import UserError
from batch_classify.core.faults import with_path
from batch_classify.core.ownership import claim, remove_predictions
from batch_classify.output.writer import PREDICTIONS_DIR

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
"""2: units listed in input/ (tars, row-group runs, listing ranges), unit files with counts."""


class OutputMismatch(UserError, RuntimeError):
    """The output folder holds results of a different job."""


class DamagedManifest(UserError, ValueError):
    """manifest.json exists but is not the JSON object the job wrote."""


def read_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, None where it has none; a damaged one is one line naming it."""
    path = Path(output_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedManifest(f"{path} is damaged ({type(error).__name__}: {error}); it records which job "
                              "the folder's results belong to: restore it, or choose another output.dir"
                              ) from None
    if not isinstance(manifest, dict):
        raise DamagedManifest(f"{path} is damaged (a JSON {type(manifest).__name__}, not an object); "
                              "restore it, or choose another output.dir")
    return manifest


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")
        temporary.replace(path)
    except OSError as error:  # a full disk: no half-written file left beside the old one
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        named = with_path(error, path)
        if named is error:
            raise
        raise named from error


def _model_keys(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, ...]:
    """A model is what its weights are: where both folders hashed them, the hash decides (the
    same checkpoint named by a relative path, a symlink or a copy is the same model)."""
    if old.get("model", {}).get("weights_sha256") and new.get("model", {}).get("weights_sha256"):
        return ("weights_sha256",)
    return ("name", "revision", "weights_sha256")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    if old.get("format_version") != FORMAT_VERSION:
        return [f"format_version: {old.get('format_version')!r} in the folder (an older batch-classify), "
                f"{FORMAT_VERSION} now"]
    found = []
    for section, keys in {"dataset": ("n_units", "fingerprint"),
                          "model": _model_keys(old, new),
                          "job": ("top_k", "unit_size", "class_subset")}.items():
        for key in keys:
            before, after = old.get(section, {}).get(key), new.get(section, {}).get(key)
            if before != after:
                found.append(f"{section}.{key}: {before!r} in the folder, {after!r} now")
                if key == "weights_sha256" and "name" not in keys:
                    names = old.get("model", {}).get("name"), new.get("model", {}).get("name")
                    found.append(f"model.name: {names[0]!r} in the folder, {names[1]!r} now")
    return found


def _remove_partial_files(output: Path) -> None:
    """Temporary files of writers killed mid-write: never committed, safe to drop under the lock."""
    for partial in (output / PREDICTIONS_DIR).glob(".unit-*.tmp-*"):
        partial.unlink(missing_ok=True)


def prepare_output(output_dir: str | Path, manifest: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Create or check the output folder; return the manifest in force (an existing one on resume).

    A folder holding another job's results is refused unless ``overwrite``, which clears it.
    """
    output = Path(output_dir)
    old = read_manifest(output)
    if old is not None:
        differences = _differences(old, manifest)
        if not differences:
            _remove_partial_files(output)
            return old
        if not overwrite:
            raise OutputMismatch(
                f"output.dir {output} holds results of a different job ("
                + "; ".join(differences)
                + "). Choose another output.dir, or set output.overwrite true to discard them."
            )
        remove_predictions(output / PREDICTIONS_DIR)
        for name in ("metrics.json", "timing.json", "comparison.json"):
            (output / name).unlink(missing_ok=True)
    elif (output / PREDICTIONS_DIR).exists() and any((output / PREDICTIONS_DIR).iterdir()):
        if not overwrite:
            raise OutputMismatch(
                f"output.dir {output} has predictions but no {MANIFEST}; refusing to mix them in. "
                "Choose another output.dir, or set output.overwrite true."
            )
        remove_predictions(output / PREDICTIONS_DIR)
    claim(output)
    (output / PREDICTIONS_DIR).mkdir(exist_ok=True)
    write_json(output / MANIFEST, manifest)
    return manifest


class OutputInUse(UserError, RuntimeError):
    """Another job holds the output folder."""


class OutputLock:
    """An exclusive flock on ``<output.dir>/.lock`` for the life of the job.

    The kernel drops it when the holder dies, even by SIGKILL, so a resumed job never finds
    a stale lock. (On network filesystems flock must be enabled, as on Lustre's -o flock.)
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / ".lock"
        self._handle = None

    def __enter__(self) -> OutputLock:
        import fcntl
        import os
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the job's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputInUse(
                f"output.dir {self.path.parent} is in use by another job ({holder}); "
                "wait for it to end, or choose another output.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *_exc) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
