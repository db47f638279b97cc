"""Many prosumers as arrays: the decisions of `Prosumer` (participants/prosumer.py) for a
whole population at once, with numpy over the members instead of Python per member.

Exactly the same readings, orders and bills as one `Prosumer` per spec fed the same
payloads (tests/participants/test_population.py compares them round by round, and the
ledger digests of whole runs): integer Wh, the same float operations in the same order
(IEEE arithmetic is the same elementwise in numpy), the same seeded generators for the
traders that draw and the forecasts that err. What a member reads and trades is still
one dict per reading and per order where a caller needs them (`MeterBatch.reading`), or
columns (`MeterBatch.columns`, `OrderBatch`) for the columnar paths.

Only plain specs join (`plain`): a `pem` site or a trader outside the four built-in ones
stays a `Prosumer` of its own.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from market.core.protocol import ConsumptionMsg, EntryMsg, MeterMsg, Side
from participants.devices import Battery
from participants.messages import Delivery, Settled, StartRound, TransactionColumns
from participants.profiles import SiteProfiles, build_profiles
from participants.prosumer import KEEP_SLOTS, P2P_KINDS, Stats, facts_of, forecast_normals, forecast_wh, off_by
from participants.spec import BatteryTrader, FixedPriceTrader, ParticipantSpec
from participants.synthetic import (
    DAY,
    SEED_TOGETHER,
    day_slot,
    fill_days,
    stable_key,
    uniforms,
    uniforms_rows,
    units_rows,
)
from participants.traders import inside

# Trader kinds by index (the spec's tag).
KINDS = ("none", "fixed_price", "random_price", "battery")
NONE, FIXED, RANDOM, BATTERY = range(4)
BESS = "bess"
BANDS_KEPT = 64  # grid bands whose order prices are kept (`Population._band_prices`)
# Fills from which `Population.on_fills` adds them up a column at a time (below: one by one).
FILLS_AT_ONCE = 64
# A member's fill: (member, slot start, commit id, side, quantity, source).
Fill = tuple[int, int, str | None, str, int, str | None]
# Random traders from which their prices are drawn as arrays (`uniforms_rows`, ~0.2 ms) rather
# than one `uniforms` call each (~7 us).
VECTOR_DRAWS = 32


# Forecast draws a day block computes at once (`Population._forecast_z`): ~25 ms once a day,
# where more erring members draw each slot's own (a day's block at once would stall a round).
Z_BLOCK_DRAWS = 8192
# Day blocks of forecast draws (`Population._forecast_z`) by the pairs they are of, for every
# population of the process: an environment's episodes replay the same days. At most
# `_SHARED_Z_CELLS` draws (8 MB) are kept, the oldest blocks dropped first.
_SHARED_Z: dict[tuple[object, ...], np.ndarray] = {}
_SHARED_Z_CELLS = 1 << 20


def _share_z(key: tuple[object, ...], block: np.ndarray) -> None:
    if block.size > _SHARED_Z_CELLS:
        return
    while _SHARED_Z and sum(b.size for b in _SHARED_Z.values()) + block.size > _SHARED_Z_CELLS:
        del _SHARED_Z[next(iter(_SHARED_Z))]
    block.flags.writeable = False
    _SHARED_Z[key] = block


def _day_block(
    memo: dict[tuple[int, int, int], np.ndarray], slot: tuple[int, int], draw: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, int] | None:
    """A population's draws for the day block of slots holding `slot`, kept in `memo` for
    the two latest blocks (`draw` of the block's slot starts computes them), and the slot's
    index in the block. None if the slot does not tile a day, or the block's starts do not
    fit the 32-bit words that seeding in arrays takes (past 2106-02-07)."""
    start, d = slot[0], slot[1] - slot[0]
    if d <= 0 or DAY % d:
        return None
    phase, block, k = day_slot(start, d)
    key = (d, phase, block)
    hit = memo.get(key)
    if hit is None:
        first = phase + block * DAY
        if first < 0 or first + DAY > 2**32:
            return None
        hit = draw(first + d * np.arange(DAY // d, dtype=np.int64))
        if len(memo) >= 2:
            del memo[next(iter(memo))]  # the oldest
        memo[key] = hit
    return hit, k


def plain(spec: ParticipantSpec) -> bool:
    """Whether `spec` can be a member (a `Prosumer` with a built-in trader, not a PEM site)."""
    return spec.pem is None and type(spec.trader).__struct_config__.tag in KINDS


def split_all(load: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`split_own_use` per member: own generation covers own load, sources in name order
    (the columns are in name order). Returns (used, surplus, deficit)."""
    remaining = load.copy()
    used = np.empty_like(gen)
    for j in range(gen.shape[1]):
        use = np.minimum(gen[:, j], remaining)
        remaining -= use
        used[:, j] = use
    return used, gen - used, remaining


def _stored(wh_in: np.ndarray, eff: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.floor(wh_in * eff).astype(np.int64)  # `Battery.stored`: losses never create energy
    return out


def max_input_all(cap: np.ndarray, soc: np.ndarray, eff: np.ndarray) -> np.ndarray:
    """`Battery.max_input` per member: the same first guess and the same corrections."""
    room = cap - soc
    x: np.ndarray = np.maximum(0, np.ceil((room + 1) / eff).astype(np.int64) - 1)
    while True:
        over = (x > 0) & (_stored(x, eff) > room)
        if not over.any():
            break
        x -= over
    while True:
        under = _stored(x + 1, eff) <= room
        if not under.any():
            break
        x += under
    return x


def inside_all(price: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    """`traders.inside` of each price."""
    if low is None or high is None or high <= low:
        return price.astype(np.float64)
    margin = min(1e-4, (high - low) / 4)
    out: np.ndarray = np.minimum(np.maximum(price, low + margin), high - margin)
    return out


def _amount(quantity: np.ndarray, price: float) -> np.ndarray:
    """`records.amount` of each quantity: round(q * price * 1000), half to even as `round`."""
    out: np.ndarray = np.rint(quantity.astype(np.float64) * price * 1000).astype(np.int64)
    return out


class MeterBatch(msgspec.Struct):
    """Every member's reading of one slot, as `meter_reading` splits it (Wh per member;
    per source in `sources` order)."""

    slot: tuple[int, int]
    sources: tuple[str, ...]
    exported: np.ndarray  # generation per source after charging (N x S)
    bess_out: np.ndarray  # generation.bess
    charge: np.ndarray  # consumption.bess per source (N x S)
    used: np.ndarray  # consumption.other per source: own use (N x S)
    to_load: np.ndarray  # consumption.other.bess
    external: np.ndarray  # consumption.other.external
    _lists: tuple[list[Any], ...] | None = None

    def reading(self, i: int) -> dict[str, Any]:
        """Member `i`'s `meter` payload, as `meter_reading` builds it."""
        generation, bess, other = self._maps(i)
        return {
            "time_interval": [self.slot[0], self.slot[1]],
            "generation": generation,
            "consumption": {"bess": bess, "other": other},
        }

    def _maps(self, i: int) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """(generation, consumption.bess, consumption.other) of member `i`: zeros left out,
        but never `external`."""
        lists = self._lists
        if lists is None:  # every member's values as Python ints, once per batch
            lists = self._lists = (
                self.exported.tolist(),
                self.bess_out.tolist(),
                self.charge.tolist(),
                self.used.tolist(),
                self.to_load.tolist(),
                self.external.tolist(),
            )
        exported, bess_out, charge, used, to_load, external = lists
        sources = self.sources
        generation = {s: v for s, v in zip(sources, exported[i], strict=True) if v}
        if bess_out[i]:
            generation[BESS] = bess_out[i]
        other = {s: v for s, v in zip(sources, used[i], strict=True) if v}
        if to_load[i]:
            other[BESS] = to_load[i]
        other["external"] = external[i]
        return generation, {s: v for s, v in zip(sources, charge[i], strict=True) if v}, other

    def keys(self) -> tuple[list[str], list[str], list[str]]:
        """Every key its readings' maps may hold (generation, consumption.bess and
        consumption.other): what `Market.meter_each` checks once for the batch (`sources`)."""
        sources = list(self.sources)
        return [*sources, BESS], sources, [*sources, BESS, "external"]

    def messages(self) -> list[MeterMsg]:
        """`reading(i)` of every member as the market decodes it (no JSON in between: the
        in-process market), built from the nonzero cells of all maps at once: only they are
        put into the maps of the members that have them (most are zero, the night's
        generation and nearly all charging), where `reading` builds three maps per member."""
        n = len(self.external)
        gens: list[dict[str, int]] = [{} for _ in range(n)]
        bess: list[dict[str, int]] = [{} for _ in range(n)]
        others: list[dict[str, int]] = [{} for _ in range(n)]
        sources = self.sources
        # Every map's values side by side, a member a row; its nonzero cells in row-major
        # order put each member's keys in column order, as a column at a time did.
        table = np.column_stack([self.exported, self.bess_out, self.used, self.to_load, self.charge])
        maps = [gens] * (len(sources) + 1) + [others] * (len(sources) + 1) + [bess] * len(sources)
        keys = [*sources, BESS, *sources, BESS, *sources]
        rows, cols = np.nonzero(table)
        for i, j, v in zip(rows.tolist(), cols.tolist(), table[rows, cols].tolist(), strict=True):
            maps[j][i][keys[j]] = v
        slot = self.slot
        out = []
        for g, b, o, external in zip(gens, bess, others, self.external.tolist(), strict=True):
            o["external"] = external
            out.append(MeterMsg(slot, g, ConsumptionMsg(b, o)))
        return out

    def columns(self, rows: Sequence[int], participants: list[str]) -> dict[str, Any]:
        """`meters.columns` of members `rows` (docs/protocol.md): null where a reading has
        no such entry, as the dicts of `reading` leave out zeros (but never `external`)."""
        idx = np.asarray(rows, dtype=np.int64)

        def table(values: np.ndarray, names: Sequence[str]) -> dict[str, list[int | None]]:
            out: dict[str, list[int | None]] = {}
            for j, name in enumerate(names):
                col = values[idx, j]
                if col.any():
                    out[name] = [v or None for v in col.tolist()]
            return out

        sources = list(self.sources)
        gen = table(np.column_stack([self.exported, self.bess_out]), [*sources, BESS])
        other = table(np.column_stack([self.used, self.to_load]), [*sources, BESS])
        other["external"] = self.external[idx].tolist()
        data: dict[str, Any] = {
            "participant": participants,
            "time_interval": [[self.slot[0], self.slot[1]]] * len(participants),
            "other": other,
        }
        if gen:
            data["generation"] = gen
        bess = table(self.charge, sources)
        if bess:
            data["bess"] = bess
        return data


class OrderBatch(msgspec.Struct):
    """The orders of one round for `slot`, in member order and, within a member, in the
    order its trader lists them (`<slot start>-<n>` ids)."""

    slot: tuple[int, int]
    member: np.ndarray  # index of the member of each order
    bid: np.ndarray  # bool: a bid, else an ask
    quantity: np.ndarray
    price: np.ndarray
    source: list[str | None]
    seq: np.ndarray  # n of the order's id

    def __len__(self) -> int:
        return len(self.member)

    def _items(self) -> Iterator[tuple[int, Side, int, float, str | None, str]]:
        """(member, side, quantity, price, source, client id) of each order, as Python values."""
        first = self.slot[0]
        sides: list[Side] = ["bid" if b else "ask" for b in self.bid.tolist()]
        ids = [f"{first}-{n}" for n in self.seq.tolist()]
        return zip(
            self.member.tolist(), sides, self.quantity.tolist(), self.price.tolist(), self.source, ids, strict=True
        )

    def entries(self) -> list[tuple[int, Side, EntryMsg]]:
        """(member, side, entry) of each order, as the market decodes `orders()`."""
        slot = self.slot
        return [(m, side, EntryMsg(q, p, slot, i, s)) for m, side, q, p, s, i in self._items()]

    def columns(self, ids: Sequence[str], first: int, last: int) -> tuple[list[str], dict[str, Any]]:
        """`orders.columns` of orders [first, last) (docs/protocol.md): (participants, payload)."""
        member = self.member[first:last].tolist()
        pids = [ids[m] for m in member]
        slot, start = [self.slot[0], self.slot[1]], self.slot[0]
        data = {
            "participant": pids,
            "side": ["bid" if b else "ask" for b in self.bid[first:last].tolist()],
            "quantity": self.quantity[first:last].tolist(),
            "price": self.price[first:last].tolist(),
            "time_delivery": [slot] * len(pids),
            "id": [f"{start}-{n}" for n in self.seq[first:last].tolist()],
            "source": self.source[first:last],
        }
        return pids, data

    def orders(self) -> list[tuple[int, dict[str, Any]]]:
        """(member, order dict as the trader builds it) of each order."""
        slot = [self.slot[0], self.slot[1]]
        out = []
        for m, side, q, p, s, i in self._items():
            order: dict[str, Any] = {"side": side, "quantity": q, "price": p, "time_delivery": slot, "id": i}
            if s is not None:
                order["source"] = s
            out.append((m, order))
        return out


class _Slot(msgspec.Struct):
    """What the population remembers of one slot (as the prosumer's per-slot tables)."""

    bought: np.ndarray  # committed P2P purchases, Wh per member
    sold: np.ndarray  # committed sales per source (N x S+1: the last column is `bess`)
    sold_other: np.ndarray  # sales of a source no member has (only ever short)
    seen: set[tuple[str, str, str]] = set()  # (commit_id, side, participant) of the fills counted
    delivered: np.ndarray | None = None  # bool per member: its delivery was counted
    pending: tuple[np.ndarray, np.ndarray] | None = None  # grid-only (paid, received)


class Population:
    """The members' state as arrays: batteries, commitments and bills per slot, stats."""

    def __init__(
        self,
        specs: Sequence[ParticipantSpec],
        seed: int = 0,
        *,
        timezone: str = "UTC",
        base_dir: str | Path | None = None,
    ) -> None:
        bad = [s.id for s in specs if not plain(s)]
        if bad:
            raise ValueError(f"not plain prosumers (a pem site or another trader): {bad[:5]}")
        self.specs = list(specs)
        self.ids = [s.id for s in specs]
        self.index = {pid: i for i, pid in enumerate(self.ids)}
        self.seed = seed
        self.base_dir = base_dir
        self.timezone = timezone
        self._keys = [stable_key(pid) for pid in self.ids]
        self.profiles: list[SiteProfiles] = [build_profiles(s, seed, timezone, base_dir) for s in specs]
        self.sources = tuple(sorted({src for p in self.profiles for src in p.sources} - {BESS}))
        if len(self.sources) != len({src for p in self.profiles for src in p.sources}):
            raise ValueError("'bess' is not a generation source")
        self._col = {s: j for j, s in enumerate(self.sources)}
        self._own = [sorted(p.sources) for p in self.profiles]  # each member's sources (random draws)
        n = len(specs)
        self.kind = np.array([KINDS.index(type(s.trader).__struct_config__.tag) for s in specs], dtype=np.int64)
        fixed = [s.trader if isinstance(s.trader, FixedPriceTrader) else FixedPriceTrader() for s in specs]
        self._bid_price = np.array([t.bid_price for t in fixed], dtype=np.float64)
        self._ask_price = np.array([t.ask_price for t in fixed], dtype=np.float64)
        bt = [s.trader if isinstance(s.trader, BatteryTrader) else BatteryTrader() for s in specs]
        self._high = np.array([t.high for t in bt], dtype=np.float64)
        self.has_battery = np.array([s.battery is not None for s in specs], dtype=bool)
        batteries = [Battery.from_spec(s.battery) if s.battery else None for s in specs]
        self.capacity = np.array([b.capacity_wh if b else 0 for b in batteries], dtype=np.int64)
        self.power = np.array([b.power_w if b else 0 for b in batteries], dtype=np.int64)
        self.efficiency = np.array([b.efficiency if b else 1.0 for b in batteries], dtype=np.float64)
        self._soc0 = np.array([b.soc_wh if b else 0 for b in batteries], dtype=np.int64)
        self._reserve = np.array(
            [b.reserve_wh(t.reserve) if b else 0 for b, t in zip(batteries, bt, strict=True)], dtype=np.int64
        )
        self._errors = [
            sorted(
                (src, g.forecast_error)
                for src, g in (("solar", s.pv), ("wind", s.wind))
                if g is not None and g.forecast_error > 0
            )
            for s in specs
        ]
        self._erring = [i for i, e in enumerate(self._errors) if e]
        # Each erring (member, source, column, error), in `Prosumer.forecast`'s order; their
        # draws per day block (`_forecast_z`) and what identifies them among populations.
        self._err_pairs = [(i, src, self._col[src], error) for i in self._erring for src, error in self._errors[i]]
        self._err_keys = np.array([self._keys[i] for i, *_ in self._err_pairs], dtype=np.int64)
        self._err_srcs = np.array([stable_key(src) for _, src, *_ in self._err_pairs], dtype=np.int64)
        self._err_ident = (seed % 2**64, tuple(self._err_keys.tolist()), tuple(self._err_srcs.tolist()))
        self._zs: dict[tuple[int, int, int], np.ndarray] = {}
        # The members that draw their prices; for `_draw_prices`, each one's key, and per own
        # source its place among the draws and the price column it sets.
        self._drawing = np.flatnonzero(self.kind == RANDOM)
        drawing = self._drawing.tolist()
        self._draw_keys = np.array([self._keys[i] for i in drawing], dtype=np.int64)
        self._draw_k = 1 + max((len(self._own[i]) for i in drawing), default=0)
        own = [(p, 1 + t, 1 + self._col[src]) for p, i in enumerate(drawing) for t, src in enumerate(self._own[i])]
        at, nth, col = (np.array([o[j] for o in own], dtype=np.int64) for j in range(3))
        self._draw_own = (at, nth, col)
        self._battery_kind = self.kind == BATTERY
        self._units: dict[tuple[int, int, int], np.ndarray] = {}  # `_day_units` per day block
        self.stats = {name: np.zeros(n, dtype=np.int64) for name in Stats.__struct_fields__}
        # Members traded from outside (a research environment's agents): metered, never traded.
        self.external = np.zeros(n, dtype=bool)
        self._bands: dict[tuple[float | None, float | None], tuple[np.ndarray, np.ndarray]] = {}
        self._restart()

    def __len__(self) -> int:
        return len(self.ids)

    def _restart(self) -> None:
        self.soc = self._soc0.copy()
        self._slots: dict[int, _Slot] = {}
        self._starts: list[int] = []  # a heap of the starts in `_slots`, for `_forget`
        self._prices: dict[int, tuple[float, float]] = {}
        self._price_starts: list[int] = []  # a heap of the starts in `_prices`
        self._energy: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._forecasts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._days: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, list[int]]] = {}
        self._time: int | None = None
        self._metered = -1
        self._traded = -1

    def battery(self, i: int) -> Battery | None:
        """Member `i`'s battery state now."""
        s = self.specs[i].battery
        if s is None:
            return None
        return Battery(s.capacity_wh, s.power_w, s.efficiency, int(self.soc[i]))

    def stats_of(self, i: int) -> Stats:
        return Stats(**{name: int(col[i]) for name, col in self.stats.items()})

    def _slot(self, start: int) -> _Slot:
        s = self._slots.get(start)
        if s is None:
            n = len(self.ids)
            s = self._slots[start] = _Slot(
                np.zeros(n, dtype=np.int64),
                np.zeros((n, len(self.sources) + 1), dtype=np.int64),
                np.zeros(n, dtype=np.int64),
                set(),
            )
            heapq.heappush(self._starts, start)
        return s

    # -- energy ---------------------------------------------------------------------------

    def energy(self, slot: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(generation N x S, load N) of `slot`, memoized as `Prosumer.energy`."""
        hit = self._energy.get(slot)
        if hit is None:
            d = slot[1] - slot[0]
            day = self._day(slot[0], d) if d > 0 and DAY % d == 0 else None
            if day is None:
                rows: Iterable[int] = range(len(self.ids))
                gen = np.zeros((len(self.ids), len(self.sources)), dtype=np.int64)
                load = np.zeros(len(self.ids), dtype=np.int64)
            else:
                gens, loads, rows = day
                k = (slot[0] - slot[0] % d) // d % (DAY // d)
                gen, load = gens[:, :, k], loads[:, k]
                if rows:
                    gen, load = gen.copy(), load.copy()
            col = self._col
            for i in rows:  # members whose profiles are not synthetic: slot by slot
                g, load[i] = self.profiles[i].slot(slot)
                for src, wh in g.items():
                    gen[i, col[src]] = wh
            hit = self._energy[slot] = (gen, load)
        return hit

    def _day(self, start: int, d: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Every member's energy of each slot of the day's block holding `start` (N x S x
        slots, N x slots), and the members whose profiles cannot give a day at once."""
        key = (d, start % d, (start - start % d) // d // (DAY // d))
        hit = self._days.get(key)
        if hit is None:
            per_block = DAY // d
            gens = np.zeros((len(self.ids), len(self.sources), per_block), dtype=np.int64)
            loads = np.zeros((len(self.ids), per_block), dtype=np.int64)
            rows: list[int] = []
            col = self._col
            fill_days((s for p in self.profiles for s in p.synthetic()), start, d)
            for i, p in enumerate(self.profiles):
                day = p.day(start, d)
                if day is None:
                    rows.append(i)
                    continue
                g, loads[i], _ = day
                for src, values in g.items():
                    gens[i, col[src]] = values
            if len(self._days) >= 3:
                del self._days[next(iter(self._days))]  # the oldest
            hit = self._days[key] = (gens, loads, rows)
        return hit

    def warm(self, slots: Iterable[tuple[int, int]]) -> None:
        for slot in slots:
            self.energy(slot)

    def prepare(self, slot: tuple[int, int], rows: Iterable[int]) -> None:
        """Build the profiles of members `rows` for `slot` (a day of them), so that the round
        that needs the slot does not build every member's day at once."""
        rows = list(rows)
        fill_days((s for i in rows for s in self.profiles[i].synthetic()), slot[0], slot[1] - slot[0])
        for i in rows:
            self.profiles[i].slot(slot)

    def forecast(self, slot: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """`Prosumer.forecast` of every member: `energy` with erring sources drawn off."""
        gen, load = self.energy(slot)
        if not self._erring:
            return gen, load
        hit = self._forecasts.get(slot)  # memoized: agents observe and trade the slot the traders trade
        if hit is None:
            out = gen.copy()
            z = self._forecast_z(slot, out)
            for p, (i, src, j, error) in enumerate(self._err_pairs):
                if out[i, j]:
                    wh, zp = int(out[i, j]), z[p]
                    if zp is None:
                        out[i, j] = forecast_wh(self.seed, self._keys[i], slot[0], src, error, wh)
                    else:
                        out[i, j] = off_by(wh, error, zp)
            hit = self._forecasts[slot] = (out, load)
        return hit

    def _forecast_z(self, slot: tuple[int, int], gen: np.ndarray) -> Sequence[float | None]:
        """`forecast_wh`'s normal draw of each erring pair at `slot` (None: left to
        `forecast_wh`), seeded together (~3 us a draw against ~12 us a `forecast_wh`): for
        the slot's whole day block at once while that is at most `Z_BLOCK_DRAWS` draws
        (shared with every population of the same pairs, `_SHARED_Z`), else for the pairs
        that forecast energy in the slot (`gen`), from `SEED_TOGETHER` of them (the seeding's
        fixed cost). Slot by slot also where a slot does not tile a day, and `forecast_wh`'s
        own where the starts do not fit the seeding's 32-bit words."""
        start, d = slot[0], slot[1] - slot[0]
        m = len(self._err_pairs)
        if d > 0 and m * (DAY // d) <= Z_BLOCK_DRAWS:
            block = self._day_z(slot)
            if block is not None:
                return block
        z: list[float | None] = [None] * m
        rows = [p for p, (i, _, j, _) in enumerate(self._err_pairs) if gen[i, j]]
        if len(rows) >= SEED_TOGETHER and 0 <= start < 2**32:
            idx = np.array(rows, dtype=np.int64)
            starts = np.full(len(rows), start, dtype=np.int64)
            for p, v in zip(
                rows, forecast_normals(self.seed, self._err_keys[idx], self._err_srcs[idx], starts), strict=True
            ):
                z[p] = v
        return z

    def _day_z(self, slot: tuple[int, int]) -> list[float] | None:
        """The draws of `_forecast_z` at `slot` from its day block (`_day_block`; shared
        with every population of the same pairs, `_SHARED_Z`), or None."""

        def draw(starts: np.ndarray) -> np.ndarray:
            shared = (*self._err_ident, slot[1] - slot[0], int(starts[0]))
            hit = _SHARED_Z.get(shared)
            if hit is None:
                m, per_block = len(self._err_pairs), len(starts)
                keys, srcs = np.repeat(self._err_keys, per_block), np.repeat(self._err_srcs, per_block)
                hit = np.array(forecast_normals(self.seed, keys, srcs, np.tile(starts, m))).reshape(m, per_block)
                _share_z(shared, hit)
            return hit

        got = _day_block(self._zs, slot, draw)
        if got is None:
            return None
        hit, k = got
        out: list[float] = hit[:, k].tolist()
        return out

    def committed(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """(bought N, sold N x S+1, `bess` last) of the fills of slot `start` so far."""
        c = self._slots.get(start)
        if c is None:
            n = len(self.ids)
            return np.zeros(n, dtype=np.int64), np.zeros((n, len(self.sources) + 1), dtype=np.int64)
        return c.bought, c.sold

    def prices(self, start: int) -> tuple[float, float] | None:
        """(grid buy, grid sell) of slot `start`, as announced."""
        return self._prices.get(start)

    # -- rounds ---------------------------------------------------------------------------

    def on_round(self, msg: StartRound, *, trade: bool = True) -> tuple[MeterBatch | None, OrderBatch | None]:
        """`Prosumer.on_round_msg` of every member: the slot's readings (None if it was
        metered) and the orders for `next_settle` (None if not traded now)."""
        if msg.timezone != self.timezone:
            self.timezone = msg.timezone
            self.profiles = [build_profiles(s, self.seed, msg.timezone, self.base_dir) for s in self.specs]
            self._energy.clear()
            self._forecasts.clear()
            self._days.clear()
        if self._time is not None and msg.time < self._time:
            self._restart()
        self._time = msg.time
        self.stats["rounds"] += 1
        facts = facts_of(msg)
        prices = self._prices
        for start, p in facts.prices.items():
            if start not in prices:
                heapq.heappush(self._price_starts, start)
            prices[start] = p
        slot = msg.current_round if msg.mode == "sim" else msg.last_round
        meters = None
        if slot is not None and slot[0] > self._metered:
            meters = self._meter(slot)
        orders = None
        if trade and msg.next_settle[0] > self._traded:
            self._traded = msg.next_settle[0]
            orders = self._trade(msg, facts.buy_mean)
        self._forget(msg.current_round)
        return meters, orders

    def _meter(self, slot: tuple[int, int]) -> MeterBatch:
        gen, load = self.energy(slot)
        used, surplus, deficit = split_all(load, gen)
        c = self._slots.get(slot[0])
        n, s = gen.shape
        sold = c.sold if c is not None else np.zeros((n, s + 1), dtype=np.int64)
        bought = c.bought if c is not None else np.zeros(n, dtype=np.int64)
        has = self.has_battery
        budget = np.where(has, self.power * (slot[1] - slot[0]) // 3600, 0)
        soc = self.soc
        shortfall = np.maximum(0, sold[:, :s] - surplus).sum(axis=1)
        if c is not None:
            shortfall += c.sold_other
        bess_out = np.where(has, np.minimum(np.minimum(sold[:, s] + shortfall, soc), budget), 0)
        soc = soc - bess_out
        budget = budget - bess_out
        to_load = np.where(has, np.minimum(np.minimum(np.maximum(0, deficit - bought), soc), budget), 0)
        soc -= to_load
        budget -= to_load
        allowance = np.where(has, np.minimum(budget, max_input_all(self.capacity, soc, self.efficiency)), 0)
        charge = np.zeros_like(gen)
        for j in range(s):
            take = np.minimum(allowance, np.maximum(0, surplus[:, j] - sold[:, j]))
            charge[:, j] = take
            allowance -= take
        soc += np.where(has, _stored(charge.sum(axis=1), self.efficiency), 0)
        self.soc = soc
        self._metered = slot[0]
        self.stats["meters"] += 1
        prices = self._prices.get(slot[0])
        if prices is not None:
            self._slot(slot[0]).pending = (_amount(deficit, prices[0]), _amount(surplus.sum(axis=1), prices[1]))
        return MeterBatch(slot, self.sources, surplus - charge, bess_out, charge, used, to_load, deficit - to_load)

    def _trade(self, msg: StartRound, buy_mean: float | None) -> OrderBatch:
        slot = msg.next_settle
        gen, load = self.forecast(slot)
        prices = self._prices.get(slot[0])
        low, high = (prices[1], prices[0]) if prices else (None, None)
        n, s = gen.shape
        c = self._slots.get(slot[0])
        _, surplus, deficit = split_all(load, gen)
        bid = np.maximum(0, deficit - (c.bought if c is not None else 0))
        asks = np.maximum(0, surplus - (c.sold[:, :s] if c is not None else 0))
        bess = np.zeros(n, dtype=np.int64)
        qty = np.zeros((n, s + 2), dtype=np.int64)  # bid, asks per source, the bess ask
        template, trades = self._band_prices(low, high)
        price = template.copy()
        if low is not None and high is not None and high > low:
            self._battery_orders(self._battery_kind, bid, asks, bess, slot, low, high, buy_mean, c)
            units = self._day_units(slot) if len(self._drawing) else None
            if units is not None:
                self._draw_prices(price, low + (high - low) * units, low, high)
            elif len(self._drawing) >= VECTOR_DRAWS:
                drawn = uniforms_rows(low, high, self._draw_k, self.seed % 2**64, self._draw_keys, slot[0])
                self._draw_prices(price, drawn, low, high)
            else:
                external = self.external
                for i in self._drawing.tolist():
                    if external[i]:
                        continue  # traded from outside: its trader's orders are never placed
                    own = self._own[i]
                    row = uniforms(low, high, 1 + len(own), self.seed % 2**64, self._keys[i], slot[0])
                    price[i, 0] = inside(row[0], low, high)
                    for src, p in zip(own, row[1:], strict=True):
                        price[i, 1 + self._col[src]] = inside(p, low, high)
        qty[:, 0] = bid
        qty[:, 1 : s + 1] = asks
        qty[:, s + 1] = bess
        qty[~(trades & ~self.external)] = 0
        placed = qty > 0
        member, column = np.nonzero(placed)  # row-major: member order, then the trader's order
        names = [None, *self.sources, BESS]
        self.stats["orders"] += placed.sum(axis=1)
        return OrderBatch(  # a boolean mask gathers in the same row-major order as `nonzero`
            slot=(slot[0], slot[1]),
            member=member,
            bid=column == 0,
            quantity=qty[placed],
            price=price[placed],
            source=[names[j] for j in column.tolist()],
            seq=(np.cumsum(placed, axis=1) - 1)[placed],
        )

    def _draw_prices(self, price: np.ndarray, drawn: np.ndarray, low: float, high: float) -> None:
        """The random traders' prices as `_trade`'s loop draws them, from `drawn` (a row per
        drawing member, in the band: the same floats as `uniforms`), into `price`; members
        traded from outside keep theirs."""
        rows = self._drawing
        drawn = inside_all(drawn, low, high)
        live = ~self.external[rows]
        price[rows[live], 0] = drawn[live, 0]
        at, nth, col = self._draw_own
        keep = live[at]
        price[rows[at[keep]], col[keep]] = drawn[at[keep], nth[keep]]

    def _day_units(self, slot: tuple[int, int]) -> np.ndarray | None:
        """The drawing members' `units_rows` for `slot` (a row each), drawn for the slot's
        whole day block at once (`_day_block`): a price is `low + (high - low) * unit`, so
        the band of each slot applies later. None if the block cannot be drawn at once."""

        def draw(starts: np.ndarray) -> np.ndarray:
            n, per_block = len(self._draw_keys), len(starts)
            keys, at = np.repeat(self._draw_keys, per_block), np.tile(starts, n)
            out: np.ndarray = units_rows(self._draw_k, self.seed % 2**64, keys, at)
            return out.reshape(n, per_block, self._draw_k)

        got = _day_block(self._units, slot, draw)
        if got is None:
            return None
        hit, k = got
        out: np.ndarray = hit[:, k, :]
        return out

    def _band_prices(self, low: float | None, high: float | None) -> tuple[np.ndarray, np.ndarray]:
        """(price of each order column of every member but those that draw theirs, which
        members trade) in the grid band (low, high): a function of the band alone, kept per
        band (a tariff has a few)."""
        hit = self._bands.get((low, high))
        if hit is not None:
            return hit
        n, s = len(self.ids), len(self.sources)
        price = np.zeros((n, s + 2), dtype=np.float64)
        kind = self.kind
        fixed = kind == FIXED
        price[fixed, 0] = inside_all(self._bid_price[fixed], low, high)
        price[fixed, 1 : s + 1] = inside_all(self._ask_price[fixed], low, high)[:, None]
        trades = fixed.copy()
        if low is not None and high is not None and high > low:
            battery = self._battery_kind
            trades |= (kind == RANDOM) | battery
            spread = high - low
            price[battery, 0] = inside_all(np.array([low + 0.7 * spread]), low, high)[0]
            price[battery, 1 : s + 1] = inside_all(np.array([low + 0.35 * spread]), low, high)[0]
            price[battery, s + 1] = inside_all(np.array([low + 0.55 * spread]), low, high)[0]
        if len(self._bands) >= BANDS_KEPT:
            self._bands.clear()
        price.flags.writeable = trades.flags.writeable = False
        hit = self._bands[(low, high)] = (price, trades)
        return hit

    def _battery_orders(
        self,
        battery: np.ndarray,
        bid: np.ndarray,
        asks: np.ndarray,
        bess: np.ndarray,
        slot: tuple[int, int],
        low: float,
        high: float,
        buy_mean: float | None,
        c: _Slot | None,
    ) -> None:
        """`battery_trader`'s quantities for the members with that trader and a battery:
        `bid`, `asks` and `bess` changed in place."""
        m = battery & self.has_battery
        if not m.any():
            return
        soc, cap = self.soc[m], self.capacity[m]
        budget = self.power[m] * (slot[1] - slot[0]) // 3600
        usable = np.maximum(0, soc - self._reserve[m])
        cover = np.minimum(np.minimum(bid[m], usable), budget)
        bid[m] -= cover
        cheap = buy_mean is None or high <= buy_mean
        a = asks[m]
        if cheap:
            hold = np.minimum(np.minimum(a.sum(axis=1), max_input_all(cap, soc, self.efficiency[m])), budget - cover)
        else:
            hold = np.zeros_like(cover)
        left = hold.copy()
        for j in range(a.shape[1]):
            kept = np.minimum(left, a[:, j])
            a[:, j] -= kept
            left -= kept
        asks[m] = a
        offer = np.ones_like(cover, dtype=bool) if not cheap else soc >= self._high[m] * cap
        free = budget - cover - hold
        sold_bess = c.sold[m, -1] if c is not None else 0
        bess[m] = np.where(offer, np.minimum(usable - cover, free) - sold_bess, 0)

    def _forget(self, current: tuple[int, int]) -> None:
        duration = current[1] - current[0]
        horizon = current[0] - KEEP_SLOTS * duration
        starts = self._starts
        while starts and starts[0] < horizon:  # what expires only, not every slot kept
            del self._slots[heapq.heappop(starts)]
        starts = self._price_starts
        while starts and starts[0] < horizon:
            del self._prices[heapq.heappop(starts)]
        for memo in (self._energy, self._forecasts):
            for key in [k for k in memo if k[0] < current[0] - duration]:
                del memo[key]

    # -- settlements and deliveries -------------------------------------------------------

    def on_settled(self, i: int, fill: Settled) -> None:
        """`Prosumer.on_settled_msg` of member `i`."""
        self.on_fill(i, fill.time_delivery[0], fill.commit_id, fill.side, fill.quantity, fill.source)

    def on_settlements(self, settlements: Iterable[Any]) -> None:
        """Every member's `settled` events of the market's settlement records at once (the
        buyer's bid and the seller's ask of each, as the market announces them)."""
        index = self.index
        fills: list[Fill] = []
        for s in settlements:
            b, a = index.get(s.buyer_id), index.get(s.seller_id)
            if b is not None:
                fills.append((b, s.time_delivery_start, s.commit_id, "bid", s.quantity, s.energy_source))
            if a is not None:
                fills.append((a, s.time_delivery_start, s.commit_id, "ask", s.quantity, s.energy_source))
        self.on_fills(fills)

    def on_fills(self, fills: Sequence[Fill]) -> None:
        """`on_fill` of each (member, slot start, commit id, side, quantity, source), in
        order: a round's fills counted as `on_fill` counts them, their Wh added a column
        at a time (integer sums: the same totals), not an array element per fill."""
        if len(fills) < FILLS_AT_ONCE:
            for fill in fills:
                self.on_fill(*fill)
            return
        ids, col, bess = self.ids, self._col, len(self.sources)
        counted: list[int] = []
        # Per slot: (its state, bids' members and Wh, asks' members, columns and Wh, asks
        # of a source no member has: members and Wh).
        slots: dict[int, tuple[_Slot, list[int], list[int], list[int], list[int], list[int], list[int], list[int]]] = {}
        for i, start, commit_id, side, quantity, source in fills:
            at = slots.get(start)
            if at is None:
                at = slots[start] = (self._slot(start), [], [], [], [], [], [], [])
            c = at[0]
            if commit_id is not None:
                key = (commit_id, side, ids[i])
                if key in c.seen:
                    continue
                c.seen.add(key)
            counted.append(i)
            if side == "bid":
                at[1].append(i)
                at[2].append(quantity)
                continue
            src = source or BESS
            j = bess if src == BESS else col.get(src)
            if j is None:
                at[6].append(i)
                at[7].append(quantity)
            else:
                at[3].append(i)
                at[4].append(j)
                at[5].append(quantity)
        st = self.stats
        np.add.at(st["fills"], counted, 1)
        for c, bi, bq, si, sj, sq, oi, oq in slots.values():
            np.add.at(c.bought, bi, bq)
            np.add.at(st["bought_wh"], bi, bq)
            np.add.at(c.sold, (si, sj), sq)
            np.add.at(c.sold_other, oi, oq)
            np.add.at(st["sold_wh"], si + oi, sq + oq)

    def on_fill(self, i: int, start: int, commit_id: str | None, side: str, quantity: int, source: str | None) -> None:
        """Member `i`'s `settled` event, field by field (a repeated one counts once)."""
        c = self._slot(start)
        if commit_id is not None:
            key = (commit_id, side, self.ids[i])
            if key in c.seen:
                return
            c.seen.add(key)
        st = self.stats
        st["fills"][i] += 1
        if side == "bid":
            c.bought[i] += quantity
            st["bought_wh"][i] += quantity
        else:
            src = source or BESS
            j = len(self.sources) if src == BESS else self._col.get(src)
            if j is None:
                c.sold_other[i] += quantity
            else:
                c.sold[i, j] += quantity
            st["sold_wh"][i] += quantity

    def on_delivery(self, i: int, d: Delivery) -> None:
        """`Prosumer.on_delivery_msg` of member `i`."""
        c = self._slot(d.time_delivery[0])
        if c.delivered is None:
            c.delivered = np.zeros(len(self.ids), dtype=bool)
        if c.delivered[i]:
            return
        c.delivered[i] = True
        me, st = self.ids[i], self.stats
        st["delivered"][i] += 1
        for tx in d.transactions:
            if tx.buyer_id == me:
                st["paid"][i] += tx.amount_buy
                if tx.kind in P2P_KINDS:
                    st["p2p_bought_wh"][i] += tx.quantity
                elif tx.kind == "grid_buy":
                    st["grid_bought_wh"][i] += tx.quantity
            if tx.seller_id == me:
                st["received"][i] += tx.amount_sell
                if tx.kind in P2P_KINDS:
                    st["p2p_sold_wh"][i] += tx.quantity
                elif tx.kind == "grid_sell":
                    st["grid_sold_wh"][i] += tx.quantity
        if c.pending is not None:
            st["compared"][i] += 1
            st["grid_only_paid"][i] += c.pending[0][i]
            st["grid_only_received"][i] += c.pending[1][i]

    def on_transactions(self, start: int, rows: Iterable[Any]) -> None:
        """Every member's delivery of slot `start` at once, from the market's transaction
        rows (what each party's `delivery` lists): as `on_delivery` of each party."""
        c = self._slot(start)
        if c.delivered is None:
            c.delivered = np.zeros(len(self.ids), dtype=bool)
        index, done, n = self.index, c.delivered, len(self.ids)
        # Sums per member as Python ints (a row is a Python object anyway), added once per column.
        was = done.tolist()
        paid, received, p2p_bought, p2p_sold, grid_bought, grid_sold = ([0] * n for _ in range(6))
        parties: set[int] = set()
        for tx in rows:
            b, s, kind = index.get(tx.buyer_id), index.get(tx.seller_id), tx.kind
            if b is not None and not was[b]:
                parties.add(b)
                paid[b] += tx.amount_buy
                if kind in P2P_KINDS:
                    p2p_bought[b] += tx.quantity
                elif kind == "grid_buy":
                    grid_bought[b] += tx.quantity
            if s is not None and not was[s]:
                parties.add(s)
                received[s] += tx.amount_sell
                if kind in P2P_KINDS:
                    p2p_sold[s] += tx.quantity
                elif kind == "grid_sell":
                    grid_sold[s] += tx.quantity
        self._delivered(c, parties, (paid, received, p2p_bought, p2p_sold, grid_bought, grid_sold))

    def on_delivery_columns(
        self, start: int, deliveries: Iterable[tuple[int, Sequence[int]]], rows: TransactionColumns
    ) -> None:
        """`on_delivery` of each (member, the indices of its rows in `rows`) of one slot at
        once, from a `/fleet` `delivery.columns` table."""
        c = self._slot(start)
        if c.delivered is None:
            c.delivered = np.zeros(len(self.ids), dtype=bool)
        ids, n = self.ids, len(self.ids)
        was = c.delivered.tolist()
        buyer, seller, kinds, qty, amount_buy, amount_sell = (
            rows.buyer_id,
            rows.seller_id,
            rows.kind,
            rows.quantity,
            rows.amount_buy,
            rows.amount_sell,
        )
        paid, received, p2p_bought, p2p_sold, grid_bought, grid_sold = ([0] * n for _ in range(6))
        parties: set[int] = set()
        for i, picks in deliveries:
            if was[i]:
                continue  # its delivery of this slot was counted (a repeat: once, as on_delivery)
            was[i] = True
            parties.add(i)
            me = ids[i]
            for j in picks:
                kind = kinds[j]
                if buyer[j] == me:
                    paid[i] += amount_buy[j]
                    if kind in P2P_KINDS:
                        p2p_bought[i] += qty[j]
                    elif kind == "grid_buy":
                        grid_bought[i] += qty[j]
                if seller[j] == me:
                    received[i] += amount_sell[j]
                    if kind in P2P_KINDS:
                        p2p_sold[i] += qty[j]
                    elif kind == "grid_sell":
                        grid_sold[i] += qty[j]
        self._delivered(c, parties, (paid, received, p2p_bought, p2p_sold, grid_bought, grid_sold))

    def _delivered(self, c: _Slot, parties: set[int], sums: tuple[list[int], ...]) -> None:
        """Members `parties` took their delivery of slot `c`; `sums`, per member: paid,
        received, P2P bought and sold, grid bought and sold."""
        if not parties:
            return
        st = self.stats
        for name, col in zip(
            ("paid", "received", "p2p_bought_wh", "p2p_sold_wh", "grid_bought_wh", "grid_sold_wh"), sums, strict=True
        ):
            st[name] += np.array(col, dtype=np.int64)
        who = np.fromiter(parties, dtype=np.int64, count=len(parties))
        c.delivered[who] = True  # type: ignore[index]
        st["delivered"][who] += 1
        if c.pending is not None:
            st["compared"][who] += 1
            st["grid_only_paid"][who] += c.pending[0][who]
            st["grid_only_received"][who] += c.pending[1][who]
