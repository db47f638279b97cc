"""The summary of a run, computed from the ledger alone (what a user can check with sqlite3)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import msgspec

from market.core.grid import GridTariff
from market.core.records import GRID_ID, amount


class Bill(msgspec.Struct, frozen=True):
    participant: str
    market: int  # micro-currency paid (positive) or earned (negative) in the market
    grid_only: int  # the same metered energy priced at the grid tariff alone
    p2p_bought: int  # Wh
    p2p_sold: int  # Wh


class Summary(msgspec.Struct, frozen=True):
    rounds: int
    seconds: float
    trades: int
    p2p_wh: int
    imported_wh: int
    load_wh: int
    grid_bought_wh: int
    grid_sold_wh: int
    bills: list[Bill]

    @property
    def rounds_per_second(self) -> float:
        return self.rounds / self.seconds if self.seconds else 0.0

    @property
    def p2p_share(self) -> float:
        """Share of the energy participants imported that came from their neighbours."""
        return self.p2p_wh / self.imported_wh if self.imported_wh else 0.0

    @property
    def self_sufficiency(self) -> float:
        """Share of the community's consumption not bought from the grid."""
        return 1 - self.grid_bought_wh / self.load_wh if self.load_wh else 0.0


# Transaction kinds that are energy from a neighbour: a P2P delivery, or its shortfall
# covered from the seller's battery (PROTOCOL.md, Energy exchange).
P2P_KINDS = ("p2p", "bess_compensation")


class Reading(NamedTuple):
    """The energies of one meter row (Wh), as the summary counts them."""

    imported: int  # consumption.other.external: what the site imported
    load: int  # all of consumption.other: imports and the use of its own generation
    exported: int  # every generation source: what it generated beyond on-site use
    charged: int  # all of consumption.bess: its battery charged from its own generation


_json = msgspec.json.decode  # a long run has a meter row per participant and slot


def metered(generation: str, consumption: str) -> Reading:
    """The `Reading` of one meter row's `generation` and `consumption` JSON."""
    used = _json(consumption)
    other = used.get("other", {})
    return Reading(
        other.get("external", 0),
        sum(other.values()),
        sum(_json(generation).values()),
        sum(used.get("bess", {}).values()),
    )


def grid_only_amount(imported: int, exported: int, buy: float, sell: float) -> int:
    """What one reading would have cost trading with the grid alone (micro-currency)."""
    return amount(imported, buy) - amount(exported, sell)


def summarize(
    transactions: Iterable[Mapping[str, Any]],
    meters: Iterable[Mapping[str, Any]],
    settlements: int,
    tariff: GridTariff,
    rounds: int,
    seconds: float,
) -> Summary:
    paid: dict[str, int] = defaultdict(int)
    bought: dict[str, int] = defaultdict(int)
    sold: dict[str, int] = defaultdict(int)
    p2p = grid_bought = grid_sold = 0
    for t in transactions:
        if t["kind"] == "self":
            continue
        paid[t["buyer_id"]] += t["amount_buy"]
        paid[t["seller_id"]] -= t["amount_sell"]
        if t["kind"] in P2P_KINDS:
            p2p += t["quantity"]
            bought[t["buyer_id"]] += t["quantity"]
            sold[t["seller_id"]] += t["quantity"]
        elif t["kind"] == "grid_buy":
            grid_bought += t["quantity"]
        elif t["kind"] == "grid_sell":
            grid_sold += t["quantity"]
    grid_only: dict[str, int] = defaultdict(int)
    imported = load = 0
    prices: dict[int, tuple[float, float]] = {}  # per slot: every participant's row has the slot's
    for m in meters:
        r = metered(m["generation"], m["consumption"])
        imported += r.imported
        load += r.load
        start = m["time_interval_start"]
        slot_prices = prices.get(start)
        if slot_prices is None:
            slot_prices = prices[start] = tariff.prices(start)
        grid_only[m["participant_id"]] += grid_only_amount(r.imported, r.exported, *slot_prices)
    people = sorted((set(paid) | set(grid_only)) - {GRID_ID})
    bills = [Bill(p, paid.get(p, 0), grid_only.get(p, 0), bought.get(p, 0), sold.get(p, 0)) for p in people]
    return Summary(rounds, seconds, settlements, p2p, imported, load, grid_bought, grid_sold, bills)


def money(micro: int) -> str:
    return f"{micro / 1e6:,.2f}"


def render(s: Summary, ledger: str, max_rows: int = 25) -> str:
    saved = sum(b.grid_only - b.market for b in s.bills)
    out = [
        "",
        f"Simulated {s.rounds} rounds in {s.seconds:.1f} s ({s.rounds_per_second:.1f} rounds/s)",
        f"  trades (fills)          {s.trades}",
        f"  energy traded P2P       {s.p2p_wh / 1000:,.1f} kWh",
        f"  P2P share of imports    {s.p2p_share:.1%}   (energy bought from neighbours / all energy imported)",
        f"  self-sufficiency        {s.self_sufficiency:.1%}   (consumption not bought from the grid)",
        f"  grid: bought {s.grid_bought_wh / 1000:,.1f} kWh, sold {s.grid_sold_wh / 1000:,.1f} kWh",
        f"  community saving        {money(saved)}  vs. everyone trading with the grid alone",
        "",
        f"  {'participant':<12}{'bill':>10}{'grid-only':>11}{'saving':>9}{'P2P in kWh':>12}{'P2P out kWh':>13}",
    ]
    shown = s.bills if len(s.bills) <= max_rows else s.bills[: max_rows - 1]
    for b in shown:
        out.append(
            f"  {b.participant:<12}{money(b.market):>10}{money(b.grid_only):>11}{money(b.grid_only - b.market):>9}"
            f"{b.p2p_bought / 1000:>12.1f}{b.p2p_sold / 1000:>13.1f}"
        )
    if len(shown) < len(s.bills):
        out.append(f"  ... and {len(s.bills) - len(shown)} more participants")
    out += [
        "  (bills in currency units: positive = paid, negative = earned)",
        "",
        f"Ledger: {ledger}",
    ]
    db = ledger.removeprefix("evm+").split("?", 1)[0]
    if db.partition(":")[0].lower() == "memory":
        out.append("  kept in memory: its rows end with this run")
    if db.startswith("sqlite:///"):
        out.append(
            f"  e.g. sqlite3 {db.removeprefix('sqlite:///')} "
            '"select kind, count(*), sum(quantity) from transactions group by kind"'
        )
    return "\n".join(out)
