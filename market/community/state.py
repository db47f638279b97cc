"""The Parity market's state: LEMs, measurements, KPIs, SLAs, and the `Change` an action produces."""

from __future__ import annotations

from typing import Any

import msgspec

from market.community.messages import LemParams, Rule
from market.core.errors import MarketError
from market.core.records import (
    Record,
)

# -- state -----------------------------------------------------------------------------------


class Lem(msgspec.Struct, frozen=True):
    start: int
    end: int
    aggregator: str
    players: tuple[str, ...]
    params: LemParams | None

    def wire(self) -> dict[str, Any]:
        return {
            "time_delivery": [self.start, self.end],
            "aggregator": self.aggregator,
            "players": list(self.players),
            "params": self.params.wire() if self.params is not None else None,
        }


class Measurement(msgspec.Struct, frozen=True):
    consumption: int  # Wh
    production: int  # Wh


class Kpi(msgspec.Struct, frozen=True):
    id: str
    signal: str
    rule: Rule
    limit: float
    penalty: int
    players: tuple[str, ...]
    resolution: int

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "signal": self.signal,
            "rule": self.rule,
            "limit": self.limit,
            "penalty": self.penalty,
            "players": list(self.players),
            "resolution": self.resolution,
        }

    def broken(self, value: float) -> bool:
        return value > self.limit if self.rule == "gt" else value < self.limit


class Sla(msgspec.Struct, frozen=True):
    id: str
    aggregator: str
    start: int
    end: int
    kpis: tuple[Kpi, ...]

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "aggregator": self.aggregator,
            "start": self.start,
            "end": self.end,
            "kpis": [k.wire() for k in self.kpis],
        }

    def kpi(self, kpi_id: str) -> Kpi:
        for k in self.kpis:
            if k.id == kpi_id:
                return k
        raise MarketError("not_found", f"SLA {self.id!r} has no KPI {kpi_id!r}")


class Change(msgspec.Struct, frozen=True):
    """What an accepted action produced: records to make durable, then `apply`, and the reply."""

    records: tuple[Record, ...]
    reply: dict[str, Any]
