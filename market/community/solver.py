"""The LEM solver: pure functions from a LEM's parameters and measurements to prices and amounts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import msgspec

from market.community.messages import LemParams
from market.community.state import Measurement
from market.core.protocol import ConsumptionMsg
from market.core.records import (
    MeterRecord,
    Transaction,
)

# -- the solver (pure functions) -------------------------------------------------------------


def lem_prices(params: LemParams, ec_total: float, ep_total: float) -> tuple[float, float]:
    """(p_buy, p_sell) in currency per kWh for community totals in kWh (PROTOCOL.md /grid)."""
    matched = min(ec_total, ep_total)
    if ec_total > 0:
        buy = (ec_total * params.pb_bau - matched * (params.pb_bau - params.pb_p2p)) / ec_total
    else:
        buy = params.pb_bau
    if ep_total > 0:
        sell = (ep_total * params.ps_bau + matched * (params.ps_p2p - params.ps_bau)) / ep_total
    else:
        sell = params.ps_bau
    return buy / 100, sell / 100


def community_flow(ec_total: float, ep_total: float) -> float:
    """The community's net flow as a share of its volume, (Ec - Ep) / (Ec + Ep), in [-1, 1]:
    +1 when it only imports, -1 when it only exports, 0 when balanced (or empty)."""
    volume = ec_total + ep_total
    return (ec_total - ep_total) / volume if volume > 0 else 0.0


def lem_amount(ec: float, ep: float, ec_total: float, ep_total: float, p_buy: float, p_sell: float, beta: float) -> int:
    """Micro-currency a player's balance moves by (energies in kWh, prices per kWh):

        round(1e6 * (ep*p_sell - ec*p_buy - beta * (ec - ep) * (Ec - Ep)/(Ec + Ep)))

    The flow term prices the player's own net flow `ec - ep` at `beta` (currency per kWh)
    times the community's flow share: following the community's net flow costs, countering
    it earns, at most `beta` per kWh of one's own flow, at any size of the community (the
    term that used `Ec - Ep` itself grew with the number of members)."""
    flow = community_flow(ec_total, ep_total)
    return round(1e6 * (ep * p_sell - ec * p_buy - beta * (ec - ep) * flow))


class LemSolution(msgspec.Struct, frozen=True):
    p_buy: float
    p_sell: float
    total_consumption: int  # Wh
    total_production: int  # Wh
    amounts: dict[str, int]  # player -> micro-currency, in player order


def solve_lem(params: LemParams, players: Sequence[str], measures: Mapping[str, Measurement]) -> LemSolution:
    """Prices and every player's amount; a player without a measurement counts as 0, 0."""
    zero = Measurement(0, 0)
    got = [measures.get(p, zero) for p in players]
    total_c = sum(m.consumption for m in got)
    total_p = sum(m.production for m in got)
    ec_total, ep_total = total_c / 1000, total_p / 1000
    p_buy, p_sell = lem_prices(params, ec_total, ep_total)
    amounts = {
        p: lem_amount(m.consumption / 1000, m.production / 1000, ec_total, ep_total, p_buy, p_sell, params.beta)
        for p, m in zip(players, got, strict=True)
    }
    return LemSolution(p_buy, p_sell, total_c, total_p, amounts)


def measurements_from_meters(records: Iterable[MeterRecord], lem_duration: int) -> dict[int, dict[str, Measurement]]:
    """The auction's meter readings as LEM measurements, per LEM slot start and participant.

    Consumption is the energy the site imported (`consumption.other.external`) and
    production the energy it exported (the sum of `generation`): the flows at the grid
    connection that the community nets out; on-site self-consumption (`consumption.bess`,
    `consumption.other[src]`) is neither bought nor sold. Readings of every auction slot
    inside a LEM slot add up; a reading whose slot straddles two LEM slots is ignored."""
    out: dict[int, dict[str, Measurement]] = {}
    for r in records:
        start, end = r.time_interval_start, r.time_interval_end
        lem = start // lem_duration * lem_duration
        if end <= start or end > lem + lem_duration:
            continue
        generation = msgspec.json.decode(r.generation, type=dict[str, int])
        consumption = msgspec.json.decode(r.consumption, type=ConsumptionMsg)
        imported = consumption.other.get("external", 0)
        exported = sum(generation.values())
        slot = out.setdefault(lem, {})
        old = slot.get(r.participant_id, Measurement(0, 0))
        slot[r.participant_id] = Measurement(old.consumption + imported, old.production + exported)
    return out


def auction_money(records: Iterable[Transaction], lem_duration: int) -> dict[int, dict[str, int]]:
    """What the auction's transactions moved for each participant, per LEM slot start, in
    micro-currency (received minus paid: a buyer's is negative). The LEM nets it out of its
    own amount, so a kWh the auction already settled is not paid again (docs/parity.md,
    *Auction and LEM together*). A transaction whose slot straddles two LEM slots is ignored,
    as its readings are by `measurements_from_meters`."""
    out: dict[int, dict[str, int]] = {}
    for t in records:
        start, end = t.time_delivery_start, t.time_delivery_end
        lem = start // lem_duration * lem_duration
        if end <= start or end > lem + lem_duration:
            continue
        slot = out.setdefault(lem, {})
        slot[t.seller_id] = slot.get(t.seller_id, 0) + t.amount_sell
        slot[t.buyer_id] = slot.get(t.buyer_id, 0) - t.amount_buy
    return out
