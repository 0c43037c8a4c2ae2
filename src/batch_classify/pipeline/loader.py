"""Batches for the model: units claimed as the rank frees up, decoded by DataLoader worker
processes, or by decode threads on a CPU rank."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, wait

import torch

from batch_classify.inputs.base import InputError
from batch_classify.inputs.listing import Listing
from batch_classify.pipeline.decode import (
    Batch,
    ItemKey,
    Task,
    TaskDataset,
    collate,
    describe_error,
    worker_init,
)
from batch_classify.pipeline.distributed import Resources
from batch_classify.pipeline.shard import UnitQueue


class UnitTasks:
    """The batch sampler: claims the next pending unit when it needs more items, and hands out
    that unit's items in order as Tasks (the last one flagged, so its unit commits then).

    Units are read (a tar streamed, row groups fetched) on a daemon thread, a few batches
    ahead, while the caller waits with an eye on ``stopping()``: a read that hangs (a stale
    network mount) cannot keep a signalled rank from stopping, and reading overlaps the
    model. Only the unit in hand is ever enumerated. After ``stopping()`` nothing more is
    claimed.
    """

    POLL_S = 0.2
    AHEAD = 2
    """Batches read ahead of the caller."""

    def __init__(self, units: UnitQueue, listing: Listing, batch_size: int,
                 stopping: Callable[[], bool] = lambda: False,
                 select: Callable[[int], set[str] | None] | None = None):
        self.units = units
        self.listing = listing
        self.batch_size = batch_size
        self.stopping = stopping
        self.select = select
        """The ids of a claimed unit to classify, None for all (runtime.retry_errors redoes a
        committed unit's error rows only: output/redo.py)."""

    def _unit_tasks(self, unit: int) -> Iterator[Task]:
        previous = None
        wanted = self.select(unit) if self.select is not None else None
        for record in self.listing.records(unit):
            if wanted is not None and record.id not in wanted:
                continue
            if previous is not None:
                yield Task(ItemKey(unit, previous.id, previous.label), previous.payload, previous.error)
            previous = record
        if previous is None:
            if wanted is not None:  # none of the rows to redo is listed any more: the file stays
                return
            raise RuntimeError(f"unit {unit} ({self.listing.describe_unit(unit)}) holds no items")
        yield Task(ItemKey(unit, previous.id, previous.label, last=True), previous.payload, previous.error)

    def _batches(self) -> Iterator[list[Task]]:
        """Batches never span units: a unit's last batch goes out as soon as the unit is read,
        so it commits without waiting for the next unit's items (which may be slow to come)."""
        while not self.stopping():
            unit = self.units.claim()
            if unit is None:
                return
            batch: list[Task] = []
            tasks = self._unit_tasks(unit)
            while True:
                try:
                    task = next(tasks, None)
                except self.listing.faults as error:  # gone, no permission, being rewritten: retry later
                    way_out = getattr(error, "way_out", "run the same command again once it is readable")
                    raise InputError(
                        f"unit {unit} of the input ({self.listing.describe_unit(unit)}) cannot be read: "
                        f"{describe_error(error)}. Finished units are committed; {way_out}") from error
                if task is None:
                    break
                batch.append(task)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

    def _read(self, out: queue.Queue, quit_reading: threading.Event) -> None:
        try:
            for batch in self._batches():
                while not quit_reading.is_set():
                    try:
                        out.put(("batch", batch), timeout=self.POLL_S)
                        break
                    except queue.Full:
                        continue
                if quit_reading.is_set():
                    return
            out.put(("end", None))
        except BaseException as error:  # raised in the caller's thread
            out.put(("error", error))

    def __iter__(self) -> Iterator[list[Task]]:
        out: queue.Queue = queue.Queue(maxsize=self.AHEAD)
        quit_reading = threading.Event()
        threading.Thread(target=self._read, args=(out, quit_reading), daemon=True, name="units").start()
        try:
            while True:
                try:
                    kind, value = out.get(timeout=self.POLL_S)
                except queue.Empty:
                    if self.stopping():
                        return
                    continue
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            quit_reading.set()


class ThreadedBatches:
    """Decode each batch on a pool of threads in this process, between forward passes.

    On a CPU rank the model and the decoder share the same cores. Worker processes decode
    while the model runs, so the two time-slice and evict each other's caches; decoding a
    batch on all of the rank's cores between forward passes costs the same CPU time
    without that interference (Pillow, torchvision and torch release the GIL while they
    decode and resize). The default on CPU ranks; measured in docs/benchmarks.md.

    The threads are daemons and the wait for a batch gives up once ``stopping()`` is true:
    a read that hangs (a stale network mount) cannot keep a signalled rank from stopping.
    """

    POLL_S = 0.2

    def __init__(self, dataset: TaskDataset, batches: Iterable[list[Task]], threads: int,
                 stopping: Callable[[], bool] = lambda: False):
        self.dataset = dataset
        self.batches = batches
        self.threads = max(1, threads)
        self.stopping = stopping

    def _work(self, tasks: queue.SimpleQueue) -> None:
        while (task := tasks.get()) is not None:
            future, item = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self.dataset[item])
                except BaseException as error:  # the dataset turns image errors into rows
                    future.set_exception(error)

    def __iter__(self) -> Iterator[Batch]:
        tasks: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.threads):
            threading.Thread(target=self._work, args=(tasks,), daemon=True, name="decode").start()
        try:
            for batch in self.batches:
                futures = []
                for item in batch:
                    futures.append(Future())
                    tasks.put((futures[-1], item))
                while wait(futures, timeout=self.POLL_S).not_done:
                    if self.stopping():
                        return
                yield collate([future.result() for future in futures])
        finally:
            for _ in range(self.threads):
                tasks.put(None)  # idle threads end; one stuck in a read is left behind


def make_loader(dataset: TaskDataset, batches: Iterable[list[Task]], resources: Resources,
                stopping: Callable[[], bool] = lambda: False):
    """The rank's DataLoader worker processes (``resources.workers`` > 0), else decode threads
    in this process."""
    workers, device = resources.workers, resources.device
    if workers == 0:
        return ThreadedBatches(dataset, batches, resources.threads, stopping)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init,
        prefetch_factor=4,
    )
