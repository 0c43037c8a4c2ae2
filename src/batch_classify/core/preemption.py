"""Preemption: SIGTERM or SIGUSR1 asks the ranks to stop after the batch in hand."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

PREEMPTED_EXIT_STATUS = 75
"""EX_TEMPFAIL: stopped on request with every finished unit committed; run again to resume."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised once a rank has committed its finished units after a stop signal."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_STATUS)


class StopFlag:
    """Set by a stop signal; the batch loop checks it between batches."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, signal_number: int, _frame) -> None:
        if self.signal_number is None:
            log.warning("received %s: finishing the batch in hand, committing finished units",
                        signal.Signals(signal_number).name)
        self.signal_number = signal_number

    def install(self) -> StopFlag:
        for signal_number in STOP_SIGNALS:
            signal.signal(signal_number, self._handle)
        return self
