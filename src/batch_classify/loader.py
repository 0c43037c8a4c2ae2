"""Batches for the model: DataLoader worker processes, or decode threads on a CPU rank."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .decode import Batch, ItemDataset, collate, worker_init


class ThreadedBatches:
    """Decode each batch on a pool of threads in this process, between forward passes.

    On a CPU rank the model and the decoder share the same cores. Worker processes decode
    while the model runs, so the two time-slice and evict each other's caches; decoding a
    batch on all of the rank's cores between forward passes costs the same CPU time
    without that interference (Pillow, torchvision and torch release the GIL while they
    decode and resize). The default on CPU ranks; measured in docs/benchmarks.md.
    """

    def __init__(self, dataset: ItemDataset, batch_size: int, threads: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.threads = max(1, threads)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        with ThreadPoolExecutor(self.threads, thread_name_prefix="decode") as pool:
            for start in range(0, len(self.dataset), self.batch_size):
                positions = range(start, min(start + self.batch_size, len(self.dataset)))
                yield collate(list(pool.map(self.dataset.__getitem__, positions)))


def make_loader(dataset: ItemDataset, batch_size: int, workers: int, device: torch.device,
                threads: int = 1):
    """Worker processes (``workers`` > 0), else decode threads in this process."""
    if workers == 0:
        return ThreadedBatches(dataset, batch_size, threads)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init,
        prefetch_factor=4,
    )
