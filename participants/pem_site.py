"""A PEM coordinator as a market participant (seed 004; docs/pem.md, *In the market*).

The site is the coordinator of `spec.pem.houses` thermal houses: every slot it steps their
HVAC units under PEM (or under plain thermostats, the baseline) with a target from the
feeder, meters the HVAC energy they used, and bids for the next gate's slot what a
look-ahead of the same simulation expects its devices to use, at a price set by their
urgency. Everything else (commitments, bills, memory bounds) is `Prosumer`'s.

Target of slot s: `capacity_kw` minus the forecast net import of the scenario's other
participants in s (their profiles, as the DSO agent forecasts them: controller/dso.py),
floored at 0. The houses follow the market clock: a slot is simulated once, in order;
a look-ahead starts from the state after the last metered slot and changes nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from market.core.records import HouseSlotRecord, PemSlotRecord, Record
from participants.messages import StartRound
from participants.pem import PemConfig, SimState, Trajectory, initial_state, simulate, urgency
from participants.profiles import SiteProfiles, build_profiles
from participants.prosumer import KEEP_SLOTS, Prosumer
from participants.spec import ParticipantSpec, PemSpec
from participants.thermal import Houses, houses
from participants.traders import Order, inside
from participants.weather import Weather, load_weather, year_of

log = logging.getLogger(__name__)
# Slots of rows kept for `take_records`: microte sim takes them every step and `microte
# participant` every second; a caller that never does loses the oldest, with a warning.
PENDING_SLOTS = 2 * KEEP_SLOTS
_ROUND = 4  # decimals of the temperatures on the ledger: the same digits on every platform


def slot_target(capacity_kw: float | None, others_import_wh: int, duration: int) -> float:
    """The coordinator's power target (W) for a slot: the capacity left after the others'
    forecast import (average W over the slot; an export leaves more room), never < 0."""
    if capacity_kw is None:
        return math.inf
    return max(0.0, capacity_kw * 1000 - others_import_wh * 3600 / duration)


def house_wh(traj: Trajectory) -> np.ndarray:
    """Each house's HVAC energy over a trajectory, whole Wh (J rounded half up): the meter
    reading is their sum, so the ledger's per-house rows add up to it exactly."""
    joules = traj.hvac_w.sum(axis=1) * traj.dt
    out: np.ndarray = (joules + 1800) // 3600
    return out


def bid_price(u: float, grid_buy: float | None, grid_sell: float | None) -> float | None:
    """Urgency 0 (every device at its setpoint) bids the grid's sell price, urgency 1 (at
    the band's edge) its buy price, linearly between, moved strictly inside the band
    (`inside`) so a P2P fill beats the grid; None without grid prices."""
    if grid_buy is None or grid_sell is None:
        return None
    u = min(max(u, 0.0), 1.0)
    return inside(grid_sell + (grid_buy - grid_sell) * u, grid_sell, grid_buy)


class PemSite(Prosumer):
    """The coordinator's participant; `others`: the scenario's other participants, whose
    forecast import counts against `capacity_kw`."""

    def __init__(
        self,
        spec: ParticipantSpec,
        seed: int = 0,
        *,
        timezone: str = "UTC",
        base_dir: str | Path | None = None,
        others: Sequence[ParticipantSpec] = (),
    ) -> None:
        if spec.pem is None:
            raise ValueError(f"participant {spec.id}: not a pem site")
        self.pem: PemSpec = spec.pem
        self.houses: Houses = houses(self.pem.houses, seed)
        self.config = PemConfig(m_r=1 / (60 * self.pem.request_minutes), packet_seconds=self.pem.packet_seconds)
        self._others: dict[str, SiteProfiles] = {
            s.id: build_profiles(s, seed, timezone, base_dir) for s in others if s.pem is None and s.id != spec.id
        }
        super().__init__(spec, seed, timezone=timezone, base_dir=base_dir)

    def _restart(self) -> None:
        super()._restart()
        self.state: SimState = initial_state(self.houses, self.seed)
        self._simulated = -1  # start of the last slot simulated
        self._hvac: dict[tuple[int, int], int] = {}  # metered slot -> HVAC Wh
        self.records: list[Record] = []  # ledger rows not yet taken (`take_records`)
        self.dropped = 0  # slots whose rows were dropped untaken (PENDING_SLOTS)

    # -- the houses ------------------------------------------------------------------------

    def weather(self, t: int) -> Weather:
        return load_weather(self.pem.weather, year_of(t), self.base_dir)

    def target(self, slot: tuple[int, int]) -> float:
        others = 0
        for pid in sorted(self._others):
            gen, load = self._others[pid].slot(slot)
            others += load - sum(gen.values())
        return slot_target(self.pem.capacity_kw, others, slot[1] - slot[0])

    def _simulate(self, slot: tuple[int, int], state: SimState) -> Trajectory:
        if (slot[1] - slot[0]) % self.pem.dt:
            raise ValueError(f"{self.spec.id}: pem dt {self.pem.dt} s does not divide the slot")
        return simulate(
            self.houses,
            self.weather(slot[0]),
            slot[0],
            slot[1],
            self.pem.dt,
            self.pem.mode,
            target_w=self.target(slot),
            seed=self.seed,
            config=self.config,
            initial=state,
        )

    def warm(self, slots: Iterable[tuple[int, int]]) -> None:
        """Nothing to warm: `energy` simulates the houses once, in order, when metered."""

    def energy(self, slot: tuple[int, int]) -> tuple[dict[str, int], int]:
        """The houses' HVAC energy of `slot`, simulated once: the slots between the last one
        and this one (a step that jumped ahead) are simulated on the way, unmetered."""
        known = self._hvac.get(slot)
        if known is not None:
            return {}, known
        if slot[0] <= self._simulated:
            raise ValueError(f"{self.spec.id}: slot {slot} is before the houses' clock")
        d = slot[1] - slot[0]
        if self._simulated >= 0:
            for start in range(self._simulated + d, slot[0], d):
                self.state = self._simulate((start, start + d), self.state).final
        traj = self._simulate(slot, self.state)
        self.state, self._simulated = traj.final, slot[0]
        wh = house_wh(traj)
        self._hvac = {slot: int(wh.sum())}  # only the slot being metered is asked again
        self.records.extend(self._rows(slot, traj, wh))
        per_slot = self.houses.n + 1
        if len(self.records) > PENDING_SLOTS * per_slot:  # nobody takes them: bound the memory
            del self.records[:per_slot]
            self.dropped += 1
            log.warning("%s: house rows of a slot dropped (%d so far): nothing writes them", self.spec.id, self.dropped)
        return {}, int(wh.sum())

    def _ahead(self, slot: tuple[int, int]) -> Trajectory:
        """A look-ahead from the state after the last simulated slot to `slot` (inclusive)."""
        d = slot[1] - slot[0]
        state = self.state
        start = self._simulated + d if self._simulated >= 0 else slot[0]
        for s in range(start, slot[0], d):
            state = self._simulate((s, s + d), state).final
        return self._simulate(slot, state)

    def forecast(self, slot: tuple[int, int]) -> tuple[dict[str, int], int]:
        return {}, int(house_wh(self._ahead(slot)).sum())

    def _trade(self, msg: StartRound) -> list[Order]:
        slot = msg.next_settle
        traj = self._ahead(slot)
        committed = self.commitments.get(slot[0])
        need = int(house_wh(traj).sum()) - (committed.bought if committed else 0)
        prices = self._prices.get(slot[0])
        u = float(np.clip(urgency(self.houses, traj.air[:, 0]), 0.0, 1.0).mean()) if self.houses.n else 0.0
        price = bid_price(u, *(prices or (None, None)))
        if need <= 0 or price is None:
            return []
        self.stats.orders += 1
        return [{"side": "bid", "quantity": need, "price": price, "time_delivery": list(slot), "id": f"{slot[0]}-0"}]

    # -- the ledger rows -------------------------------------------------------------------

    def take_records(self) -> list[Record]:
        """The rows of the slots metered since the last call (docs/pem.md, *Ledger*)."""
        out, self.records = self.records, []
        return out

    def _rows(self, slot: tuple[int, int], traj: Trajectory, wh: np.ndarray) -> list[Record]:
        h, pid = self.houses, self.spec.id
        target = traj.target_w[0]
        air_end = traj.final.air
        r = _ROUND
        rows: list[Record] = []
        outside = ((traj.air < h.z_min[:, None]) | (traj.air > h.z_max[:, None])).sum(axis=1)
        hours = traj.dt / 3600
        above = np.maximum(traj.air - h.z_max[:, None], 0).sum(axis=1) * hours
        below = np.maximum(h.z_min[:, None] - traj.air, 0).sum(axis=1) * hours
        for i in range(h.n):
            rows.append(
                HouseSlotRecord(
                    id=f"h{slot[0]}.{pid}.{int(h.keys[i])}",
                    site=pid,
                    house=int(h.keys[i]),
                    time_delivery_start=slot[0],
                    time_delivery_end=slot[1],
                    air_start=round(float(traj.air[i, 0]), r),
                    air_min=round(float(traj.air[i].min()), r),
                    air_max=round(float(traj.air[i].max()), r),
                    air_end=round(float(air_end[i]), r),
                    band_low=round(float(h.z_min[i]), r),
                    band_high=round(float(h.z_max[i]), r),
                    hvac_wh=int(wh[i]),
                    requested=int(traj.house_requested[i]),
                    accepted=int(traj.house_accepted[i]),
                    opted_out_steps=int(outside[i]),
                    kh_above=round(float(above[i]), r),
                    kh_below=round(float(below[i]), r),
                )
            )
        rows.append(
            PemSlotRecord(
                id=f"pem{slot[0]}.{pid}",
                site=pid,
                mode=self.pem.mode,
                time_delivery_start=slot[0],
                time_delivery_end=slot[1],
                capacity_w=None if self.pem.capacity_kw is None else round(self.pem.capacity_kw * 1000),
                target_w=None if math.isinf(target) else math.floor(target),
                load_wh=int(wh.sum()),
                peak_w=int(traj.load_w.max()),
                steps_over=int((traj.load_w > target).sum()),
                requested=int(traj.requested.sum()),
                accepted=int(traj.accepted.sum()),
                denied=int(traj.requested.sum() - traj.accepted.sum()),
                opted_out=int(outside.sum()),
                outdoor_c=round(float(traj.outdoor.mean()), r),
                houses=h.n,
            )
        )
        return rows
