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

from batch_classify import __version__
from batch_classify.core.config import ConfigError, JobSpec, parse_args
from batch_classify.core.errors import UserError
from batch_classify.core.faults import OutputFault, leave_status, output_fault, reported_fault
from batch_classify.core.labels import ModelLabels, class_subset, label_targets
from batch_classify.core.layout import CONFIG_FILE, METRICS, MODELS_FILE, PENDING_FILE, TIMING
from batch_classify.core.limits import Limits
from batch_classify.core.ownership import claim
from batch_classify.core.preemption import Preempted, StopFlag
from batch_classify.core.secrets import keep_live, redact_text, redact_url
from batch_classify.core.storage import is_url, retry_summary, side_mistake
from batch_classify.core.text import write_json
from batch_classify.inputs.listing import Listing, read_listing, share_listing
from batch_classify.models.model import Inference, LoadedModel, describe_model, load_model, prepare_inference
from batch_classify.models.predict import Predictor, Scoring
from batch_classify.output.committed import Identity, check_committed
from batch_classify.output.manifest import FORMAT_VERSION, OutputLock, prepare_output, read_manifest
from batch_classify.output.progress import ErrorLog, Progress
from batch_classify.output.redo import Redo, plan_redo
from batch_classify.output.remote import attach, push_staged, store_note
from batch_classify.output.room import UnitShape, check_room, estimate_output
from batch_classify.output.safe import safe_note
from batch_classify.output.units import metrics_from_stats
from batch_classify.output.writer import UnitWriter
from batch_classify.pipeline.decode import Batch, TaskDataset, describe_error
from batch_classify.pipeline.distributed import (
    JobBoard,
    RankFailed,
    Resources,
    configure_logging,
    default_batch_size,
    default_store,
    init_state,
    keep_host_memory,
)
from batch_classify.pipeline.loader import UnitTasks, make_loader
from batch_classify.pipeline.preprocess import MultiTransform
from batch_classify.pipeline.shard import UnitQueue
from batch_classify.results.aggregate import AggregateError, aggregate, format_table, real_labels_path
from batch_classify.results.side_by_side import side_by_side
from batch_classify.run.plan import (
    check_output_location,
    check_store_location,
    committed_summary,
    prepare_listing,
)

log = logging.getLogger("batch_classify")


def build_manifest(spec: JobSpec, listing: Listing, identity: dict[str, Any],
                   unavailable: str | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "batch_classify_version": __version__,
        "dataset": {
            "path": redact_url(spec.data.path),
            "kind": listing.kind,
            "n_items": listing.n_items,
            "n_labelled": listing.info["n_labelled"],
            "n_units": listing.n_units,
            "fingerprint": listing.info["fingerprint"],
            "items_digest": listing.info["items_digest"],
            "classes": list(listing.classes) if listing.classes is not None else "imagenet-1k",
            "notes": listing.info["notes"],
        },
        "model": identity,
        "job": {"top_k": spec.output.top_k, "unit_size": listing.info["unit_size"],
                "class_subset": spec.data.class_subset,
                **({"embeddings": {"normalized": spec.output.normalize_embeddings}}
                   if spec.output.embeddings else {})},
        "accuracy_unavailable": unavailable,
        "config": spec.to_dict(),
    }


MIN_ITEMS_FOR_ERROR_CHECK = 100
COLUMNS = ("id", "label", "target", "topk_ids", "topk_labels", "topk_scores", "error")
_RUNS = itertools.count()


class ModelsError(UserError, ValueError):
    """model.* settings that cannot work together; the message says which and why."""


class TooManyErrors(UserError, RuntimeError):
    """More than runtime.max_error_fraction of the items seen failed to decode."""


@dataclass
class ModelJob:
    """One model of the job: its own single-model spec, output folder and label space."""

    spec: JobSpec
    output: Path
    labels: ModelLabels
    identity: dict[str, Any]
    targets: list[int | None] | None = None
    loaded: LoadedModel | None = None
    inference: Inference | None = None
    metadata: dict[str, Any] | None = None
    committed: dict[str, Any] | None = None
    """Counts summed over the footers of its committed units, as checked on this resume."""


@dataclass
class RankWork:
    """What one rank needs to run its share: the listing, the units to claim, the model(s)."""

    listing: Listing
    units: UnitQueue
    models: list[ModelJob]


class _Quiet:
    """Decode errors are logged once, by the first model's rows."""

    def add(self, *_args) -> None:
        pass


class UnitRows:
    """Rows of the units in hand; a unit is committed as soon as its last item's row is in."""

    def __init__(self, writer: UnitWriter, names: dict[int, str], targets: list[int | None] | None,
                 errors: ErrorLog | _Quiet):
        self.writer = writer
        self.names = names
        self.targets = targets
        self.errors = errors
        self.columns = (*COLUMNS, "embedding") if writer.embedding_dim is not None else COLUMNS
        self.open: dict[int, dict[str, list]] = {}

    def _target(self, label: int | None) -> int | None:
        if self.targets is None or label is None or not 0 <= label < len(self.targets):
            return None
        return self.targets[label]

    def add(self, batch: Batch, pending) -> None:
        ids, scores = pending.result()
        vectors = iter(pending.embedding_rows())
        predictions = iter(zip(ids, scores))
        embeddings = "embedding" in self.columns
        for key, ok, error in zip(batch.items, batch.ok, batch.errors):
            rows = self.open.get(key.unit)
            if rows is None:
                rows = self.open[key.unit] = {c: [] for c in self.columns}
            if embeddings:
                rows["embedding"].append(next(vectors) if ok else None)
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


class ModelRun:
    """One model's part of the rank loop: its predictor, its writer and rows, and the seconds
    its forward passes took (on a GPU: the time to queue them)."""

    def __init__(self, job: ModelJob, spec: JobSpec, device: torch.device, errors: ErrorLog | _Quiet):
        inference = job.inference
        scoring = Scoring(job.spec.runtime.precision, spec.output.top_k,
                          pad_to=spec.runtime.batch_size if job.spec.runtime.compile else None,
                          sigmoid=inference.sigmoid, capture=inference.capture)
        self.predictor = Predictor(inference.model, job.labels, device, inference.prepare(device), scoring)
        self.writer = UnitWriter(job.output, job.metadata, inference.embedding_dim)
        self.rows = UnitRows(self.writer, dict(zip(job.labels.ids, job.labels.names)), job.targets, errors)
        self.seconds = 0.0

    def launch(self, model_input):
        started = time.perf_counter()
        pending = self.predictor.launch(model_input)
        self.seconds += time.perf_counter() - started
        return pending


class RankLoop:
    """Claims units until none is left and commits each as it completes.

    Several models share each decoded batch: every model gets its own inputs from the one
    decode, runs, and writes its own rows into its own folder."""

    def __init__(self, spec: JobSpec, work: RankWork, resources: Resources, progress: Progress,
                 stop: StopFlag):
        self.spec, self.work, self.resources, self.progress, self.stop = spec, work, resources, progress, stop
        self.several = len(work.models) > 1
        self.first = work.models[0].inference
        self.errors = ErrorLog(spec.runtime.log_every_s)
        self.models = [ModelRun(job, spec, resources.device, self.errors if index == 0 else _Quiet())
                       for index, job in enumerate(work.models)]
        self.redo = Redo([job.output for job in work.models], work.listing.reader.item_by_item,
                         spec.runtime.retry_errors)
        for model in self.models:
            # runtime.retry_errors: redone rows go into the committed file's
            model.writer.complete = self.redo.merge
        self.processed = 0

    def _loader(self):
        spec, work = self.spec, self.work
        stopping = lambda: self.stop.requested  # noqa: E731
        tasks = UnitTasks(work.units, work.listing, spec.runtime.batch_size, stopping=stopping,
                          select=self.redo.select)
        transform = (MultiTransform([m.inference.input_path.worker for m in work.models]) if self.several
                     else self.first.input_path.worker)
        if getattr(transform, "note", None):
            log.info("%s; runtime.reduced_decode off decodes every pixel for all", transform.note)
        limits = Limits.from_runtime(spec.runtime)
        work.listing.limits = limits
        dataset = TaskDataset(transform, limits, spec.runtime.read_retries)
        return make_loader(dataset, tasks, self.resources, stopping=stopping)

    def _launch(self, batch: Batch) -> list:
        return [model.launch(batch.model_input(index if self.several else None))
                for index, model in enumerate(self.models)]

    def _emit(self, batch: Batch, pendings: list) -> None:
        for model, pending in zip(self.models, pendings):
            model.rows.add(batch, pending)
        self.processed += len(batch.items)
        done, failed = self.progress.add(len(batch.items), sum(e is not None for e in batch.errors))
        _check_error_fraction(self.spec.runtime.max_error_fraction, done, failed, self.progress.total)

    def run(self, overlap: bool | None = None) -> dict[str, Any]:
        """Run to the end of the units (or a stop request); return this rank's timing.

        On a GPU the host reads the next batch and queues it before collecting the previous
        one, so the device never waits for the host's row building (``overlap``). On the CPU
        the forward pass is synchronous: rows are written at once, and a unit commits as soon
        as it ends."""
        overlap = self.resources.device.type != "cpu" if overlap is None else overlap
        first_batch = None
        in_flight = None
        batches = iter(self._loader())
        try:
            while not self.stop.requested:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception:
                    if self.stop.requested:  # the signal also reached (and ended) a DataLoader worker
                        break
                    raise
                if first_batch is None:
                    first_batch = time.time()
                if not self.several:
                    batch = self.first.input_path.finish_decoding(batch)
                launched = (batch, self._launch(batch))
                if in_flight is not None:
                    self._emit(*in_flight)
                in_flight = launched
                if not overlap:
                    self._emit(*in_flight)
                    in_flight = None
            if in_flight is not None:
                self._emit(*in_flight)
        finally:
            del batches  # shuts the DataLoader workers (or decode threads) down
            self.errors.flush()
            for model in self.models:
                model.writer.close()
        return {"first_batch": first_batch, "last_write": time.time(), "items": self.processed,
                "peak_rss_mb": peak_rss_mb(), "model_seconds": [model.seconds for model in self.models]}


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
    keep_live(spec.data.path, spec.data.storage_options)  # for reads that find no config (the report)
    remote = None
    sides = {"data.path": spec.data.path, "output.dir": spec.output.dir}
    if is_url(spec.output.dir):  # written into a staging folder, each file committed by one PUT
        check_store_location(spec)  # on every rank, before the staging folder is made: no rank waits
        remote = attach(spec.output.dir, spec.output.storage_options, spec.output.staging)
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, dir=str(remote.local)))
    stop = StopFlag().install()
    namespace = f"batch_classify/run{next(_RUNS)}/"
    board = JobBoard(default_store(), state.process_index, state.num_processes, spec.runtime.timeout_s,
                     namespace=namespace)
    lock = OutputLock(spec.output.dir) if state.is_main_process else contextlib.nullcontext()
    try:
        if remote is not None and state.is_main_process:  # one job at a time, then what is there
            remote.acquire()
            remote.pull()
        if state.is_main_process:  # before anything is written: not into the data or a stranger's files
            check_output_location(spec)
            folders = [model_folder(name) for name in spec.models] if len(spec.models) > 1 else []
            claim(spec.output.dir, folders)
        with lock:
            return _run_rank(spec, state, stop, board)
    except Preempted:
        board.report_failure("stopped by a signal (preemption); its finished units are committed")
        if (fault := reported_fault(board.fault(), state.is_main_process)) is not None:
            raise fault from None  # stopped because a peer's output filesystem failed: its status
        raise
    except RankFailed as error:
        if (fault := reported_fault(error.detail, state.is_main_process)) is not None:
            raise fault from None
        raise
    except UserError as error:
        board.report_failure(str(error))
        raise
    except BaseException as error:
        if (mistake := side_mistake(error, sides)) is not None:  # a store refused: which one, and why
            board.report_failure(str(mistake))
            raise mistake from None
        if (fault := output_fault(error, spec.output.dir)) is not None:  # one line per job (core/faults.py)
            fault.main_rank = state.is_main_process
            if remote is not None:  # the disk that failed is the staging folder's, not the store
                staging = f"the staging folder {remote.local} of output.dir {remote.url}"
                fault.what = fault.what.replace("the output filesystem", staging, 1)
            board.report_failure(str(fault), fault.detail())
            raise fault from None
        log.error("failed: %s", describe_error(error))
        board.report_failure(describe_error(error))
        raise
    finally:
        if remote is not None and remote.held:  # another job's output is left alone
            if sys.exc_info()[0] is not None:  # failed or stopped: send the units committed, if they go
                with contextlib.suppress(UserError, OSError):  # (the end-of-job files once a run ends)
                    push_staged(remote.local, end=False)
            remote.release()
        retried = retry_summary()
        if retried:  # counted in this process (DataLoader workers count and warn on their own)
            log.info(retried)
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


def model_folder(name: str) -> str:
    """The sub-folder of one model of several: its folder's or hub id's last part."""
    return Path(name.rstrip("/")).name or name.replace("/", "_")


def model_jobs(spec: JobSpec, output: Path) -> list[ModelJob]:
    """Each model's single-model spec and folder (one model: the output folder itself), with its
    label space and identity described from the config alone."""
    names = spec.models
    folders = [model_folder(name) for name in names]
    if len(names) > 1 and len(set(folders)) != len(folders):
        raise ModelsError(f"model.name: two models would share an output sub-folder ({folders}); "
                          "give the checkpoints folders (or hub ids) with different last parts")
    jobs = []
    for name, folder in zip(names, folders):
        sub = output if len(names) == 1 else output / folder
        model_spec = spec.for_model(name, spec.output.dir if len(names) == 1 else str(sub))
        labels, identity = describe_model(model_spec.model)
        if spec.data.class_subset is not None:
            labels = labels.restrict(class_subset(spec.data.class_subset), spec.data.class_subset)
            identity["label_space"] = labels.note
        jobs.append(ModelJob(model_spec, sub, labels, identity))
    if (spec.model.classes is not None or spec.model.templates is not None) and not any(
            "zero_shot" in job.identity for job in jobs):
        raise ModelsError("model.classes and model.templates are for CLIP-family checkpoints (an image "
                          "and a text tower); none of model.name is one")
    return jobs


def _prepare_outputs(spec: JobSpec, output: Path,
                     jobs: list[ModelJob]) -> tuple[Listing, np.ndarray, int | None]:
    """Main rank: list once, then each model's folder (manifest, config, listing). Returns the
    listing, the units pending in any model, and the items already committed in all."""
    if spec.data.real_labels and not real_labels_path(spec.data.real_labels).is_file():
        # found now, not once every image is classified (aggregate scores with it at the end)
        raise AggregateError(f"data.real_labels {spec.data.real_labels}: no such file (give the path "
                             "of a real.json, or imagenet-real for the copy timm ships)")
    listing, _ = prepare_listing(spec, output)
    pending_units: set[int] = set()
    done_everywhere = set(range(listing.n_units))
    redo_rows = 0
    for job in jobs:
        job.targets, unavailable = label_targets(listing.classes, job.labels)
        if listing.labelled is False:
            unavailable = None
        manifest = build_manifest(job.spec, listing, job.identity, unavailable)
        manifest = prepare_output(job.output, manifest, spec.output.overwrite)
        if job.output != output:
            share_listing(output, job.output)
        (job.output / CONFIG_FILE).write_text(job.spec.to_yaml())
        # Only files whose footer shows them whole and this job's count: any other is moved
        # aside and its unit run again, so a rerun repairs a damaged folder.
        checked = check_committed(job.output, listing.n_units, Identity.of(manifest))
        committed = checked.units
        job.committed = checked.totals
        redo = plan_redo(job.output, committed, Identity.of(manifest), spec.runtime.retry_errors)
        redo_rows = max(redo_rows, redo.rows)
        if redo.units:
            log.info("%s: %s", job.output, redo.describe(spec.runtime.retry_errors))
        pending_units.update(u for u in range(listing.n_units) if u not in committed or u in redo.units)
        done_everywhere &= committed
    if len(jobs) > 1:
        (output / CONFIG_FILE).write_text(spec.to_yaml())
        write_json(output / MODELS_FILE, {"models": [
            {"name": job.spec.model.name, "folder": job.output.name} for job in jobs]})
    pending = np.array(sorted(pending_units), dtype=np.int64)
    already_done, summary = committed_summary(listing, done_everywhere)
    if done_everywhere:
        log.info("resuming: %s", summary)
    if already_done is not None:
        already_done -= redo_rows  # rows classified again count once, when done
    shapes = [UnitShape.of(job.spec, job.labels.names, job.identity, listing) for job in jobs]
    if said := check_room(output, estimate_output(listing, pending, shapes), refuse=spec.output.check_space):
        log.info("%s", said)  # output/room.py: refused above where the pending units cannot fit
    return listing, pending, already_done


def _run_rank(spec: JobSpec, state, stop: StopFlag, board: JobBoard) -> dict[str, Any] | None:
    device = state.device
    spec = resolve_runtime(spec, device)
    resources = Resources.plan(state, spec.runtime.num_workers)
    torch.set_num_threads(resources.threads)
    memory = keep_host_memory(device, spec.runtime.keep_host_memory)
    log.info("%d rank(s) on %s; %d thread(s), %d DataLoader worker(s), batches of %d per rank%s",
             state.num_processes, device, resources.threads, resources.workers, spec.runtime.batch_size,
             f"; {memory}" if memory else "")
    output = Path(spec.output.dir)
    output.mkdir(parents=True, exist_ok=True)

    jobs = model_jobs(spec, output)
    if state.is_main_process:
        listing, pending, already_done = _prepare_outputs(spec, output, jobs)
        _write_pending(output, pending)
        push_staged(output, end=False)  # an output in a store: its listing, manifest and config first
        board.announce("output ready")
    else:
        board.wait_for_main("output ready", stop)
        listing = read_listing(output, spec.data.storage_options, spec.data.path)
        for job in jobs:
            job.targets, _ = label_targets(listing.classes, job.labels)
        pending = np.load(output / PENDING_FILE)
        already_done = None

    timing = {"first_batch": None, "last_write": time.time(), "items": 0}
    if len(pending):
        for job in jobs:
            job.loaded = load_model(job.spec.model, device, (job.labels, job.identity))
            job.inference = prepare_inference(job.loaded, job.spec.runtime, device, spec.output.embeddings,
                                              spec.output.normalize_embeddings)
            log.info("model %s: %s", job.spec.model.name, job.inference.describe())
            manifest = read_manifest(job.output)
            job.metadata = {"model": manifest["model"],
                            "dataset_fingerprint": manifest["dataset"]["fingerprint"],
                            "config": job.spec.to_dict()}
        work = RankWork(listing, UnitQueue(pending, board.store, namespace_key(board, "next_unit")), jobs)
        progress = Progress(listing.n_items, already_done or 0, state.is_main_process,
                            spec.runtime.log_every_s, namespace=board.namespace)
        try:
            timing = RankLoop(spec, work, resources, progress, stop).run()
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
    results = []
    for index, job in enumerate(jobs):
        if len(pending):
            _write_timing(job, timings, index, state, device)
        metrics = current_metrics(job.output, job.committed) if not len(pending) else None
        if metrics is None:
            metrics = aggregate(job.output)
        results.append(metrics)
    table, summary = side_by_side(output, [job.output for job in jobs]) if len(jobs) > 1 else (None, None)
    push_staged(output)  # an output in a store: every end-of-job file there before the job says it is done
    for metrics in results:
        print(format_table(metrics), flush=True)
    if table is not None:
        print(table, flush=True)
    board.release(stop)
    return summary if len(jobs) > 1 else results[0]


def _write_timing(job: ModelJob, timings: list[dict[str, Any]], index: int, state,
                  device: torch.device) -> None:
    """timing.json of one model: the pass's rate (every model of a pass shares it), and the
    seconds this model's forward passes took (on a GPU: the time to queue them)."""
    started = [t["first_batch"] for t in timings if t["first_batch"] is not None]
    processed = sum(t["items"] for t in timings)
    seconds = max(t["last_write"] for t in timings) - min(started) if started else None
    model_seconds = [t.get("model_seconds", [0.0] * (index + 1))[index] for t in timings]
    write_json(job.output / TIMING, {
        "items_this_run": processed,
        "items_per_rank": [t["items"] for t in timings],
        "peak_rss_mb_per_rank": [t.get("peak_rss_mb") for t in timings],
        "seconds": seconds,
        "images_per_second": processed / seconds if seconds else None,
        "model_seconds_per_rank": model_seconds,
        "world_size": state.num_processes,
        "device": str(device),
        "precision": job.spec.runtime.precision,
        "batch_size": job.spec.runtime.batch_size,
        "input_path": job.inference.input_path.name,
    })


def namespace_key(board: JobBoard, name: str) -> str:
    return board.namespace + name


SCORED_KEYS = ("n", "n_errors", "errors_by_type", "n_labelled", "n_scored", "top1", "top5")


def current_metrics(output: Path, committed: dict[str, Any] | None) -> dict[str, Any] | None:
    """metrics.json where it already scores every unit of this job (a rerun of a finished job
    prints it instead of scanning the predictions again), else None. ``committed``: the counts
    summed over the checked footers; metrics.json must give the same figures, or it predates a
    unit that was redone (or was edited) and is recomputed."""
    path = output / METRICS
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or damaged too: aggregate writes it again
        return None
    manifest = read_manifest(output)
    if not isinstance(metrics, dict) or metrics.get("dataset", {}).get("n_units") != \
            manifest["dataset"]["n_units"] or metrics.get("model") != manifest["model"]:
        return None
    if committed is None or "report_files" not in metrics:  # written before a report that failed
        return None
    if not all((output / name).exists() for name in metrics["report_files"]):  # a file since lost:
        return None  # (e.g. a store's staging folder, pulled before the report went up) written anew
    expected = metrics_from_stats(committed)
    if any(metrics.get(key) != expected[key] for key in SCORED_KEYS):
        return None
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/classify.py`` and ``batch-classify run``."""
    try:
        spec = parse_args(argv)
    except ConfigError as error:
        print(f"batch-classify: configuration error: {redact_text(str(error))}", file=sys.stderr)
        return 2
    try:
        run(spec)
    except OutputFault as fault:  # the output filesystem failed: one line, from the main rank only
        if fault.main_rank:
            folders = [Path(spec.output.dir) / model_folder(name) for name in spec.models]
            if is_url(spec.output.dir):  # what the store holds: the staging folder may not say
                names = [model_folder(name) for name in spec.models] if len(folders) > 1 else None
                note = store_note(spec.output.dir, spec.output.storage_options, spec.output.staging, names)
            else:
                note = safe_note(spec.output.dir, folders if len(folders) > 1 else None)
            print(f"batch-classify: {redact_text(fault.line(note))}", file=sys.stderr)
        leave_status(fault.exit_status)
        return fault.exit_status
    except UserError as error:  # a mistake to fix, not a bug: the message, no traceback
        print(f"batch-classify: {redact_text(str(error))}", file=sys.stderr)
        return 2
    except RankFailed as error:  # the failing rank logged its own error; one line from each peer
        print(f"batch-classify: {redact_text(str(error))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
