"""Hand units out as ranks free up: an atomic counter over the pending units.

Every rank takes the next pending unit when it finishes one, so uneven tars and slow nodes
do not leave devices idle at the end. Results stay keyed by unit, never by rank, so what a
rank ran never shows in the output and a resume may use any world size.
"""

from __future__ import annotations

import numpy as np

"""The pending units of the current run, in order, written by the main rank for the others."""


class UnitQueue:
    """The pending units, claimed one at a time through a counter in the rendezvous store
    (``store.add`` is atomic across ranks), or a local counter when running alone."""

    def __init__(self, pending: np.ndarray, store=None, key: str = "batch_classify/next_unit"):
        self.pending = pending
        self.store = store
        self.key = key
        self._local = 0

    def claim(self) -> int | None:
        """The next unit nobody has taken, or None when all are taken."""
        if self.store is None:
            position, self._local = self._local, self._local + 1
        else:
            position = self.store.add(self.key, 1) - 1
        return int(self.pending[position]) if position < len(self.pending) else None
