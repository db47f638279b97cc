"""Grid tariff (what the utility grid pays and charges) and the DSO's grid state per slot.

sell price = the base price (or the time-of-use price of the slot's local hour);
buy price = sell * (1 + fee). Time-of-use rules are matched in order, first match wins.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from market.core.protocol import GridState

NonNegPrice = Annotated[float, msgspec.Meta(ge=0, le=1e3)]


class TouRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base price for the slots whose local start matches every given field."""

    price: NonNegPrice
    months: list[Annotated[int, msgspec.Meta(ge=1, le=12)]] = []  # empty: every month
    days: Literal["all", "weekday", "weekend"] = "all"
    hours: list[Annotated[int, msgspec.Meta(ge=0, le=23)]] = []  # empty: every hour

    def matches(self, month: int, weekday: int, hour: int) -> bool:
        """Whether a slot starting at this local month, weekday (Monday 0) and hour matches."""
        if self.months and month not in self.months:
            return False
        weekend = weekday >= 5
        if (self.days == "weekday" and weekend) or (self.days == "weekend" and not weekend):
            return False
        return not self.hours or hour in self.hours


@functools.lru_cache(maxsize=4096)
def _local_fields(slot_start: int, timezone: str) -> tuple[int, int, int]:
    """(month, weekday, hour) of `slot_start` in `timezone`: a slot's prices are asked for
    in every round that announces it and once more when it is processed."""
    local = datetime.fromtimestamp(slot_start, UTC).astimezone(ZoneInfo(timezone))
    return local.month, local.weekday(), local.hour


class GridTariff(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    price: NonNegPrice = 0.10  # base (sell) price per kWh
    fee: Annotated[float, msgspec.Meta(ge=0, le=100)] = 1.0  # buy = sell * (1 + fee)
    timezone: str = "UTC"
    tou: list[TouRule] = []

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)  # fail early on an unknown zone
        except ZoneInfoNotFoundError:  # a KeyError: msgspec reports only ValueError/TypeError as invalid
            raise ValueError(f"unknown time zone {self.timezone!r}") from None

    def sell_price(self, slot_start: int) -> float:
        if self.tou:
            fields = _local_fields(slot_start, self.timezone)
            for rule in self.tou:
                if rule.matches(*fields):
                    return rule.price
        return self.price

    def buy_price(self, slot_start: int) -> float:
        return self.sell_price(slot_start) * (1 + self.fee)

    def prices(self, slot_start: int) -> tuple[float, float]:
        """(buy, sell) per kWh for the slot starting at `slot_start`."""
        sell = self.sell_price(slot_start)
        return sell * (1 + self.fee), sell


class GridStates:
    """The DSO's state per slot start; GREEN where none was set."""

    def __init__(self) -> None:
        self._states: dict[int, GridState] = {}

    def set(self, slot_start: int, state: GridState) -> None:
        self._states[slot_start] = state

    def get(self, slot_start: int) -> GridState:
        return self._states.get(slot_start, "GREEN")

    def forget_before(self, t: int) -> None:
        for start in [s for s in self._states if s < t]:
            del self._states[start]
