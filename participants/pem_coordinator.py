"""The PEM coordinator of a feeder: grants packet requests up to a power target.

Each step it is told what already runs (opted-out devices that run anyway, packets still
running) and which devices ask for a packet, each at its rated power. Power is in whole
watts, so the budget arithmetic is exact and "never above the target" holds exactly.

Order: the most urgent request first (urgency = how far into the band towards the edge
where the device would opt out and run unasked, see `pem.urgency`), ties by house key.
Requests are granted along that order while the committed power plus the granted power
stays within the target; the first that does not fit ends the round, so a less urgent
device is never granted while a more urgent one is denied (no packing around it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_HUGE = 2**62  # |budget| bound: an infinite target, and far from int64 overflow in sums


@dataclass(frozen=True, eq=False)
class Decision:
    """Outcome of one step. `accepted`/`denied` are masks over the houses (False for houses
    that did not ask); `power_w` = committed + granted, which is <= `budget_w` unless the
    committed power alone exceeds it (then nothing is granted)."""

    accepted: np.ndarray
    denied: np.ndarray
    committed_w: int
    granted_w: int
    budget_w: int

    @property
    def power_w(self) -> int:
        return self.committed_w + self.granted_w


def budget(target_w: float) -> int:
    """The whole watts a target allows (an infinite target: no limit in practice)."""
    if math.isnan(target_w):
        raise ValueError("target_w is nan")
    return math.floor(min(max(target_w, -_HUGE), _HUGE))


def coordinate(
    requesting: np.ndarray,
    power_w: np.ndarray,
    urgency: np.ndarray,
    keys: np.ndarray,
    committed_w: int,
    target_w: float,
) -> Decision:
    """Grant requests (mask `requesting` over N houses, each at `power_w`, whole W) up to
    `target_w` on top of `committed_w`, most urgent first, ties by `keys`."""
    requesting = np.asarray(requesting, dtype=bool)
    power = np.asarray(power_w, dtype=np.int64)
    if (power < 0).any() or committed_w < 0:
        raise ValueError("powers must be >= 0")
    cap = budget(target_w)
    idx = np.flatnonzero(requesting)
    order = idx[np.lexsort((keys[idx], -urgency[idx]))]
    room = cap - committed_w
    total = np.cumsum(power[order])
    # cumsum is non-decreasing (powers >= 0): the grants are a prefix of the order.
    fits = int(np.searchsorted(total, room, side="right")) if room >= 0 else 0
    accepted = np.zeros(len(requesting), dtype=bool)
    accepted[order[:fits]] = True
    granted = int(total[fits - 1]) if fits else 0
    return Decision(accepted, requesting & ~accepted, int(committed_w), granted, cap)
