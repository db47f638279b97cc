"""Energy Web flexibility: the aggregator's forecast of what a prosumer can deliver (pure).

The seed records each producer's energy source "to estimate the pattern of energy supply"
and has the aggregator profile its prosumers (contract compliance, participation). With
the forecast on (`flex.strategy {"forecast": true}`), a candidate's capacity is not its
contract's flexibility but what the aggregator expects it to deliver over the window:

    deliverable = (load part + production part * availability) * trust

- **load part**: what the site can do with its consumption, at any hour: up (less
  consumption) at most its expected `consumption`; down (more consumption) the part of
  `flex_down` beyond its `production`.
- **production part**: the rest, which moves its generation: up, more production; down,
  curtailment (at most its `production`). It needs the source: a `solar` contract's
  availability is the daylight over the window (0 at night: no curtailment, no extra PV);
  `wind`, `bess` and other sources are not predictable from the clock (1).
- **trust** from the prosumer's delivery history: a delivery met counts 1, one not met
  credited / expected; trust = (prior + sum) / (prior + deliveries), so a newcomer is
  trusted fully and one that under-delivered before is asked for less.

Integers throughout (permille), so the same contracts and history give the same estimate.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from market.core.sun import cos_zenith
from market.flexibility.contracts import Contract
from market.flexibility.messages import Direction, FlexConfig

PERMILLE = 1000


def sun_elevation(t: int, latitude: float, longitude: float) -> float:
    """The sun's elevation in degrees at Unix time `t` (market.core.sun)."""
    cos_z = float(cos_zenith(np.array([t]), latitude, longitude)[0])
    return math.degrees(math.asin(max(-1.0, min(1.0, cos_z))))


@functools.lru_cache(maxsize=4096)  # a pure function: the same window is asked for every solar contract
def daylight_permille(start: int, end: int, latitude: float, longitude: float, full: float, step: int = 900) -> int:
    """PV flexibility available over `[start, end]`, permille: the sun's elevation over
    `full` degrees, clamped to [0, 1], at its lowest over the window (sampled every `step`
    seconds and at the end): a window that reaches into the night gives nothing."""
    times = [*range(start, end, step), end]
    lowest = min(sun_elevation(t, latitude, longitude) for t in times)
    return max(0, min(PERMILLE, math.floor(lowest / full * PERMILLE)))


def availability_permille(source: str, start: int, end: int, config: FlexConfig) -> int:
    """How much of a contract's production part its source can move over the window."""
    if source == "solar":
        return daylight_permille(start, end, config.latitude, config.longitude, config.daylight_full)
    return PERMILLE


def trust_permille(deliveries: int, ratio_sum: int, prior: int) -> int:
    """Trust from a delivery history: `prior` deliveries at full marks before the real ones
    (each 0..1000 permille), averaged."""
    return (prior * PERMILLE + ratio_sum) // (prior + deliveries)


def delivery_ratio(met: bool, credited: int, expected: int) -> int:
    """One delivery in the history, permille: 1000 if met within the margin, else the share
    of the expected energy that was credited."""
    if met or expected <= 0:
        return PERMILLE
    return min(PERMILLE, credited * PERMILLE // expected)


def deliverable(contract: Contract, direction: Direction, start: int, end: int, trust: int, config: FlexConfig) -> int:
    """W the aggregator expects `contract`'s prosumer to deliver over `[start, end]` in
    `direction` (at most its contracted flexibility)."""
    capacity = contract.capacity(direction)
    # up: shed at most its load; down: what curtailing its production cannot give
    load = min(capacity, contract.consumption) if direction == "up" else capacity - min(capacity, contract.production)
    production = capacity - load
    available = availability_permille(contract.source, start, end, config) if production else 0
    estimate = load + production * available // PERMILLE
    return min(capacity, estimate * trust // PERMILLE)
