"""Whole-job progress on the main rank, fed by an atomic counter in the rendezvous store.

Every rank adds its finished items to one store key; no collective runs per batch, so
ranks with uneven work never wait on each other. Rank 0 polls the counter on a thread:
a tqdm bar on a terminal, a log line every few seconds elsewhere (Slurm, CI).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from tqdm import tqdm

from .distributed import default_store

log = logging.getLogger(__name__)

DONE_KEY = "batch_classify/items_done"
ERRORS_KEY = "batch_classify/items_failed"


def interactive() -> bool:
    return sys.stderr.isatty() and "SLURM_JOB_ID" not in os.environ


class Progress:
    """Count items here; show the whole job's count on the main rank."""

    def __init__(self, total: int, already_done: int, is_main: bool, log_every_s: float):
        self.total = total
        self.is_main = is_main
        self.log_every_s = log_every_s
        self._store = default_store()
        self._local = 0
        self._local_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_done = already_done
        self._started = time.monotonic()
        if is_main:
            self._thread = threading.Thread(target=self._watch, name="progress", daemon=True)
            self._thread.start()

    def add(self, count: int, errors: int = 0) -> tuple[int, int]:
        """Count finished items; return (items, errors) of this run over all ranks so far."""
        self._local += count
        self._local_errors += errors
        if self._store is None:
            return self._local, self._local_errors
        return self._store.add(DONE_KEY, count), self._store.add(ERRORS_KEY, errors)

    def _done(self) -> int:
        if self._store is not None:
            return self._start_done + self._store.add(DONE_KEY, 0)
        return self._start_done + self._local

    def _watch(self) -> None:
        if interactive():
            bar = tqdm(total=self.total, initial=self._start_done, unit="img", dynamic_ncols=True,
                       desc="classify", smoothing=0.1)
            last = self._start_done
            while not self._stop.wait(0.5):
                done = self._done()
                bar.update(done - last)
                last = done
            bar.update(self._done() - last)
            bar.close()
            return
        while not self._stop.wait(self.log_every_s):
            self._log_line()
        self._log_line()

    def _log_line(self) -> None:
        done = self._done()
        elapsed = time.monotonic() - self._started
        rate = (done - self._start_done) / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        log.info("progress %d/%d (%.1f%%) %.1f img/s, %.0f s left", done, self.total,
                 100.0 * done / max(1, self.total), rate, left)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
