"""The report page's examples, chosen during the one pass over the unit files.

Per class and per kind of example a bounded number of rows is kept (the most confident
misses of each true class, its most and least confident hits; in labelling mode the most
and least confident rows of each predicted class), a few rows of the commonest confused
pairs, and a few ids per error type. Ties go to the lower (unit, row), as ``Ranking`` does.

Showing an example means reading its image back from the input, and a unit's input (a tar,
a run of row groups) is read whole to reach one item. So examples come from *example
units* only: every unit while fewer than ``EXAMPLE_ROWS`` rows have been admitted, then any
unit that holds a class no admitted unit held. That keeps the units read back bounded by
the classes, not the rows (a shuffled collection of tars of 10,000: the first one or two), and
gives every class its examples (a folder sorted by class: each class's first unit). Whether
a unit is admitted is decided when it ends, so the choice does not depend on record-batch
sizes. Memory: classes x examples, plus one unit's candidates.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from batch_classify.core.errors import error_type

MISSES = 4
"""Per true class: its most confident misses."""
HITS = 2
"""Per true class: its most confident hits, and as many of its least confident."""
PREDICTED = 4
"""Per predicted class (labelling mode): its most confident rows, and as many least confident."""
PAIRS_TRACKED = 64
"""Confused pairs whose examples are kept: the commonest so far (the report shows 20)."""
PAIR_EXAMPLES = 4
ERROR_EXAMPLES = 5
"""Ids (with their messages) per error type: the first in unit then row order."""
ERROR_TEXT = 300
EXAMPLE_ROWS = 10_000
"""Units are admitted as example units, whatever their classes, until this many rows are."""


@dataclass
class Rows:
    """Rows kept as examples, as parallel arrays; ``group`` is what they are kept per (a class,
    a pair), ``key`` what ranks them within it (lower first)."""

    group: np.ndarray
    key: np.ndarray
    unit: np.ndarray
    row: np.ndarray
    label: np.ndarray
    top1: np.ndarray
    confidence: np.ndarray
    ids: np.ndarray
    """Object array of str."""

    @classmethod
    def empty(cls) -> Rows:
        ints, floats = np.zeros(0, dtype=np.int64), np.zeros(0)
        return cls(ints, floats, ints, ints, ints, ints, floats, np.zeros(0, dtype=object))

    def take(self, indices: np.ndarray) -> Rows:
        return Rows(*(getattr(self, f.name)[indices] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return len(self.group)

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        return Rows(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Rows)))


def first_per_group(group: np.ndarray, key: np.ndarray, order_tail: tuple[np.ndarray, ...],
                    k: int) -> np.ndarray:
    """Indices of the ``k`` rows of lowest (key, *order_tail) in each group, by group then rank."""
    if group.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((*reversed(order_tail), key, group))
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    rank = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
    return order[rank < k]


class TopPerGroup:
    """The ``k`` rows of lowest key in each group, over everything offered."""

    def __init__(self, k: int):
        self.k = k
        self.rows = Rows.empty()

    def offer(self, rows: Rows) -> None:
        if len(rows) == 0:
            return
        merged = Rows.concat([self.rows, rows])
        self.rows = merged.take(first_per_group(merged.group, merged.key, (merged.unit, merged.row), self.k))

    def drop(self, groups: np.ndarray) -> None:
        self.rows = self.rows.take(np.flatnonzero(~np.isin(self.rows.group, groups)))


@dataclass
class Example:
    """One example row as the page shows it."""

    unit: int
    item_id: str
    label: int
    top1: int
    confidence: float


def examples_of(rows: Rows) -> dict[int, list[Example]]:
    """Each group's examples, best first (``rows`` is kept sorted by group, then rank)."""
    result: dict[int, list[Example]] = {}
    for i in range(len(rows)):
        result.setdefault(int(rows.group[i]), []).append(
            Example(int(rows.unit[i]), str(rows.ids[i]), int(rows.label[i]), int(rows.top1[i]),
                    float(rows.confidence[i])))
    return result


PAIR_SHIFT = 32
"""A confused pair as one group: true label << PAIR_SHIFT | predicted class."""


class Family:
    """One kind of example: candidates of the unit in hand, and those kept from example units."""

    def __init__(self, k: int, descending: bool):
        self.k, self.descending = k, descending
        self.kept = TopPerGroup(k)
        self.pending = TopPerGroup(k)

    def offer(self, unit: int, first_row: int, mask: np.ndarray, group: np.ndarray, batch) -> None:
        """Rows of ``batch`` where ``mask``, kept per ``group`` (an array over the masked rows)."""
        indices = np.flatnonzero(mask)
        if indices.size == 0:
            return
        confidence = batch.confidence[indices]
        key = -confidence if self.descending else confidence
        best = first_per_group(group, key, (indices,), self.k)
        chosen = indices[best]
        ids = np.array(batch.ids.take(pa.array(chosen)).to_pylist(), dtype=object)
        self.pending.offer(Rows(group[best], key[best], np.full(best.size, unit, dtype=np.int64),
                                first_row + chosen, batch.label[chosen], batch.top1[chosen],
                                confidence[best], ids))

    def end_unit(self, admitted: bool) -> None:
        if admitted:
            self.kept.offer(self.pending.rows)
        self.pending = TopPerGroup(self.k)


@dataclass
class ErrorExample:
    unit: int
    item_id: str
    message: str


class Examples:
    """Every example the page shows, chosen unit by unit (see the module's docstring)."""

    def __init__(self) -> None:
        self.misses = Family(MISSES, descending=True)
        self.sure_hits = Family(HITS, descending=True)
        self.unsure_hits = Family(HITS, descending=False)
        self.sure_predicted = Family(PREDICTED, descending=True)
        self.unsure_predicted = Family(PREDICTED, descending=False)
        self.pairs = Family(PAIR_EXAMPLES, descending=True)
        self.families = (self.misses, self.sure_hits, self.unsure_hits, self.sure_predicted,
                         self.unsure_predicted, self.pairs)
        self.tracked: dict[tuple[int, int], int] = {}
        """The PAIRS_TRACKED commonest confused pairs so far, with their counts."""
        self.errors: dict[str, list[ErrorExample]] = {}
        self.rows_admitted = 0
        self.classes_seen: set[int] = set()
        self.unit_classes: set[int] = set()
        """Labels of this unit's scored rows."""
        self.unit_predicted: set[int] = set()
        """Top-1 classes of this unit's decoded rows: the classes of labelling mode."""
        self.predicted_seen: set[int] = set()
        self.unit_pairs: set[tuple[int, int]] = set()
        self.units_admitted: list[int] = []
        self.scored_any = False

    def add(self, unit: int, first_row: int, batch, scored: np.ndarray, correct: np.ndarray) -> None:
        """One record batch (a ``scan.Batch``) of ``unit``, its first row ``first_row``."""
        hit, miss = scored & correct, scored & ~correct
        self.misses.offer(unit, first_row, miss, batch.label[miss], batch)
        self.sure_hits.offer(unit, first_row, hit, batch.label[hit], batch)
        self.unsure_hits.offer(unit, first_row, hit, batch.label[hit], batch)
        self.scored_any = self.scored_any or bool(scored.any())
        if not self.scored_any:  # labelling mode's examples: unused once any row is scored
            self.sure_predicted.offer(unit, first_row, batch.ok, batch.top1[batch.ok], batch)
            self.unsure_predicted.offer(unit, first_row, batch.ok, batch.top1[batch.ok], batch)
            self.unit_predicted.update(np.unique(batch.top1[batch.ok]).tolist())
        pair = (batch.label[miss] << PAIR_SHIFT) | batch.top1[miss]
        self.pairs.offer(unit, first_row, miss, pair, batch)
        self.unit_pairs.update((int(code) >> PAIR_SHIFT, int(code) & ((1 << PAIR_SHIFT) - 1))
                               for code in np.unique(pair).tolist())
        self.unit_classes.update(np.unique(batch.label[scored]).tolist())
        self._add_errors(unit, batch)

    def _add_errors(self, unit: int, batch) -> None:
        if batch.errors is None or batch.errors.null_count == len(batch.errors):
            return
        indices = np.flatnonzero(~np.asarray(batch.errors.is_null().to_numpy(zero_copy_only=False)))
        messages = batch.errors.take(pa.array(indices)).to_pylist()
        for index, message in zip(indices.tolist(), messages):
            kept = self.errors.setdefault(error_type(message), [])
            if len(kept) < ERROR_EXAMPLES:
                kept.append(ErrorExample(unit, batch.ids[index].as_py(), message[:ERROR_TEXT]))

    def end_unit(self, unit: int, n_rows: int, confused: Counter) -> None:
        """The unit's rows are all added: admit it as an example unit or not, and follow the
        commonest confused pairs (``confused``: the counts so far, this unit's included)."""
        new = (self.unit_classes - self.classes_seen if self.scored_any else
               self.unit_predicted - self.predicted_seen)
        admitted = self.rows_admitted < EXAMPLE_ROWS or bool(new)
        if admitted:
            self.rows_admitted += n_rows
            self.classes_seen |= self.unit_classes
            self.predicted_seen |= self.unit_predicted
            self.units_admitted.append(unit)
        self._track_pairs(confused)
        for family in self.families:
            if family is self.pairs:
                kept = np.array([(t << PAIR_SHIFT) | p for t, p in self.tracked], dtype=np.int64)
                pending = family.pending.rows
                family.pending.rows = pending.take(np.flatnonzero(np.isin(pending.group, kept)))
            family.end_unit(admitted)
        self.unit_classes, self.unit_predicted, self.unit_pairs = set(), set(), set()

    def _track_pairs(self, confused: Counter) -> None:
        """Keep ``tracked`` the PAIRS_TRACKED commonest pairs by (-count, true, predicted). Counts
        only grow, so only pairs seen in this unit can enter; a pair among the 20 shown in the
        end is tracked from the unit of its last row on (nothing can outrank it after), so it has
        examples where that unit, or any other read while it was tracked, was admitted."""
        def rank(pair: tuple[int, int]) -> tuple[int, int, int]:
            return (-self.tracked.get(pair, confused[pair]), *pair)

        for pair in self.unit_pairs & self.tracked.keys():
            self.tracked[pair] = confused[pair]
        dropped = []
        outsiders = self.unit_pairs - self.tracked.keys()
        if len(self.tracked) >= PAIRS_TRACKED:  # only those that beat the weakest tracked pair can enter
            weakest = max(map(rank, self.tracked))
            outsiders = [pair for pair in outsiders if (-confused[pair], *pair) < weakest]
        # Best first: once one cannot displace the weakest tracked pair, none after it can.
        for pair in sorted(outsiders, key=lambda p: (-confused[p], *p)):
            if len(self.tracked) >= PAIRS_TRACKED:
                weakest = max(self.tracked, key=rank)
                if (-confused[pair], *pair) >= rank(weakest):
                    break
                del self.tracked[weakest]
                dropped.append(weakest)
            self.tracked[pair] = confused[pair]
        if dropped:
            self.pairs.kept.drop(np.array([(t << PAIR_SHIFT) | p for t, p in dropped], dtype=np.int64))

    # ------------------------------------------------------------ results

    def per_class(self, family: Family) -> dict[int, list[Example]]:
        return examples_of(family.kept.rows)

    def pair_examples(self) -> dict[tuple[int, int], list[Example]]:
        mask = (1 << PAIR_SHIFT) - 1
        return {(code >> PAIR_SHIFT, code & mask): rows for code, rows in self.per_class(self.pairs).items()}

    def all_picked(self) -> list[Example]:
        """Every example with a picture, once per (unit, id)."""
        seen, result = set(), []
        for family in self.families:
            for rows in self.per_class(family).values():
                for example in rows:
                    if (example.unit, example.item_id) not in seen:
                        seen.add((example.unit, example.item_id))
                        result.append(example)
        return result
