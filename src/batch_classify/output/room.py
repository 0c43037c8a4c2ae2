"""Room checked before the work starts: the output's size estimated, compared with the free
space and quota of output.dir's filesystem.

The size is measured, not guessed: a few synthetic rows shaped like the job's (its ids' length,
top-k, label names, embedding size and the metadata every unit file carries) are written as
Parquet in memory, which gives the bytes per row and per file; the pending units' item counts
then give the total. Random scores and class ids do not compress, so the estimate leans high.
A job that cannot fit is refused before it starts (exit 74; ``output.check_space false`` runs
it anyway); one that fits with a thin margin is warned about.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import shutil
import string
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch_classify.core.config import JobSpec
from batch_classify.core.faults import (
    OUTPUT_FAULT_EXIT_STATUS,
    OutputFault,
    existing_ancestor,
    human_size,
    mount_point,
)
from batch_classify.inputs.listing import Listing
from batch_classify.models.embeddings import embedding_array, embedding_field
from batch_classify.output.writer import SCHEMA, UNIT_STATS_KEY, unit_stats

log = logging.getLogger("batch_classify")

REPORT_BYTES = 512 << 10
"""The report beside the predictions: metrics, CSVs, two plots and a contact sheet (0.2 MB for
the 11-image test corpus; the contact sheet's 24 tiles weigh most), with room to spare."""
THIN_MARGIN = 1.5
"""Free space under this many times the estimate is worth a warning."""
SAMPLE_ROWS = 512
MARGIN = 1.1
"""The measured sizes times this: real files differ from the synthetic ones by a few percent
(statistics, the counts' digits), and an estimate should err on the high side."""
DEFAULT_ID_LENGTH = 48
DEFAULT_EMBEDDING_DIM = 2048
"""Where the checkpoint's config does not say (a hub id not in the local cache)."""


@dataclass
class UnitShape:
    """What one model's unit files hold, as far as their size goes."""

    top_k: int
    label_names: Sequence[str]
    embedding_dim: int | None
    metadata: dict[str, Any]
    """The key-value metadata every unit file of the model carries (model, fingerprint, config)."""

    @classmethod
    def of(cls, spec: JobSpec, label_names: Sequence[str], identity: dict[str, Any],
           listing: Listing) -> UnitShape:
        """One model's unit files, from its single-model spec, labels and identity (not loaded)."""
        metadata = {"model": identity, "dataset_fingerprint": listing.info["fingerprint"],
                    "config": spec.to_dict()}
        dim = embedding_dim_hint(spec.model.name) if spec.output.embeddings else None
        return cls(spec.output.top_k, label_names, dim, metadata)


def _parquet_bytes(table: pa.Table) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, write_page_checksum=True)
    return sink.getvalue().size


def _rows(n: int, shape: UnitShape, id_length: int, rng: random.Random) -> dict[str, list]:
    names = list(shape.label_names) or ["class"]
    k = min(shape.top_k, max(1, len(names)))
    alphabet = string.ascii_letters + string.digits
    rows: dict[str, list] = {"id": [], "label": [], "target": [], "topk_ids": [], "topk_labels": [],
                             "topk_scores": [], "error": []}
    for i in range(n):
        classes = rng.sample(range(len(names)), k)
        rows["id"].append(f"{i:08d}" + "".join(rng.choices(alphabet, k=max(0, id_length - 8))))
        rows["label"].append(classes[0])
        rows["target"].append(classes[0])
        rows["topk_ids"].append(classes)
        rows["topk_labels"].append([names[c] for c in classes])
        rows["topk_scores"].append(sorted((rng.random() for _ in range(k)), reverse=True))
        rows["error"].append(None)
    return rows


def _table(rows: dict[str, list], shape: UnitShape) -> pa.Table:
    table = pa.Table.from_pydict({name: rows[name] for name in SCHEMA.names}, schema=SCHEMA)
    if shape.embedding_dim is not None:
        vectors = np.random.default_rng(0).standard_normal((len(rows["id"]), shape.embedding_dim))
        table = table.append_column(embedding_field(shape.embedding_dim),
                                    embedding_array(list(vectors.astype(np.float16)), shape.embedding_dim))
    stats = {UNIT_STATS_KEY: {"unit": 0, **unit_stats(rows)}}
    return table.replace_schema_metadata({key: json.dumps(value) for key, value in
                                          {**shape.metadata, **stats}.items()})


def unit_file_bytes(shape: UnitShape, id_length: int = DEFAULT_ID_LENGTH,
                    sample_rows: int = SAMPLE_ROWS) -> tuple[float, int]:
    """(bytes per row, bytes per file besides its rows) of this model's unit files, measured."""
    rng = random.Random(0)
    one = _parquet_bytes(_table(_rows(1, shape, id_length, rng), shape))
    many = _parquet_bytes(_table(_rows(sample_rows, shape, id_length, rng), shape))
    per_row = (many - one) / (sample_rows - 1)
    return per_row * MARGIN, int(max(0.0, one - per_row) * MARGIN)


@dataclass
class Estimate:
    """The bytes a run would add to output.dir, and what they are made of."""

    units_bytes: int
    """The pending units' files, every model's."""
    report_bytes: int
    pending_units: int
    pending_items: int | None
    """None where the item count is known only as the input is read (tars)."""
    note: str = ""

    @property
    def bytes(self) -> int:
        return self.units_bytes + self.report_bytes

    def describe(self) -> str:
        if not self.pending_units:
            return "nothing pending"
        items = f"{self.pending_items} items in " if self.pending_items is not None else ""
        return (f"about {human_size(self.units_bytes)} for {items}{self.pending_units} pending units"
                f"{self.note}, and {human_size(self.report_bytes)} for the report")


def mean_id_length(listing: Listing) -> int:
    """The mean length of the first unit's ids, where the listing holds them (folders, file lists)."""
    if not listing.reader.item_by_item or listing.n_units == 0:
        return DEFAULT_ID_LENGTH
    lengths = []
    for record in listing.records(0, read_images=False):
        lengths.append(len(record.id.encode()))
        if len(lengths) >= 1000:
            break
    return max(1, round(sum(lengths) / len(lengths))) if lengths else DEFAULT_ID_LENGTH


def estimate_output(listing: Listing, pending: Sequence[int], shapes: Sequence[UnitShape]) -> Estimate:
    """What the pending units of every model (and the reports) will take in output.dir."""
    pending = [int(u) for u in pending]
    counts = [listing.unit_items(u) for u in pending]
    known = [c for c in counts if c is not None]
    if not pending:
        return Estimate(0, 0, 0, 0)
    id_length = mean_id_length(listing)
    units = 0
    for shape in shapes:
        per_row, per_file = unit_file_bytes(shape, id_length)
        units += int(per_row * sum(known)) + per_file * len(pending)
    unknown = len(counts) - len(known)
    note = (f"; {unknown} units (tars) counted without their rows, known only once read" if unknown else "")
    items = sum(known) if not unknown else None
    return Estimate(units, REPORT_BYTES * len(shapes), len(pending), items, note)


# ---------------------------------------------------------------- free space and quota

_QUOTACTL_FD = 443  # the same number on every Linux architecture (5.14+)
_Q_GETQUOTA = 0x800007
_QUOTA_TYPES = (0, 1)  # user, group
_QIF_BLIMITS = 1


class _Quota(ctypes.Structure):
    _fields_ = [("bhardlimit", ctypes.c_uint64), ("bsoftlimit", ctypes.c_uint64),
                ("curspace", ctypes.c_uint64), ("ihardlimit", ctypes.c_uint64),
                ("isoftlimit", ctypes.c_uint64), ("curinodes", ctypes.c_uint64),
                ("btime", ctypes.c_uint64), ("itime", ctypes.c_uint64), ("valid", ctypes.c_uint32)]


def _kernel_quota(path: Path) -> int | None:
    """Bytes left under the user's and group's hard block quota on ``path``'s filesystem
    (quotactl_fd: ext4, XFS, tmpfs and others with quotas on); None where none applies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, AttributeError):
        return None
    left = []
    try:
        for kind, ident in zip(_QUOTA_TYPES, (os.getuid(), os.getgid())):
            quota = _Quota()
            command = ctypes.c_uint((_Q_GETQUOTA << 8) | kind)
            if libc.syscall(_QUOTACTL_FD, descriptor, command, ident, ctypes.byref(quota)) != 0:
                continue  # ENOSYS, ESRCH (quotas off), EPERM, ...: no quota to go by
            if quota.valid & _QIF_BLIMITS and quota.bhardlimit:
                left.append(max(0, quota.bhardlimit * 1024 - quota.curspace))
    finally:
        os.close(descriptor)
    return min(left) if left else None


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem mounted at ``path`` (a mount point), from /proc/self/mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if "-" in fields and len(fields) > 4 and fields[4] == str(path):
            found = fields[fields.index("-") + 1]
    return found


def parse_lfs_quota(text: str) -> int | None:
    """Bytes left under a Lustre hard block limit from ``lfs quota -q`` output, or None.
    Columns: filesystem, kbytes used (``*`` once over), soft quota, hard limit, grace, ..."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        try:
            used, limit = int(fields[1].rstrip("*")), int(fields[3].rstrip("*"))
        except ValueError:
            continue
        if limit > 0:
            return max(0, (limit - used) * 1024)
    return None


def _lustre_quota(mount: Path) -> int | None:
    """Bytes left under the user's and group's Lustre quota (``lfs quota``), or None."""
    lfs = shutil.which("lfs")
    if lfs is None:
        return None
    left = []
    for flag, ident in (("-u", os.getuid()), ("-g", os.getgid())):
        try:
            done = subprocess.run([lfs, "quota", "-q", flag, str(ident), str(mount)], capture_output=True,
                                  text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        value = parse_lfs_quota(done.stdout) if done.returncode == 0 else None
        if value is not None:
            left.append(value)
    return min(left) if left else None


@dataclass
class Room:
    """Free space and quota of output.dir's filesystem."""

    mount: Path
    free: int | None
    total: int | None
    quota_left: int | None

    @property
    def available(self) -> int | None:
        values = [v for v in (self.free, self.quota_left) if v is not None]
        return min(values) if values else None

    def describe(self) -> str:
        parts = []
        if self.free is not None:
            parts.append(f"{human_size(self.free)} free of {human_size(self.total or 0)}")
        if self.quota_left is not None:
            parts.append(f"{human_size(self.quota_left)} left under the quota")
        return f"filesystem {self.mount}: " + (", ".join(parts) or "free space unknown")


def room_of(output_dir: str | os.PathLike) -> Room:
    where = existing_ancestor(output_dir)
    mount = mount_point(where)
    try:
        stat = os.statvfs(where)
        free, total = stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize
    except OSError:
        free = total = None
    quota = _lustre_quota(mount) if filesystem_type(mount) == "lustre" else _kernel_quota(where)
    return Room(mount, free, total, quota)


def check_room(output_dir: str | os.PathLike, estimate: Estimate, refuse: bool = True) -> str | None:
    """Compare the estimate with the room left: raise OutputFault (exit 74) where the pending
    units cannot fit and ``refuse``; log a warning where they may not (or the margin is thin).
    Returns the sentence for the log, None where nothing is pending."""
    if not estimate.pending_units:
        return None
    room = room_of(output_dir)
    said = f"output: {estimate.describe()}; {room.describe()}"
    available = room.available
    if available is None:
        return said
    if estimate.units_bytes > available and refuse:
        raise OutputFault(
            f"output.dir {output_dir} has no room for this job: it needs {estimate.describe()}, "
            f"and its {room.describe()}",
            "free space (or raise the quota), choose an output.dir with room, or set "
            "output.check_space false to run anyway (committed units are kept if it fills up)",
            OUTPUT_FAULT_EXIT_STATUS, os.fspath(output_dir))
    if estimate.bytes > available:
        log.warning("%s: it may not fit%s; committed units are kept if the disk fills up", said,
                    "" if refuse else " (output.check_space is false: the job runs)")
    elif estimate.bytes * THIN_MARGIN > available:
        log.warning("%s: a thin margin (under %.1fx); if the disk fills up the job stops with its "
                    "committed units kept", said, THIN_MARGIN)
    return said


def label_names_hint(model_name: str) -> list[str]:
    """The class names a checkpoint's config.json gives (local folders), else ImageNet-like ones."""
    try:
        names = json.loads((Path(model_name) / "config.json").read_text()).get("id2label") or {}
    except (OSError, ValueError, AttributeError):
        names = {}
    return [str(name) for name in names.values()] or ["a class name of average length"] * 1000


def embedding_dim_hint(model_name: str) -> int:
    """The embedding size a checkpoint's config.json gives (local folders), else a generous guess."""
    try:
        config = json.loads((Path(model_name) / "config.json").read_text())
    except (OSError, ValueError):
        return DEFAULT_EMBEDDING_DIM
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    for source, key in ((config, "projection_dim"), (config, "num_features"), (config, "hidden_dim"),
                        (config, "hidden_size"), (vision, "hidden_size")):
        value = source.get(key)
        if isinstance(value, int) and value > 0:
            return value
    sizes = config.get("hidden_sizes")
    if isinstance(sizes, list) and sizes and isinstance(sizes[-1], int):
        return sizes[-1]
    return DEFAULT_EMBEDDING_DIM

