"""Round and slot arithmetic (PROTOCOL.md section Time) and the two clocks.

A round starting at `t` with duration `d` and `close_steps` `c` has
current_round = [t, t+d], next_settle = [t+c*d, t+(c+1)*d], last_settle = [t+(c-1)*d, t+c*d].
"""

from __future__ import annotations

import time as _time
from typing import Protocol

import msgspec

Slot = tuple[int, int]


class RoundTimes(msgspec.Struct, frozen=True):
    time: int
    duration: int
    current_round: Slot
    last_round: Slot
    next_settle: Slot
    last_settle: Slot


def round_times(t: int, duration: int, close_steps: int, last_round: Slot | None = None) -> RoundTimes:
    """Intervals of the round starting at `t`; `last_round` defaults to the slot before `t`."""
    d, c = duration, close_steps
    return RoundTimes(
        time=t,
        duration=d,
        current_round=(t, t + d),
        last_round=last_round if last_round is not None else (t - d, t),
        next_settle=(t + c * d, t + (c + 1) * d),
        last_settle=(t + (c - 1) * d, t + c * d),
    )


def is_aligned(interval: Slot, duration: int) -> bool:
    start, end = interval
    return end - start == duration and start % duration == 0


def align_down(t: int, duration: int) -> int:
    return t - t % duration


class Clock(Protocol):
    def now(self) -> int:
        """Market time in Unix seconds."""


class SimClock:
    """Time set by the simulation controller's `step`."""

    def __init__(self, t: int = 0) -> None:
        self._t = t

    def set(self, t: int) -> None:
        self._t = t

    def now(self) -> int:
        return self._t


class RealTimeClock:
    """Wall clock, whole seconds (rt mode)."""

    def now(self) -> int:
        return int(_time.time())

    def seconds_to_next(self, duration: int) -> float:
        """Seconds until the next multiple of `duration` (the next round boundary)."""
        t = _time.time()
        return duration - (t % duration)
