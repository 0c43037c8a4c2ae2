"""Batches for the model: DataLoader worker processes, or decode threads on a CPU rank."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait

import torch

from .decode import Batch, ItemDataset, collate, worker_init


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

    def __init__(self, dataset: ItemDataset, batch_size: int, threads: int,
                 stopping: Callable[[], bool] = lambda: False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.threads = max(1, threads)
        self.stopping = stopping

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def _work(self, tasks: queue.SimpleQueue) -> None:
        while (task := tasks.get()) is not None:
            future, position = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self.dataset[position])
                except BaseException as error:  # the dataset turns image errors into rows
                    future.set_exception(error)

    def __iter__(self) -> Iterator[Batch]:
        tasks: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.threads):
            threading.Thread(target=self._work, args=(tasks,), daemon=True,
                             name="decode").start()
        try:
            for start in range(0, len(self.dataset), self.batch_size):
                futures = []
                for position in range(start, min(start + self.batch_size, len(self.dataset))):
                    futures.append(Future())
                    tasks.put((futures[-1], position))
                while wait(futures, timeout=self.POLL_S).not_done:
                    if self.stopping():
                        return
                yield collate([future.result() for future in futures])
        finally:
            for _ in range(self.threads):
                tasks.put(None)  # idle threads end; one stuck in a read is left behind


def make_loader(dataset: ItemDataset, batch_size: int, workers: int, device: torch.device,
                threads: int = 1, stopping: Callable[[], bool] = lambda: False):
    """Worker processes (``workers`` > 0), else decode threads in this process."""
    if workers == 0:
        return ThreadedBatches(dataset, batch_size, threads, stopping)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init,
        prefetch_factor=4,
    )
