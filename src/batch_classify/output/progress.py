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
from collections import Counter

from tqdm import tqdm

from batch_classify.core.errors import error_type
from batch_classify.pipeline.distributed import default_store

log = logging.getLogger(__name__)


def interactive() -> bool:
    return sys.stderr.isatty() and "SLURM_JOB_ID" not in os.environ


class Progress:
    """Count items here; show the whole job's count on the main rank."""

    def __init__(self, total: int | None, already_done: int, is_main: bool, log_every_s: float,
                 namespace: str = "batch_classify/"):
        self.total = total
        """Items of the whole job; None where only the units are counted ahead (tars)."""
        self.done_key = namespace + "items_done"
        self.errors_key = namespace + "items_failed"
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
        return self._store.add(self.done_key, count), self._store.add(self.errors_key, errors)

    def _done(self) -> int:
        if self._store is not None:
            return self._start_done + self._store.add(self.done_key, 0)
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
        if self.total is None:
            log.info("progress %d items, %.1f img/s", done, rate)
            return
        left = (self.total - done) / rate if rate > 0 else float("nan")
        log.info("progress %d/%d (%.1f%%) %.1f img/s, %.0f s left", done, self.total,
                 100.0 * done / max(1, self.total), rate, left)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class ErrorLog:
    """Item errors in the log without a line per item: the first few of each kind by name,
    then the counts per interval. Every error is in its row either way."""

    FIRST = 3

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.seen: Counter[str] = Counter()
        self.unnamed: Counter[str] = Counter()
        self._last = time.monotonic()

    def add(self, item_id: str, error: str) -> None:
        kind = error_type(error)
        self.seen[kind] += 1
        if self.seen[kind] <= self.FIRST:
            log.warning("item %s: %s", item_id, error)
            if self.seen[kind] == self.FIRST:
                log.warning("further %s errors are counted here, not named (each is in its row)", kind)
        else:
            self.unnamed[kind] += 1
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        now = time.monotonic()
        if self.unnamed and (force or now - self._last >= self.interval_s):
            counts = ", ".join(f"{kind} {n}" for kind, n in sorted(self.unnamed.items()))
            log.warning("%d more item error(s) in the last %.0f s: %s", sum(self.unnamed.values()),
                        now - self._last, counts)
            self.unnamed.clear()
        if force or now - self._last >= self.interval_s:
            self._last = now
