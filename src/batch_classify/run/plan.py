"""``batch-classify plan``: list the input, write the unit manifest, say what a job will do.

Same config and overrides as a job; no model is loaded. Run it before submitting a large
job: it lists once (the job then reuses the listing), and on an output folder in use it
says how much is committed and what is left.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from batch_classify.core.config import ConfigError, JobSpec, parse_args
from batch_classify.core.errors import UserError
from batch_classify.core.faults import output_fault
from batch_classify.core.layout import DAMAGED_DIR, INPUT_DIR, MANIFEST
from batch_classify.core.ownership import check_location, check_url_location, claim
from batch_classify.core.secrets import keep_live, redact_logs, redact_text, redact_url
from batch_classify.core.storage import is_url, side_mistake
from batch_classify.inputs.listing import (
    LISTING_FORMAT,
    Listing,
    input_changes,
    listing_data,
    read_listing,
    write_listing,
)
from batch_classify.inputs.listing import matches as listing_matches
from batch_classify.inputs.objects import url_pattern, url_root
from batch_classify.inputs.tars import is_pattern, shard_root
from batch_classify.output.committed import Identity, examine_committed
from batch_classify.output.manifest import OutputLock, OutputMismatch, read_manifest
from batch_classify.output.remote import attach, default_staging, push_staged
from batch_classify.output.room import (
    UnitShape,
    embedding_dim_hint,
    estimate_output,
    label_names_hint,
    room_of,
)
from batch_classify.output.writer import committed_units
from batch_classify.pipeline.distributed import CPU_BATCH_SIZE, GPU_BATCH_SIZE

log = logging.getLogger("batch_classify")

REPORT_FILES = 12
"""metrics.json, report.md, its tables and pictures, config.yaml, manifest.json, timing.json."""


def _differences(existing: Listing | None, old: dict[str, Any], spec: JobSpec) -> list[str]:
    """What makes the folder's job another one, key by key: from its listing where it has one
    (paths made absolute as now), else from its manifest's config."""
    now = listing_data(spec.data)
    if existing is None:
        before = old.get("config", {}).get("data", {})
        keys = [key for key in now if key != "path"]  # the config may hold it relative
    else:
        before, keys = existing.info["data"], list(now)
    found = [f"data.{key}: {before.get(key)!r} in the folder, {now[key]!r} now"
             for key in keys if before.get(key) != now[key]]
    if existing is not None:
        configured = existing.info["unit_size_configured"]
        if spec.output.unit_size and configured != spec.output.unit_size:
            found.append(f"output.unit_size: {configured or 'automatic'} in the folder, "
                         f"{spec.output.unit_size} now")
        if existing.info.get("format") != LISTING_FORMAT:
            found.append("its input listing is of another batch-classify version")
    return found or [f"data.path: {before.get('path')!r} in the folder, {now['path']!r} now"]


def listing_batch_size(spec: JobSpec) -> int:
    """The batch size automatic units are whole multiples of: ``runtime.batch_size``, else the
    device default (a GPU's, a multiple of the CPU's, unless ``runtime.device`` is cpu), so
    that a listing from ``plan`` on a login node suits the job on either."""
    if spec.runtime.batch_size is not None:
        return spec.runtime.batch_size
    return CPU_BATCH_SIZE if spec.runtime.device == "cpu" else GPU_BATCH_SIZE


class InputChanged(UserError, RuntimeError):
    """The input is no longer the one the output folder's listing was made from."""


def check_output_location(spec: JobSpec) -> None:
    """Refuse an output.dir inside, equal to or above the input, before anything is written."""
    data = spec.data
    root = data.path if os.path.exists(data.path) else (
        str(shard_root(data.path)) if is_pattern(data.path) and not is_url(data.path) else None)
    check_location(spec.output.dir, root,
                   [data.labels, data.class_subset, data.real_labels,
                    *(name for name in spec.models if os.path.exists(name))])


def check_store_location(spec: JobSpec) -> None:
    """Where output.dir is a URL, before its staging folder is made: refuse an output.dir inside,
    equal to or above a data.path in the same store, and a staging folder inside, equal to or
    above a local data.path."""
    data = spec.data
    if is_url(data.path):
        root = url_root(data.path, False) if url_pattern(data.path) else data.path
        check_url_location(spec.output.dir, root)
        return
    staging = spec.output.staging or default_staging(spec.output.dir)
    root = data.path if os.path.exists(data.path) else (
        str(shard_root(data.path)) if is_pattern(data.path) else None)
    check_location(staging, root, key="output.staging")


def prepare_listing(spec: JobSpec, output: Path) -> tuple[Listing, bool]:
    """Main rank: the folder's listing where it is this job's and its input is unchanged, else
    a new one (refused where it would orphan another job's committed predictions). Returns
    (listing, listed now)."""
    claim(output)
    existing = read_listing(output, spec.data.storage_options, spec.data.path)
    if existing is not None and listing_matches(existing, spec.data, spec.output.unit_size):
        change = input_changes(existing, spec.data)
        if change is None:
            return existing, False
        if not spec.output.overwrite and (change.missing or committed_units(output)):
            raise InputChanged(
                f"data.path {spec.data.path} changed since it was listed into {output / INPUT_DIR}: "
                f"{change.describe()}. " + (
                    "If a filesystem is missing, mount it and run again; if the data changed, "
                    if change.missing else "The predictions committed there belong to the input as "
                    "it was: ") + "choose a new output.dir to classify the input as it is now, or set "
                "output.overwrite true to list it again (this folder's predictions are then discarded "
                "if its items differ)")
        log.warning("data.path changed since it was listed (%s): listing it again", change.describe())
    old = read_manifest(output)
    if old is not None and committed_units(output) and not spec.output.overwrite:
        raise OutputMismatch(
            f"output.dir {output} holds results of a different job ("
            + "; ".join(_differences(existing, old, spec))
            + "). Choose another output.dir, or set output.overwrite true to discard them.")
    started = time.monotonic()
    listing = write_listing(spec.data, output, spec.output.unit_size, listing_batch_size(spec))
    log.info("listed %s in %.1f s: %s", spec.data.path, time.monotonic() - started, describe_listing(listing))
    return listing, True


def describe_listing(listing: Listing) -> str:
    items = f"{listing.n_items} items" if listing.n_items is not None else "items counted as read"
    return f"{listing.kind}, {items} in {listing.n_units} units"


def committed_summary(listing: Listing, committed: set[int]) -> tuple[int | None, str]:
    """(items already committed, where the listing knows them; a sentence for the log)."""
    if listing.n_items is None:
        return None, f"{len(committed)} of {listing.n_units} units already committed"
    done = sum(listing.unit_items(u) for u in committed if u < listing.n_units)
    return done, (f"{done} of {listing.n_items} items already committed "
                  f"({len(committed)} of {listing.n_units} units)")


def plan(spec: JobSpec) -> str:
    """List (or reuse the listing), then describe the job's units and the output folder."""
    if is_url(spec.output.dir):  # an output in a store: planned in its staging folder, then sent
        check_store_location(spec)
        remote = attach(spec.output.dir, spec.output.storage_options, spec.output.staging)
        remote.acquire()  # the listing it sends is the output's: one writer, as for a job
        try:
            remote.pull()
            text = plan(dataclasses.replace(spec, output=dataclasses.replace(spec.output,
                                                                             dir=str(remote.local))))
            push_staged(remote.local, end=False)
        finally:
            remote.release()
        return text
    output = Path(spec.output.dir)
    started = time.monotonic()
    check_output_location(spec)
    claim(output)
    listing, listed_now = read_listing(output, spec.data.storage_options, spec.data.path), False
    if (listing is None or not listing_matches(listing, spec.data, spec.output.unit_size)
            or input_changes(listing, spec.data) is not None):
        with OutputLock(output):  # writing a listing: not beside a running job
            listing, listed_now = prepare_listing(spec, output)
    # Reading a listing needs no lock: plan reports on a running job's progress too. Committed
    # files are counted as a resume counts them (footers checked), and none is moved.
    checked, rejected = examine_committed(output, listing.n_units, Identity.of(read_manifest(output)))
    committed = checked.units
    seconds = time.monotonic() - started
    info = listing.info
    if listing.n_items is not None:
        sizes = [listing.unit_items(u) for u in range(listing.n_units)]
        items = f"{listing.n_items} (units of {min(sizes)} to {max(sizes)})"
    else:
        items = f"counted as each tar is read ({listing.n_units} tars)"
    labelled = {None: "known once read", 0: "none: labelling mode"}.get(info["n_labelled"],
                                                                        info["n_labelled"])
    has_manifest = (output / MANIFEST).exists()
    damaged = []
    if rejected:
        damaged.append(("damaged", f"{len(rejected)} unit file(s) damaged or of another job (first: "
                                   f"{rejected[0].path.name}: {rejected[0].problem}); the next run moves "
                                   f"them to {output / 'predictions' / DAMAGED_DIR} and redoes their units"))
    rows = [
        ("input", f"{redact_url(spec.data.path)} ({listing.kind}; ids relative to "
                  f"{redact_url(listing.root)})"),
        ("listing", f"{'written' if listed_now else 'reused'}: {output / INPUT_DIR} ({seconds:.1f} s)"),
        ("units", f"{listing.n_units}"),
        ("items", items),
        ("labelled", str(labelled)),
        ("classes", "ImageNet-1k" if listing.classes is None else f"{len(listing.classes)} of its own"),
        ("output", f"{output}: {len(committed)} of {listing.n_units} units committed, "
                   f"{listing.n_units - len(committed)} pending"
                   + ("" if has_manifest else " (no job run yet)")),
        *damaged,
        ("files", f"{listing.n_units} prediction files in {output / 'predictions'}, about {REPORT_FILES} "
                  f"more beside them, {len(list((output / INPUT_DIR).iterdir()))} in {output / INPUT_DIR}"),
        ("room", room_row(spec, listing, committed)),
    ]
    rows += [("note", note) for note in info["notes"]]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def room_row(spec: JobSpec, listing: Listing, committed: set[int]) -> str:
    """The pending output's estimated size against output.dir's free space and quota (no model is
    loaded: its label names and embedding size come from its config.json where it is a folder)."""
    pending = [u for u in range(listing.n_units) if u not in committed]
    shapes = [UnitShape(spec.output.top_k, label_names_hint(name),
                        embedding_dim_hint(name) if spec.output.embeddings else None,
                        {"config": spec.to_dict()}) for name in spec.models]
    room = room_of(spec.output.dir)
    estimate = estimate_output(listing, pending, shapes)
    verdict = ""
    if room.available is not None and estimate.units_bytes > room.available:
        verdict = ": it does not fit; the job will refuse to start (output.check_space false runs it anyway)"
    elif room.available is not None and estimate.bytes > room.available:
        verdict = ": the report may not fit"
    return f"{estimate.describe()}; {room.describe()}{verdict}"


def main(argv: list[str] | None = None) -> int:
    try:
        spec = parse_args(argv, prog="batch-classify plan")
    except ConfigError as error:
        print(f"batch-classify plan: configuration error: {redact_text(str(error))}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    redact_logs()
    keep_live(spec.data.path, spec.data.storage_options)
    try:
        print(plan(spec))
    except UserError as error:
        print(f"batch-classify plan: {redact_text(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:  # the output filesystem failed: one line (core/faults.py)
        mistake = side_mistake(error, {"data.path": spec.data.path, "output.dir": spec.output.dir})
        if mistake is not None:  # a store refused: which one, and why
            print(f"batch-classify plan: {mistake}", file=sys.stderr)
            return 2
        fault = output_fault(error, spec.output.dir)
        if fault is None:
            raise
        print(f"batch-classify plan: {redact_text(fault.line())}", file=sys.stderr)
        return fault.exit_status
    return 0
