"""Cut the ordered items into units of work and give each rank a disjoint, deterministic share."""

from __future__ import annotations

import math

MAX_AUTO_UNIT = 512


def choose_unit_size(n_items: int, world_size: int, configured: int = 0) -> int:
    """Items per unit: as configured, else small enough that every rank gets work."""
    if configured > 0:
        return configured
    return max(1, min(MAX_AUTO_UNIT, math.ceil(n_items / max(1, world_size))))


def unit_ranges(n_items: int, unit_size: int) -> list[range]:
    """Consecutive item ranges covering 0..n_items-1 exactly once."""
    return [range(start, min(start + unit_size, n_items)) for start in range(0, n_items, unit_size)]


def rank_units(n_units: int, rank: int, world_size: int) -> list[int]:
    """Units of one rank: round robin, so every rank sees a mix of the whole item order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return list(range(rank, n_units, world_size))
