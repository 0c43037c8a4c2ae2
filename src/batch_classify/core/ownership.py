"""The job writes and deletes only what it created: never the data, never a stranger's files.

An output folder the job creates, or adopts because it is empty, gets a marker file
(``.batch-classify``). Folders the job removes (``input/`` before a new listing,
``predictions/`` under ``output.overwrite``) are removed only inside a marked output folder
and only when every entry in them has a name the job writes. An ``output.dir`` that is
inside, equal to or above ``data.path`` (symlinks resolved; for URLs, in one spelling) is
refused before anything is created, as is one whose files would land on an input file.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from batch_classify.core.errors import UserError
from batch_classify.core.layout import (
    DAMAGED_DIR,
    INFO_FILE,
    INPUT_DIR,
    INPUT_FILES,
    MANIFEST,
    MARKER,
    PREDICTIONS_DIR,
    TOP_LEVEL,
)
from batch_classify.core.storage import canonical_url

MARKER_TEXT = ("This folder was created by batch-classify: it holds one job's listing, predictions "
               "and report.\n")
_TEMPORARY = re.compile(r"^\..+\.tmp(-\d+)?$")
"""Files a writer was killed while writing: ``.<name>.tmp`` or ``.<name>.tmp-<pid>``."""
_OWN_PREDICTION = re.compile(r"^unit-\d+\.parquet$")


class OutputLocationError(UserError, ValueError):
    """output.dir would overlap the input, or holds files the job did not write."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_location(output_dir: str | os.PathLike, data_root: str | os.PathLike | None,
                   input_files: Iterable[str | os.PathLike] = (), key: str = "output.dir") -> None:
    """Refuse an output folder inside, equal to or above ``data_root`` (a folder the input
    is read from, or the one input file), or one whose own files would be ``input_files``.
    ``key``: the setting that names the folder (``output.staging`` for a store's staging folder)."""
    output = _resolved(output_dir)
    if data_root is not None and os.path.exists(data_root):
        data = _resolved(data_root)
        if _is_within(data, output):
            where = "is" if data == output else "contains"
            raise OutputLocationError(
                f"{key} {output_dir} {where} data.path {data_root} (resolved: {data}): the job "
                f"writes input/, predictions/ and report files into {key} and would mix them "
                f"with the data; choose an {key} outside the data")
        if data.is_dir() and _is_within(output, data):
            raise OutputLocationError(
                f"{key} {output_dir} lies inside data.path {data_root} (resolved: {data}): its "
                f"files would become part of the input; choose an {key} outside the data")
    for name in input_files:
        if name is None or not os.path.exists(name):
            continue
        path = _resolved(name)
        if path.parent == output and path.name in TOP_LEVEL or any(
                _is_within(path, output / folder) for folder in (INPUT_DIR, PREDICTIONS_DIR)):
            raise OutputLocationError(
                f"{name} lies where the job writes its own files in output.dir {output_dir}; move it, "
                "or choose another output.dir")


def check_url_location(output_url: str, data_url: str) -> None:
    """Refuse an output.dir URL inside, equal to or above ``data_url`` (the prefix or object the
    input is read from) in the same store, the URLs compared in one spelling (``s3a://`` as
    ``s3://``, repeated slashes, ``.`` and ``..`` segments, trailing slashes). No request is made:
    a data.path that is an object has nothing inside it, so the test is safe for objects too."""
    try:
        output, data = canonical_url(output_url), canonical_url(data_url)
    except ValueError as error:
        raise OutputLocationError(f"output.dir {output_url} or data.path {data_url}: {error}") from None
    if output == data or data.startswith(output + "/"):
        where = "is" if output == data else "contains"
        raise OutputLocationError(
            f"output.dir {output_url} {where} data.path {data_url} (as {data}): the job writes input/, "
            "predictions/ and report files into output.dir and would mix them with the data; choose an "
            "output.dir outside the data")
    if output.startswith(data + "/"):
        raise OutputLocationError(
            f"output.dir {output_url} lies inside data.path {data_url} (as {data}): its files would "
            "become part of the input; choose an output.dir outside the data")


def is_owned(output: Path) -> bool:
    """Whether batch-classify wrote this folder (its marker, or an older job's manifest/listing)."""
    return ((output / MARKER).is_file() or (output / MANIFEST).is_file()
            or (output / INPUT_DIR / INFO_FILE).is_file())


def claim(output_dir: str | os.PathLike, own_names: Iterable[str] = ()) -> None:
    """Make ``output_dir`` this job's: create it, or adopt an existing folder that is already
    batch-classify's, or that holds none of the names the job writes (``own_names``: more of
    them, such as model sub-folders); then mark it. Refuses a folder whose entries the job
    would overwrite or delete without having written them."""
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise OutputLocationError(f"output.dir {output} is a file, not a folder")
    if output.is_dir() and not is_owned(output):
        names = TOP_LEVEL | set(own_names)
        with os.scandir(output) as entries:
            clash = sorted(entry.name for entry in entries if entry.name in names)
        if clash:
            raise OutputLocationError(
                f"output.dir {output} already holds {', '.join(map(repr, clash[:3]))}, not written by "
                "batch-classify; the job would overwrite or delete it. Choose a new or empty output.dir")
    output.mkdir(parents=True, exist_ok=True)
    if not (output / MARKER).is_file():
        (output / MARKER).write_text(MARKER_TEXT)


def _remove_owned(folder: Path, owned: Callable[[str], bool], what: str, dry_run: bool = False) -> None:
    if not folder.exists():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise OutputLocationError(f"{folder} is not a folder batch-classify wrote (a link or a file); "
                                  f"it holds no {what} of a job. Move it, or choose another output.dir")
    if not is_owned(folder.parent):
        raise OutputLocationError(f"{folder.parent} is not a batch-classify output folder; refusing to "
                                  f"delete {folder}")
    with os.scandir(folder) as entries:
        strangers = sorted(entry.name for entry in entries if not owned(entry.name))
    if strangers:
        raise OutputLocationError(
            f"{folder} holds {', '.join(map(repr, strangers[:3]))}, which batch-classify did not write; "
            f"refusing to delete it. Move those files, or choose another output.dir")
    if not dry_run:
        shutil.rmtree(folder)


def remove_listing(input_dir: Path, dry_run: bool = False) -> None:
    """Remove a listing folder, only where every file in it is one a listing writes
    (``dry_run``: only raise where it could not be removed)."""
    _remove_owned(input_dir, lambda name: name in INPUT_FILES or bool(_TEMPORARY.match(name)),
                  "listing", dry_run)


def remove_predictions(predictions_dir: Path) -> None:
    """Remove a predictions folder, only where every entry is a unit file or a partial one."""
    _remove_owned(predictions_dir,
                  lambda name: bool(_OWN_PREDICTION.match(name) or _TEMPORARY.match(name)
                                    or name.startswith(".unit-") or name == DAMAGED_DIR),
                  PREDICTIONS_DIR)


def remove_output(output_dir: Path) -> None:
    """Remove a whole output folder (a benchmark's fresh start), only where the job wrote it."""
    if not output_dir.exists():
        return
    if output_dir.is_symlink() or not is_owned(output_dir):
        raise OutputLocationError(f"{output_dir} is not a batch-classify output folder; refusing to "
                                  "delete it. Move it, or choose another folder")
    shutil.rmtree(output_dir)
