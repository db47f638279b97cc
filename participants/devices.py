"""On-site devices and the meter reading of one slot (PROTOCOL.md meter semantics).

Everything is integer Wh and pure: `meter_reading` returns the reading and the battery's
new state instead of mutating anything, so the accounting can be property-tested.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgspec

from participants.spec import BatterySpec

RESERVED = ("bess", "external")  # meter keys that are not generation sources


class Battery(msgspec.Struct, frozen=True):
    """A battery's state. The round-trip `efficiency` is applied on charge (what is stored is
    less than what was drawn); discharge is lossless, so `soc_wh` is deliverable energy."""

    capacity_wh: int
    power_w: int
    efficiency: float
    soc_wh: int

    @classmethod
    def from_spec(cls, spec: BatterySpec) -> Battery:
        return cls(spec.capacity_wh, spec.power_w, spec.efficiency, round(spec.soc * spec.capacity_wh))

    def limit(self, duration: int) -> int:
        """Most energy that may flow in or out (together) during a slot of `duration` s."""
        return self.power_w * duration // 3600

    def stored(self, wh_in: int) -> int:
        """Energy stored when drawing `wh_in` (rounded down: losses never create energy)."""
        return math.floor(wh_in * self.efficiency)

    def max_input(self) -> int:
        """Largest draw whose stored energy still fits in the free capacity."""
        room = self.capacity_wh - self.soc_wh
        # stored(x) <= room  <=>  x * eff < room + 1; float error is fixed by the loops.
        x = max(0, math.ceil((room + 1) / self.efficiency) - 1)
        while x > 0 and self.stored(x) > room:
            x -= 1
        while self.stored(x + 1) <= room:
            x += 1
        return x

    def reserve_wh(self, fraction: float) -> int:
        return math.ceil(fraction * self.capacity_wh)


class Commitment(msgspec.Struct):
    """P2P energy settled for one slot: bought (Wh) and sold per source (incl. `bess`)."""

    bought: int = 0
    sold: dict[str, int] = {}

    def plan(self, *, charge: bool = True, discharge: bool = True) -> Plan:
        sold = {s: q for s, q in sorted(self.sold.items()) if s != "bess"}
        return Plan(charge, discharge, sold, self.bought, self.sold.get("bess", 0))


class Plan(msgspec.Struct, frozen=True):
    """What the battery may do in a slot, given the P2P commitments for it."""

    charge: bool = True  # store surplus generation
    discharge: bool = True  # cover own load from the battery
    sold: dict[str, int] = {}  # committed sales per source: surplus is exported for them first
    bought: int = 0  # committed purchases: that much load is left to be imported
    bess_export: int = 0  # committed battery sales (`bess` asks)


def split_own_use(load_wh: int, generation: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int], int]:
    """Own generation covers own load first, sources in name order (the traders use the same
    split, so what they sell per source is what the meter exports per source).
    Returns (self-use per source, surplus per source, unmet load)."""
    remaining = load_wh
    used: dict[str, int] = {}
    surplus: dict[str, int] = {}
    for src in sorted(generation):
        g = generation[src]
        use = min(g, remaining)
        remaining -= use
        used[src] = use
        surplus[src] = g - use
    return used, surplus, remaining


def meter_reading(
    load_wh: int,
    generation_by_source: Mapping[str, int],
    battery: Battery | None,
    plan: Plan,
    interval: tuple[int, int],
) -> tuple[dict[str, Any], Battery | None]:
    """The `meter` payload of `interval` and the battery's state after it.

    Order: own generation covers own load; the battery first exports its committed `bess`
    sales, then the shortfall of committed sales of other sources (what was sold beyond
    the surplus of that source: the market books it as `bess_compensation`, PROTOCOL.md
    *Energy exchange*), then covers the load left after committed purchases; surplus
    generation goes to committed sales per source, then charges the battery, then is
    exported. The battery's power limit bounds charge and discharge together.
    """
    if load_wh < 0 or any(v < 0 for v in generation_by_source.values()):
        raise ValueError("energies must be >= 0")
    if any(src in RESERVED for src in generation_by_source):
        raise ValueError(f"{RESERVED} are not generation sources")
    duration = interval[1] - interval[0]
    used, surplus, deficit = split_own_use(load_wh, generation_by_source)

    bess_out = to_load = 0
    charge: dict[str, int] = {}
    new_battery = battery
    if battery is not None:
        budget = battery.limit(duration)
        soc = battery.soc_wh
        # Committed sales come first: what is not delivered the seller pays for at the
        # grid's buy price (a short), while a Wh of own load only costs that price.
        shortfall = sum(max(0, q - surplus.get(src, 0)) for src, q in plan.sold.items())
        bess_out = min(plan.bess_export + shortfall, soc, budget)
        soc -= bess_out
        budget -= bess_out
        if plan.discharge:
            to_load = min(max(0, deficit - plan.bought), soc, budget)
            soc -= to_load
            budget -= to_load
        if plan.charge:
            after = msgspec.structs.replace(battery, soc_wh=soc)
            allowance = min(budget, after.max_input())
            for src in sorted(surplus):
                take = min(allowance, max(0, surplus[src] - plan.sold.get(src, 0)))
                if take:
                    charge[src] = take
                    allowance -= take
            soc += battery.stored(sum(charge.values()))
        new_battery = msgspec.structs.replace(battery, soc_wh=soc)

    generation = {s: surplus[s] - charge.get(s, 0) for s in sorted(surplus)}
    if bess_out:
        generation["bess"] = bess_out
    other = dict(used)
    if to_load:
        other["bess"] = to_load
    other["external"] = deficit - to_load
    meter = {
        "time_interval": [interval[0], interval[1]],
        "generation": {k: v for k, v in generation.items() if v},
        "consumption": {
            "bess": charge,
            "other": {k: v for k, v in other.items() if v or k == "external"},
        },
    }
    return meter, new_battery
