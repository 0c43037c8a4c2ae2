"""The classification job: inputs -> shard -> decode/preprocess -> predict -> write -> aggregate."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .aggregate import METRICS, TIMING, aggregate, format_table
from .config import ConfigError, JobSpec, parse_args
from .decode import Batch, TaskDataset, describe_error
from .distributed import (
    JobBoard,
    RankFailed,
    configure_logging,
    default_batch_size,
    default_store,
    init_state,
    keep_host_memory,
    plan_cpu,
)
from .errors import UserError
from .labels import class_subset, label_targets
from .listing import Listing, read_listing
from .loader import UnitTasks, make_loader
from .manifest import FORMAT_VERSION, OutputLock, prepare_output, read_manifest, write_json
from .model import Inference, LoadedModel, describe_model, load_model, prepare_inference
from .plan import committed_summary, prepare_listing
from .predict import Predictor
from .preemption import Preempted, StopFlag
from .progress import ErrorLog, Progress
from .shard import PENDING_FILE, UnitQueue
from .writer import UnitWriter, committed_units

log = logging.getLogger("batch_classify")


def build_manifest(spec: JobSpec, listing: Listing, identity: dict[str, Any],
                   unavailable: str | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "batch_classify_version": __version__,
        "dataset": {
            "path": spec.data.path,
            "kind": listing.kind,
            "n_items": listing.n_items,
            "n_labelled": listing.info["n_labelled"],
            "n_units": listing.n_units,
            "fingerprint": listing.info["fingerprint"],
            "classes": list(listing.classes) if listing.classes is not None else "imagenet-1k",
            "notes": listing.info["notes"],
        },
        "model": identity,
        "job": {"top_k": spec.output.top_k, "unit_size": listing.info["unit_size"],
                "class_subset": spec.data.class_subset},
        "accuracy_unavailable": unavailable,
        "config": spec.to_dict(),
    }


MIN_ITEMS_FOR_ERROR_CHECK = 100
COLUMNS = ("id", "label", "target", "topk_ids", "topk_labels", "topk_scores", "error")
_RUNS = itertools.count()


class TooManyErrors(UserError, RuntimeError):
    """More than runtime.max_error_fraction of the items seen failed to decode."""


@dataclass
class RankWork:
    """What one rank needs to run its share: the listing, the units to claim, the model."""

    listing: Listing
    units: UnitQueue
    loaded: LoadedModel
    inference: Inference
    targets: list[int | None] | None
    metadata: dict[str, Any]


class UnitRows:
    """Rows of the units in hand; a unit is committed as soon as its last item's row is in."""

    def __init__(self, writer: UnitWriter, names: dict[int, str], targets: list[int | None] | None,
                 errors: ErrorLog):
        self.writer = writer
        self.names = names
        self.targets = targets
        self.errors = errors
        self.open: dict[int, dict[str, list]] = {}

    def _target(self, label: int | None) -> int | None:
        if self.targets is None or label is None or not 0 <= label < len(self.targets):
            return None
        return self.targets[label]

    def add(self, batch: Batch, pending) -> None:
        ids, scores = pending.result()
        predictions = iter(zip(ids, scores))
        for key, ok, error in zip(batch.items, batch.ok, batch.errors):
            rows = self.open.get(key.unit)
            if rows is None:
                rows = self.open[key.unit] = {c: [] for c in COLUMNS}
            rows["id"].append(key.id)
            rows["label"].append(key.label)
            rows["target"].append(self._target(key.label))
            if ok:
                top_ids, top_scores = next(predictions)
                rows["topk_ids"].append(top_ids)
                rows["topk_labels"].append([self.names[i] for i in top_ids])
                rows["topk_scores"].append(top_scores)
            else:
                self.errors.add(key.id, error)
                for column in ("topk_ids", "topk_labels", "topk_scores"):
                    rows[column].append(None)
            rows["error"].append(error)
            if key.last:
                self.writer.submit(key.unit, self.open.pop(key.unit))


def _predict_units(spec: JobSpec, work: RankWork, device: torch.device, progress: Progress,
                   workers: int, threads: int, stop: StopFlag,
                   overlap: bool | None = None) -> dict[str, Any]:
    """Claim units until none is left; commit each as it completes. Returns this rank's timing."""
    inference = work.inference
    tasks = UnitTasks(work.units, work.listing, spec.runtime.batch_size, stopping=lambda: stop.requested)
    dataset = TaskDataset(inference.input_path.worker, spec.runtime.max_image_pixels)
    loader = make_loader(dataset, tasks, workers, device, threads, stopping=lambda: stop.requested)
    predictor = Predictor(inference.model, work.loaded.labels, device, spec.runtime.precision,
                          spec.output.top_k, inference.prepare(device),
                          pad_to=spec.runtime.batch_size if spec.runtime.compile else None)
    names = dict(zip(work.loaded.labels.ids, work.loaded.labels.names))
    writer = UnitWriter(spec.output.dir, work.metadata)
    errors = ErrorLog(spec.runtime.log_every_s)
    rows = UnitRows(writer, names, work.targets, errors)
    processed = 0

    def emit(batch: Batch, pending) -> None:
        nonlocal processed
        rows.add(batch, pending)
        processed += len(batch.items)
        done, failed = progress.add(len(batch.items), sum(e is not None for e in batch.errors))
        _check_error_fraction(spec.runtime.max_error_fraction, done, failed, progress.total)

    first_batch = None
    # On a GPU the host reads the next batch and queues it before collecting the previous
    # one, so the device never waits for the host's row building. On the CPU the forward
    # pass is synchronous: rows are written at once, and a unit commits as soon as it ends.
    overlap = device.type != "cpu" if overlap is None else overlap
    in_flight = None
    batches = iter(loader)
    try:
        while not stop.requested:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception:
                if stop.requested:  # the signal also reached (and ended) a DataLoader worker
                    break
                raise
            if first_batch is None:
                first_batch = time.time()
            batch = inference.input_path.finish_decoding(batch)
            launched = (batch, predictor.launch(batch.pixel_values))
            if in_flight is not None:
                emit(*in_flight)
            in_flight = launched
            if not overlap:
                emit(*in_flight)
                in_flight = None
        if in_flight is not None:
            emit(*in_flight)
    finally:
        del batches  # shuts the DataLoader workers (or decode threads) down
        errors.flush()
        writer.close()
    return {"first_batch": first_batch, "last_write": time.time(), "items": processed,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _check_error_fraction(limit: float | None, done: int, failed: int, total: int | None) -> None:
    if limit is None or done < min(MIN_ITEMS_FOR_ERROR_CHECK, total or MIN_ITEMS_FOR_ERROR_CHECK):
        return
    if failed > limit * done:
        raise TooManyErrors(
            f"{failed} of the {done} items seen so far could not be decoded, more than "
            f"runtime.max_error_fraction ({limit}); is data.path the right input? "
            "Committed units are kept: fix the input and run again, or raise the limit."
        )


def run(spec: JobSpec, leave_process_group: bool = True) -> dict[str, Any] | None:
    """Run the job on this rank; the main rank returns the metrics.

    ``leave_process_group=False`` keeps the ranks' group for a caller that goes on (bench).
    """
    state = init_state(spec.runtime.device, spec.runtime.timeout_s)
    configure_logging(state.process_index, state.is_main_process)
    stop = StopFlag().install()
    namespace = f"batch_classify/run{next(_RUNS)}/"
    board = JobBoard(default_store(), state.process_index, state.num_processes, spec.runtime.timeout_s,
                     namespace=namespace)
    lock = OutputLock(spec.output.dir) if state.is_main_process else contextlib.nullcontext()
    try:
        with lock:
            return _run_rank(spec, state, stop, board)
    except Preempted:
        board.report_failure("stopped by a signal (preemption); its finished units are committed")
        raise
    except RankFailed:
        raise
    except UserError as error:
        board.report_failure(str(error))
        raise
    except BaseException as error:
        log.error("failed: %s", describe_error(error))
        board.report_failure(describe_error(error))
        raise
    finally:
        if leave_process_group:
            state.destroy_process_group()


def resolve_runtime(spec: JobSpec, device: torch.device) -> JobSpec:
    """The spec with the device-dependent defaults filled in (as config.yaml records it)."""
    if spec.runtime.batch_size is not None:
        return spec
    runtime = dataclasses.replace(spec.runtime, batch_size=default_batch_size(device))
    return dataclasses.replace(spec, runtime=runtime)


def _write_pending(output: Path, pending: np.ndarray) -> None:
    temporary = output / f".{PENDING_FILE}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        np.save(handle, pending)
    os.replace(temporary, output / PENDING_FILE)


def _run_rank(spec: JobSpec, state, stop: StopFlag, board: JobBoard) -> dict[str, Any] | None:
    device = state.device
    spec = resolve_runtime(spec, device)
    threads, workers = plan_cpu(state, spec.runtime.num_workers)
    torch.set_num_threads(threads)
    memory = keep_host_memory(device, spec.runtime.keep_host_memory)
    log.info("%d rank(s) on %s; %d thread(s), %d DataLoader worker(s), batches of %d per rank%s",
             state.num_processes, device, threads, workers, spec.runtime.batch_size,
             f"; {memory}" if memory else "")
    output = Path(spec.output.dir)
    output.mkdir(parents=True, exist_ok=True)

    labels, identity = describe_model(spec.model)
    if spec.data.class_subset is not None:
        labels = labels.restrict(class_subset(spec.data.class_subset), spec.data.class_subset)
        identity["label_space"] = labels.note
    if state.is_main_process:
        listing, _ = prepare_listing(spec, output)
        targets, unavailable = label_targets(listing.classes, labels)
        if listing.labelled is False:
            unavailable = None
        manifest = build_manifest(spec, listing, identity, unavailable)
        prepare_output(output, manifest, spec.output.overwrite)
        (output / "config.yaml").write_text(spec.to_yaml())
        committed = committed_units(output)
        pending = np.array([u for u in range(listing.n_units) if u not in committed], dtype=np.int64)
        _write_pending(output, pending)
        already_done, summary = committed_summary(listing, committed)
        if committed:
            log.info("resuming: %s", summary)
        board.announce("output ready")
    else:
        board.wait_for_main("output ready", stop)
        listing = read_listing(output)
        targets, _ = label_targets(listing.classes, labels)
        pending = np.load(output / PENDING_FILE)
        already_done = None
    manifest = read_manifest(output)

    timing = {"first_batch": None, "last_write": time.time(), "items": 0}
    if len(pending):
        loaded = load_model(spec.model, device)
        loaded.labels = labels
        inference = prepare_inference(loaded, spec.runtime, device)
        log.info("model: %s", inference.describe())
        metadata = {"model": manifest["model"], "dataset_fingerprint": manifest["dataset"]["fingerprint"],
                    "config": spec.to_dict()}
        work = RankWork(listing, UnitQueue(pending, board.store, namespace_key(board, "next_unit")),
                        loaded, inference, targets, metadata)
        progress = Progress(listing.n_items, already_done or 0, state.is_main_process,
                            spec.runtime.log_every_s, namespace=board.namespace)
        try:
            timing = _predict_units(spec, work, device, progress, workers, threads, stop)
        finally:
            progress.close()
        if stop.requested:
            log.warning("stopped on request with every finished unit committed; run the same "
                        "command again to resume")
            raise Preempted()
    timings = board.finish(timing, stop)
    if not state.is_main_process:
        board.release(stop)
        return None
    if len(pending):
        started = [t["first_batch"] for t in timings if t["first_batch"] is not None]
        processed = sum(t["items"] for t in timings)
        seconds = max(t["last_write"] for t in timings) - min(started) if started else None
        write_json(output / TIMING, {
            "items_this_run": processed,
            "items_per_rank": [t["items"] for t in timings],
            "peak_rss_mb_per_rank": [t.get("peak_rss_mb") for t in timings],
            "seconds": seconds,
            "images_per_second": processed / seconds if seconds else None,
            "world_size": state.num_processes,
            "device": str(device),
            "precision": spec.runtime.precision,
            "batch_size": spec.runtime.batch_size,
            "input_path": inference.input_path.name,
        })
    metrics = current_metrics(output) if not len(pending) else None
    if metrics is None:
        metrics = aggregate(output)
    print(format_table(metrics), flush=True)
    board.release(stop)
    return metrics


def namespace_key(board: JobBoard, name: str) -> str:
    return board.namespace + name


def current_metrics(output: Path) -> dict[str, Any] | None:
    """metrics.json where it already scores every unit of this job (a rerun of a finished job
    prints it instead of scanning the predictions again), else None."""
    path = output / METRICS
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    manifest = read_manifest(output)
    if metrics.get("dataset", {}).get("n_units") != manifest["dataset"]["n_units"] or (
            metrics.get("model") != manifest["model"]):
        return None
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/classify.py`` and ``batch-classify run``."""
    try:
        spec = parse_args(argv)
    except ConfigError as error:
        print(f"batch-classify: configuration error: {error}", file=sys.stderr)
        return 2
    try:
        run(spec)
    except UserError as error:  # a mistake to fix, not a bug: the message, no traceback
        print(f"batch-classify: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
