"""Which committed unit files count: a file counts once its footer shows it whole and this job's.

The job checks every committed file's footer on each resume, before it decides what is
pending: a damaged or foreign file is moved aside (never deleted) and its unit is run again,
so a rerun repairs the folder. aggregate, verify and compare check the same footers before
they read any rows, and say what is wrong in one line instead of a pyarrow traceback.
A footer is a few KiB at the end of the file: checking 1e5 of them reads no rows.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch_classify.core.errors import UserError, describe_error
from batch_classify.core.layout import DAMAGED_DIR, PREDICTIONS_DIR, unit_path
from batch_classify.output.units import merge_stats
from batch_classify.output.writer import SCHEMA, UNIT_STATS_KEY, committed_units

log = logging.getLogger("batch_classify")

MAGIC = b"PAR1"
COUNT_KEYS = ("unit", "n", "n_errors", "n_labelled", "n_scored", "top1_hits", "top5_hits")
STATS_KEYS = (*COUNT_KEYS, "errors_by_type", "top5_available", "ids_digest")
"""What every footer the job has written carries (n_distinct came later: optional)."""

CHECK_WINDOW = 1024
"""Footers read ahead of the one being used, at most."""

WARN_EACH = 20
"""Files moved aside that are named one by one in the log; more are counted in one line."""

CHECK_THREADS = 4
"""Threads that read footers. On a network filesystem each footer costs round trips that pyarrow
waits out without the GIL, and threads overlap them; from a local disk's page cache the check is
CPU-bound (about 0.2 ms a file, 22 s for 1e5 files on one core) and threads gain nothing."""


class CommittedError(UserError, OSError):
    """A unit file that does not count cannot be moved aside."""


@dataclass(frozen=True)
class Identity:
    """What a unit file of this folder must have been written for: the manifest's dataset
    fingerprint and model. None where the manifest does not say (hand-made folders)."""

    fingerprint: str | None = None
    model: dict[str, Any] | None = None

    @classmethod
    def of(cls, manifest: dict[str, Any] | None) -> Identity:
        if not manifest:
            return cls()
        return cls(manifest.get("dataset", {}).get("fingerprint"), manifest.get("model"))


@dataclass(slots=True)
class Footer:
    """One committed file's footer as checked: ``problem`` says why it does not count."""

    unit: int
    path: Path
    num_rows: int = 0
    stats: dict[str, Any] | None = None
    problem: str | None = None


def _same_type(found: pa.DataType, wanted: pa.DataType) -> bool:
    """Equal types, list item names aside (Parquet writers call them item or element)."""
    if pa.types.is_list(wanted):
        return pa.types.is_list(found) and _same_type(found.value_type, wanted.value_type)
    return found == wanted


def _schema_problem(schema: pa.Schema) -> str | None:
    missing = [name for name in SCHEMA.names if schema.get_field_index(name) < 0]
    if missing:
        return f"not a predictions file: no column {', '.join(missing)}"
    for wanted in SCHEMA:
        found = schema.field(wanted.name).type
        if not _same_type(found, wanted.type):
            return f"not a predictions file: column {wanted.name} is {found}, not {wanted.type}"
    return None


_SOUND_SCHEMAS: list[pq.ParquetSchema] = []
"""Parquet schemas already found sound: the files of one folder share one or two, and comparing
with them costs a fraction of building the Arrow schema again."""


def _schema_problem_cached(schema: pq.ParquetSchema) -> str | None:
    if any(schema.equals(sound) for sound in _SOUND_SCHEMAS):
        return None
    problem = _schema_problem(schema.to_arrow_schema())
    if problem is None and len(_SOUND_SCHEMAS) < 8:
        _SOUND_SCHEMAS.append(schema)
    return problem


def _model_name(model: Any) -> str:
    return str(model.get("name")) if isinstance(model, dict) else repr(model)


def _differing(found: Any, wanted: dict[str, Any]) -> str:
    if not isinstance(found, dict):
        return "all keys"
    return ", ".join(sorted(key for key in {*found, *wanted} if found.get(key) != wanted.get(key)))


def _identity_problem(metadata: dict[bytes, bytes], identity: Identity, strict: bool) -> str | None:
    """A file written for another dataset or model belongs to another job. Strict: the file must
    say which (every file the job writes does); else only what it says is compared."""
    raw = metadata.get(b"dataset_fingerprint")
    if identity.fingerprint is not None:
        if raw is None:
            if strict:
                return "its footer names no dataset fingerprint: not written by this job"
        elif (fingerprint := json.loads(raw)) != identity.fingerprint:
            return (f"written for another dataset (fingerprint {str(fingerprint)[:16]}, this folder's "
                    f"{identity.fingerprint[:16]}): a file of another job")
    raw = metadata.get(b"model")
    if identity.model is not None:
        if raw is None:
            if strict:
                return "its footer names no model: not written by this job"
        elif (model := json.loads(raw)) != identity.model:
            return (f"written by another model ({_model_name(model)}, this folder's "
                    f"{_model_name(identity.model)}; {_differing(model, identity.model)} differ): "
                    "a file of another job")
    return None


def _stats_problem(stats: Any, unit: int | None, num_rows: int) -> str | None:
    if not isinstance(stats, dict):
        return "its footer's unit counts are not a JSON object"
    missing = [key for key in STATS_KEYS if key not in stats]
    if missing:
        return f"its footer's unit counts lack {', '.join(missing)}"
    malformed = [key for key in COUNT_KEYS if type(stats[key]) is not int or stats[key] < 0]
    if not isinstance(stats["errors_by_type"], dict) or not all(
            type(count) is int for count in stats["errors_by_type"].values()):
        malformed.append("errors_by_type")
    if type(stats["top5_available"]) is not bool:
        malformed.append("top5_available")
    if not isinstance(stats["ids_digest"], str) or not re.fullmatch(r"[0-9a-f]{16}", stats["ids_digest"]):
        malformed.append("ids_digest")
    if malformed:
        return f"its footer's unit counts are malformed ({', '.join(malformed)})"
    if unit is not None and stats["unit"] != unit:
        return (f"its footer says it holds unit {stats['unit']}, its name says unit {unit}: "
                "a renamed or copied file")
    if stats["n"] != num_rows:
        return f"its footer counts {stats['n']} rows, the file holds {num_rows}"
    return None


def _ends_problem(source: pa.NativeFile) -> str | None:
    """Parquet magic at both ends: a file cut short (or not Parquet at all) fails here."""
    size = source.size()
    if size == 0:
        return "the file is empty (0 bytes)"
    if size < 2 * len(MAGIC) + 4:
        return f"not a Parquet file ({size} bytes)"
    if source.read_at(len(MAGIC), 0) != MAGIC:
        return "not a Parquet file (no PAR1 magic at its start)"
    if source.read_at(len(MAGIC), size - len(MAGIC)) != MAGIC:
        return "cut short: no PAR1 magic at its end (a truncated or partly written file)"
    return None


def read_footer(path: Path, unit: int | None, identity: Identity = Identity(), strict: bool = True) -> Footer:
    """Check one unit file from its ends and footer alone; ``unit``: the number its name gives
    (None: not checked). Strict (a job's own folder): the unit counts and the dataset and model
    must be in the footer; else files without them (older or hand-made) pass."""
    footer = Footer(unit if unit is not None else -1, path)
    try:
        with pa.OSFile(str(path)) as source:
            footer.problem = _ends_problem(source)
            if footer.problem is not None:
                return footer
            metadata = pq.read_metadata(source)
        footer.num_rows = metadata.num_rows
        footer.problem = _schema_problem_cached(metadata.schema)
        if footer.problem is not None:
            return footer
        key_values = metadata.metadata or {}
        raw = key_values.get(UNIT_STATS_KEY.encode())
        if raw is None:
            if strict:
                footer.problem = "its footer has no unit counts: not written by the job"
        else:
            footer.stats = json.loads(raw)
            footer.problem = _stats_problem(footer.stats, unit, metadata.num_rows)
        if footer.problem is None:
            footer.problem = _identity_problem(key_values, identity, strict)
    except (OSError, pa.ArrowException) as error:
        footer.problem = f"its footer cannot be read ({describe_error(error)})"
    except ValueError as error:  # JSON in the footer that does not parse
        footer.problem = f"its footer's metadata is not valid JSON ({describe_error(error)})"
    return footer


def read_footers(files: Iterable[tuple[int, Path]], identity: Identity = Identity(),
                 strict: bool = True, check_unit: bool = True) -> Iterator[Footer]:
    """read_footer of each (unit, path), yielded in the order given."""
    files = list(files)

    def one(item: tuple[int, Path]) -> Footer:
        footer = read_footer(item[1], item[0] if check_unit else None, identity, strict)
        footer.unit = item[0]
        return footer

    if len(files) < 2 * CHECK_THREADS:
        yield from map(one, files)
        return
    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="footer-check") as pool:
        for start in range(0, len(files), CHECK_WINDOW):  # bounded: not a future per unit at once
            yield from pool.map(one, files[start:start + CHECK_WINDOW])


def rows_problem(path: Path) -> str | None:
    """Why the file's rows cannot be read (every column, every page; page checksums verified
    where the file has them), else None. Reads the whole file: for verify and for naming the
    file a failed read came from, not for every resume."""
    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as parquet:
            for _ in parquet.iter_batches(batch_size=65_536):
                pass
    except (OSError, pa.ArrowException) as error:
        return f"its rows cannot be read ({describe_error(error)})"
    return None


def first_unreadable(files: Iterable[tuple[int, Path]]) -> tuple[int, Path, str] | None:
    """The first unit file whose rows cannot be read, with why."""
    for unit, path in files:
        problem = rows_problem(path)
        if problem is not None:
            return unit, path, problem
    return None


def move_aside(path: Path) -> Path:
    """Move a unit file that does not count into predictions/_damaged/, with a UTC time suffix."""
    folder = path.parent / DAMAGED_DIR
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder / f"{path.name}.{stamp}"
    count = 1
    while target.exists():
        target = folder / f"{path.name}.{stamp}-{count}"
        count += 1
    os.replace(path, target)
    return target


@dataclass
class Committed:
    """The units whose committed file counts and their footers' counts summed (no footer is
    kept: at 1e5 units they would weigh some 100 MB); and the files moved aside."""

    units: set[int] = field(default_factory=set)
    totals: dict[str, Any] | None = None
    moved: list[tuple[Footer, Path]] = field(default_factory=list)

    def add(self, footer: Footer) -> None:
        self.units.add(footer.unit)
        parts = [footer.stats] if self.totals is None else [self.totals, footer.stats]
        self.totals = merge_stats(parts)


def examine_committed(output_dir: str | Path, n_units: int,
                      identity: Identity) -> tuple[Committed, list[Footer]]:
    """The committed files that count, and those that do not (with why), moving nothing."""
    output = Path(output_dir)
    result, rejected = Committed(), []
    files = [(unit, unit_path(output, unit)) for unit in sorted(committed_units(output))]
    for footer in read_footers(files, identity, strict=True):
        if footer.problem is None and footer.unit >= n_units:
            footer.problem = f"this job has units 0 to {n_units - 1} only: a file of another job"
        if footer.problem is None:
            result.add(footer)
        else:
            rejected.append(footer)
    return result, rejected


def check_committed(output_dir: str | Path, n_units: int, identity: Identity) -> Committed:
    """On resume (under the output lock): the committed files that count. Every other unit file
    is moved aside with a warning, so that its unit is pending again."""
    output = Path(output_dir)
    result, rejected = examine_committed(output, n_units, identity)
    for footer in rejected:
        try:
            target = move_aside(footer.path)
        except OSError as error:
            raise CommittedError(
                f"{footer.path}: {footer.problem}, and it cannot be moved aside ({describe_error(error)}); "
                f"move it out of {PREDICTIONS_DIR}/ by hand, then run the job again") from None
        result.moved.append((footer, target))
        if len(result.moved) <= WARN_EACH:
            redo = f"unit {footer.unit} will be run again" if footer.unit < n_units else "no unit of this job"
            log.warning("%s: %s; moved to %s, %s", footer.path.relative_to(output), footer.problem,
                        target.relative_to(output), redo)
    if len(result.moved) > WARN_EACH:
        log.warning("%d more unit files that do not count moved to %s; their units will be run again",
                    len(result.moved) - WARN_EACH, output / PREDICTIONS_DIR / DAMAGED_DIR)
    return result


def describe_damage(unit: int, path: Path, problem: str, repaired_by_job: bool = True) -> str:
    """'unit-000003.parquet: <problem>; <the fix>'. The job repairs what its footer check finds; a
    file whose footer is sound but whose rows are not has to be moved away by hand first."""
    if repaired_by_job:
        fix = f"run the job again to redo unit {unit} (it moves the file aside)"
    else:
        fix = (f"move it out of {PREDICTIONS_DIR}/ (e.g. into {PREDICTIONS_DIR}/{DAMAGED_DIR}/), "
               f"then run the job again to redo unit {unit}")
    return f"{path.name}: {problem}; {fix}"
