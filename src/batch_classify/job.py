"""The classification job: inputs -> shard -> decode/preprocess -> predict -> write -> aggregate."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .aggregate import TIMING, aggregate, format_table
from .config import ConfigError, JobSpec, parse_args
from .decode import ItemDataset, describe_error
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
from .inputs import Items, load_items
from .labels import class_subset, label_targets
from .loader import make_loader
from .manifest import FORMAT_VERSION, OutputLock, prepare_output, read_manifest, write_json
from .model import Inference, LoadedModel, load_model, prepare_inference
from .predict import Predictor
from .preemption import Preempted, StopFlag
from .progress import Progress
from .shard import choose_unit_size, rank_units, unit_ranges
from .writer import UnitWriter, unit_path

log = logging.getLogger("batch_classify")


def build_manifest(spec: JobSpec, items: Items, loaded: LoadedModel, unit_size: int,
                   unavailable: str | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "batch_classify_version": __version__,
        "dataset": {
            "path": spec.data.path,
            "kind": items.kind,
            "n_items": len(items),
            "n_labelled": sum(label is not None for label in items.labels),
            "fingerprint": items.fingerprint(),
            "classes": list(items.classes) if items.classes is not None else "imagenet-1k",
            "notes": items.notes,
        },
        "model": loaded.identity,
        "job": {"top_k": spec.output.top_k, "unit_size": unit_size,
                "class_subset": spec.data.class_subset},
        "accuracy_unavailable": unavailable,
        "config": spec.to_dict(),
    }


ITEMS_FILE = ".items.parquet"
MIN_ITEMS_FOR_ERROR_CHECK = 100


class TooManyErrors(RuntimeError):
    """More than runtime.max_error_fraction of the items seen failed to decode."""


def _predict_units(spec: JobSpec, items: Items, loaded: LoadedModel, inference: Inference,
                   device: torch.device, units: list[range], unit_ids: list[int],
                   targets: list[int] | None, progress: Progress, workers: int, threads: int,
                   metadata: dict[str, Any], stop: StopFlag,
                   overlap: bool | None = None) -> dict[str, Any]:
    """Run this rank's units; commit each as it completes. Returns this rank's timing."""
    indices = [index for unit in unit_ids for index in units[unit]]
    dataset = ItemDataset(items, indices, inference.input_path.worker, spec.runtime.max_image_pixels)
    loader = make_loader(dataset, spec.runtime.batch_size, workers, device, threads,
                         stopping=lambda: stop.requested)
    predictor = Predictor(inference.model, loaded.labels, device, spec.runtime.precision,
                          spec.output.top_k, inference.prepare(device),
                          pad_to=spec.runtime.batch_size if spec.runtime.compile else None)
    names = dict(zip(loaded.labels.ids, loaded.labels.names))
    writer = UnitWriter(spec.output.dir, metadata)
    columns = ("id", "label", "target", "topk_ids", "topk_labels", "topk_scores", "error")
    pending_units = iter(unit_ids)
    state = {"unit": next(pending_units, None), "rows": {c: [] for c in columns}, "processed": 0}

    def emit(batch, pending) -> None:
        """Rows of one finished batch; a unit is committed as soon as its last row is in."""
        ids, scores = pending.result()
        predictions = iter(zip(ids, scores))
        rows = state["rows"]
        for index, ok, error in zip(batch.indices, batch.ok, batch.errors):
            label = items.labels[index]
            rows["id"].append(items.ids[index])
            rows["label"].append(label)
            known = targets is not None and label is not None
            rows["target"].append(targets[label] if known else None)
            if ok:
                top_ids, top_scores = next(predictions)
                rows["topk_ids"].append(top_ids)
                rows["topk_labels"].append([names[i] for i in top_ids])
                rows["topk_scores"].append(top_scores)
            else:
                log.warning("item %s: %s", items.ids[index], error)
                for column in ("topk_ids", "topk_labels", "topk_scores"):
                    rows[column].append(None)
            rows["error"].append(error)
            if len(rows["id"]) == len(units[state["unit"]]):
                writer.submit(state["unit"], rows)
                rows = state["rows"] = {c: [] for c in columns}
                state["unit"] = next(pending_units, None)
        state["processed"] += len(batch.indices)
        done, failed = progress.add(len(batch.indices), sum(e is not None for e in batch.errors))
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
        writer.close()
    return {"first_batch": first_batch, "last_write": time.time(), "items": state["processed"]}


def _check_error_fraction(limit: float | None, done: int, failed: int, total: int) -> None:
    if limit is None or done < min(MIN_ITEMS_FOR_ERROR_CHECK, total):
        return
    if failed > limit * done:
        raise TooManyErrors(
            f"{failed} of the {done} items seen so far could not be decoded, more than "
            f"runtime.max_error_fraction ({limit}); is data.path the right input? "
            "Committed units are kept: fix the input and run again, or raise the limit."
        )


def _list_items(spec: JobSpec, is_main: bool, output: Path, board: JobBoard, stop: StopFlag) -> Items:
    """The main rank lists the input once; the others read its listing (or open the dataset)."""
    shared = output / ITEMS_FILE
    if is_main:
        items = load_items(spec.data)
        if items.paths is not None:
            items.save(shared)
        board.announce("listed")
        return items
    board.wait_for_main("listed", stop)
    if shared.exists():
        return Items.load_saved(shared)
    return load_items(spec.data)


def run(spec: JobSpec, leave_process_group: bool = True) -> dict[str, Any] | None:
    """Run the job on this rank; the main rank returns the metrics.

    ``leave_process_group=False`` keeps the ranks' group for a caller that goes on (bench).
    """
    state = init_state(spec.runtime.device, spec.runtime.timeout_s)
    configure_logging(state.process_index, state.is_main_process)
    stop = StopFlag().install()
    board = JobBoard(default_store(), state.process_index, state.num_processes, spec.runtime.timeout_s)
    lock = OutputLock(spec.output.dir) if state.is_main_process else contextlib.nullcontext()
    try:
        with lock:
            return _run_rank(spec, state, stop, board)
    except Preempted:
        board.report_failure("stopped by a signal (preemption); its finished units are committed")
        raise
    except RankFailed:
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

    items = _list_items(spec, state.is_main_process, output, board, stop)
    loaded = load_model(spec.model, device)
    inference = prepare_inference(loaded, spec.runtime, device)
    log.info("model: %s", inference.describe())
    if spec.data.class_subset is not None:
        loaded.labels = loaded.labels.restrict(class_subset(spec.data.class_subset),
                                               spec.data.class_subset)
        loaded.identity["label_space"] = loaded.labels.note
    targets, unavailable = (None, None)
    if items.labelled:
        targets, unavailable = label_targets(items.classes, loaded.labels)
    if state.is_main_process:
        unit_size = choose_unit_size(len(items), state.num_processes, spec.output.unit_size)
        manifest = build_manifest(spec, items, loaded, unit_size, unavailable)
        prepare_output(output, manifest, spec.output.overwrite)
        (output / "config.yaml").write_text(spec.to_yaml())
        board.announce("output ready")
    board.wait_for_main("output ready", stop)
    # Every rank follows the manifest in force: on resume its unit size may predate this run.
    manifest = read_manifest(output)
    units = unit_ranges(len(items), manifest["job"]["unit_size"])
    todo = {u for u in range(len(units)) if not unit_path(output, u).exists()}
    mine = [u for u in rank_units(len(units), state.process_index, state.num_processes) if u in todo]
    already_done = len(items) - sum(len(units[u]) for u in todo)
    if state.is_main_process and already_done:
        log.info("resuming: %d of %d items already committed", already_done, len(items))

    metadata = {"model": loaded.identity, "dataset_fingerprint": manifest["dataset"]["fingerprint"],
                "config": spec.to_dict()}
    progress = Progress(len(items), already_done, state.is_main_process, spec.runtime.log_every_s)
    try:
        timing = _predict_units(spec, items, loaded, inference, device, units, mine, targets,
                                progress, workers, threads, metadata, stop)
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
    started = [t["first_batch"] for t in timings if t["first_batch"] is not None]
    processed = sum(t["items"] for t in timings)
    seconds = max(t["last_write"] for t in timings) - min(started) if started else None
    write_json(output / TIMING, {
        "items_this_run": processed,
        "seconds": seconds,
        "images_per_second": processed / seconds if seconds else None,
        "world_size": state.num_processes,
        "device": str(device),
        "precision": spec.runtime.precision,
        "batch_size": spec.runtime.batch_size,
        "input_path": inference.input_path.name,
    })
    metrics = aggregate(output)
    print(format_table(metrics), flush=True)
    board.release(stop)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/classify.py`` and ``batch-classify run``."""
    try:
        spec = parse_args(argv)
    except ConfigError as error:
        print(f"batch-classify: configuration error: {error}", file=sys.stderr)
        return 2
    run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
