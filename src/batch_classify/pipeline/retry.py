"""Reads that fail for a moment are tried again before they become an error row.

A Lustre or NFS client returns EIO or ESTALE for a minute and recovers; a network mount times
out. Such an image is read again a few times, with growing pauses (``runtime.read_retries``);
if it still fails, its error row is marked transient (``core.faults.TRANSIENT_MARK``), so that
``runtime.retry_errors transient`` classifies it on a later run. Any other failure (a broken
image, a missing file, a limit) is the item's own and is not retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from batch_classify.core.errors import describe_error
from batch_classify.core.faults import describe_read_error, is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 0.5
"""The pause before the first retry; each next one doubles it (0.5, 1, 2, ...)."""
MAX_DELAY_S = 8.0
LOG_FIRST = 3
"""Retries logged one by one in each process; then every ``LOG_EVERY``-th."""
LOG_EVERY = 100

_counted = threading.Lock()
_retries = 0

ATTEMPTS = "_batch_classify_reads"
"""Attribute a failed read's error carries: (reads tried, seconds spent)."""


def delay(attempt: int) -> float:
    """Seconds to wait after failed read number ``attempt`` (0-based)."""
    return min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** attempt)


def _note_retry(item_id: str, error: BaseException, attempt: int, retries: int, pause: float) -> None:
    global _retries
    with _counted:
        _retries += 1
        count = _retries
    if count <= LOG_FIRST or count % LOG_EVERY == 0:
        log.warning("%s: read failed (%s), trying again in %.1f s (read %d of %d; %d retries so far "
                    "in this process)", item_id, describe_error(error), pause, attempt + 2, retries + 1,
                    count)


def read_with_retries(read: Callable[[], T], retries: int, item_id: str = "",
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """``read()``, tried up to ``retries`` more times while it fails with a transient error. The
    error that ends it carries how many reads were tried and for how long (``describe``)."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return read()
        except Exception as error:
            if not is_transient(error) or attempt >= retries:
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(error, ATTEMPTS, (attempt + 1, time.monotonic() - started))
                raise
            pause = delay(attempt)
            _note_retry(item_id, error, attempt, retries, pause)
            sleep(pause)
            attempt += 1


def describe(error: BaseException) -> str:
    """The error column of an item whose read (with its retries) failed."""
    attempts, seconds = getattr(error, ATTEMPTS, (1, 0.0))
    return describe_read_error(error, attempts, seconds)
