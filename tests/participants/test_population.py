"""The population (participants/population.py) against one `Prosumer` per spec: the same
payloads in, the same readings, orders, batteries and bills out, round by round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.scenario import community, load_scenario
from market.core.engine import Market
from market.core.protocol import MeterMsg, OrdersMsg, decode
from participants.messages import Delivery, Settled, StartRound, parse
from participants.population import Population, plain
from participants.prosumer import Prosumer
from participants.spec import BatterySpec, ParticipantSpec, PvSpec

SCENARIO = Path(__file__).parents[2] / "scenarios" / "community.toml"


def _erring(spec: ParticipantSpec, error: float) -> ParticipantSpec:
    if spec.pv is None or error == 0:
        return spec
    return msgspec.structs.replace(spec, pv=msgspec.structs.replace(spec.pv, forecast_error=error))


def _in_order(m: MeterMsg) -> list[list[tuple[str, int]]]:
    return [list(d.items()) for d in (m.generation, m.consumption.bess, m.consumption.other)]


def decide_alike(
    k: int, msg: StartRound, prosumers: list[Prosumer], population: Population
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Round `k` of both: every prosumer's reading, orders and battery must be the
    population's. Returns each prosumer's (reading, orders)."""
    meters, batch = population.on_round(msg)
    theirs = batch.orders() if batch is not None else []
    out = []
    every = meters.messages() if meters is not None else []  # built a column at a time: the same maps
    for i, p in enumerate(prosumers):
        meter, orders = p.on_round_msg(msg)
        assert meter is not None and meters is not None and meter == meters.reading(i), (k, p.spec.id)
        one = decode(meters.reading(i), MeterMsg)
        assert every[i] == one and _in_order(every[i]) == _in_order(one), (k, p.spec.id)
        assert orders == [o for m, o in theirs if m == i], (k, p.spec.id)
        assert population.battery(i) == p.battery, (k, p.spec.id)
        out.append((meter, orders))
    return out


def run_side_by_side(specs: list[ParticipantSpec], seed: int, rounds: int, overrides: dict[str, Any]) -> int:
    """Step a market with the prosumers' orders and readings; the population sees the same
    payloads and must produce the same things. Returns the number of orders compared."""
    scenario = load_scenario(SCENARIO, overrides)
    market = Market(scenario.market_config("sim"))
    prosumers = [Prosumer(s, seed, timezone=scenario.timezone) for s in specs]
    population = Population(specs, seed, timezone=scenario.timezone)
    compared = 0
    for k in range(rounds):
        opened = market.open_round(scenario.start_time + k * scenario.step, None)
        for pid, payload in opened.settled:
            i = population.index[pid]
            prosumers[i].on_settled(payload)
            if k % 2:  # the events one by one, or the records at once
                population.on_settled(i, parse(payload, Settled))
        if k % 2 == 0:
            population.on_settlements(opened.settlements)
        msg = parse(opened.start_round, StartRound)
        for p, (meter, orders) in zip(prosumers, decide_alike(k, msg, prosumers, population), strict=True):
            compared += len(orders)
            if orders:
                market.submit_orders(p.spec.id, decode({"orders": orders}, OrdersMsg))
            market.meter(p.spec.id, decode(meter, MeterMsg))
        t = opened.times.time
        result = market.process(t, t)
        for pid, payload in result.deliveries.items():
            if pid not in population.index:  # the grid
                continue
            i = population.index[pid]
            prosumers[i].on_delivery(payload)
            population.on_delivery(i, parse(payload, Delivery))
    for i, p in enumerate(prosumers):
        assert population.stats_of(i) == p.stats, p.spec.id
    return compared


def test_a_day_of_the_community_is_the_same_as_one_prosumer_each() -> None:
    """60 synthetic prosumers (fixed-price, random-price and battery traders, batteries
    steered by their fills) for a whole day."""
    scenario = load_scenario(SCENARIO)
    specs = community(scenario, 60)
    assert all(plain(s) for s in specs)
    assert run_side_by_side(specs, scenario.seed, 96, {}) > 500


def test_random_traders_drawn_as_arrays_are_the_same_as_one_prosumer_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slots that tile a day draw a day of prices at once (`_day_units`, the default path of
    the tests above). Without it a population this small draws one member at a time; with
    the threshold at 1 it takes the per-round array path (`uniforms_rows`) of a big one:
    the same orders, fills and bills."""
    from participants import population

    monkeypatch.setattr(population.Population, "_day_units", lambda self, slot: None)
    monkeypatch.setattr(population, "VECTOR_DRAWS", 1)
    scenario = load_scenario(SCENARIO)
    specs = community(scenario, 60)
    assert sum(type(s.trader).__struct_config__.tag == "random_price" for s in specs) >= 5
    assert run_side_by_side(specs, scenario.seed, 48, {}) > 100


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 40),
    error=st.sampled_from([0.0, 0.3]),
    start=st.integers(0, 3 * 96),
    pricing=st.sampled_from(["midpoint", "uniform"]),
)
def test_any_community_and_seed_gives_the_same_decisions(
    seed: int, n: int, error: float, start: int, pricing: str
) -> None:
    scenario = load_scenario(SCENARIO, {"seed": seed, "market.pricing": pricing})
    specs = [_erring(s, error) for s in community(scenario, n)]
    # A battery without PV and one that starts full: the corners of the battery trader.
    specs.append(ParticipantSpec(id="BAT", battery=BatterySpec(capacity_wh=9000, power_w=4000, soc=1.0)))
    specs.append(
        ParticipantSpec(
            id="PVB", pv=PvSpec(kw=9.0), battery=BatterySpec(capacity_wh=3000, power_w=6000, efficiency=0.9)
        )
    )
    overrides: dict[str, Any] = {"seed": seed, "market.pricing": pricing}
    overrides["start"] = scenario.start_time + start * scenario.step
    run_side_by_side(specs, seed, 40, overrides)


def test_only_plain_specs_join() -> None:
    from participants.spec import PemSpec

    pem = ParticipantSpec(id="P", pem=PemSpec(houses=3))
    assert not plain(pem)
    with pytest.raises(ValueError, match="not plain"):
        Population([pem])


def test_members_whose_profiles_are_files_or_weather_are_read_slot_by_slot(tmp_path: Path) -> None:
    """A CSV load (its generation attributed to `wind`) and a PV array following the weather
    file: no day block, the same values slot by slot beside synthetic members."""
    from participants.spec import CsvLoad, FixedPriceTrader, SyntheticLoad

    scenario = load_scenario(SCENARIO)
    t0 = scenario.start_time
    rows = ["time,consumption,generation", *(f"{t0 + 3600 * h},{300 + 40 * h},{(h * 37) % 500}" for h in range(49))]
    (tmp_path / "site.csv").write_text("\n".join(rows) + "\n")
    fixed = FixedPriceTrader()
    csv = CsvLoad(path=str(tmp_path / "site.csv"), source="wind")
    specs = [
        ParticipantSpec(id="CSV", load=csv, trader=fixed),
        ParticipantSpec(id="WPV", load=SyntheticLoad(), pv=PvSpec(kw=6.0, weather="greensboro"), trader=fixed),
        *community(scenario, 8),
    ]
    population = Population(specs, scenario.seed, timezone=scenario.timezone)
    slot = (t0 + 36 * scenario.step, t0 + 37 * scenario.step)
    assert population.profiles[0].day(slot[0], scenario.step) is None
    assert population.profiles[1].day(slot[0], scenario.step) is None
    assert population.profiles[2].day(slot[0], scenario.step) is not None
    assert run_side_by_side(specs, scenario.seed, 60, {}) > 50


def twelve() -> tuple[Any, list[Prosumer], Population, Market]:
    """The community of 12 as a prosumer each and as one population, and a market."""
    scenario = load_scenario(SCENARIO)
    specs = community(scenario, 12)
    prosumers = [Prosumer(s, scenario.seed, timezone=scenario.timezone) for s in specs]
    return (
        scenario,
        prosumers,
        Population(specs, scenario.seed, timezone=scenario.timezone),
        Market(scenario.market_config("sim")),
    )


def test_odd_fills_are_taken_as_a_prosumer_takes_them() -> None:
    """A server's fills the traders never asked for: a source nobody has (only ever short),
    a resent fill (counted once), a fill without a commit id (counted each time), a `bess`
    sale without a battery: the readings that follow are a prosumer's."""
    scenario, prosumers, population, market = twelve()
    d = scenario.step
    for k in range(30):
        t = scenario.start_time + k * d
        opened = market.open_round(t, None)
        slot = [t + 2 * d, t + 3 * d]
        odd = [
            {"side": "ask", "quantity": 400, "price": 0.1, "time_delivery": slot, "commit_id": "x1", "source": "gas"},
            {"side": "ask", "quantity": 400, "price": 0.1, "time_delivery": slot, "commit_id": "x1", "source": "gas"},
            {"side": "bid", "quantity": 250, "price": 0.2, "time_delivery": slot},
            {"side": "bid", "quantity": 250, "price": 0.2, "time_delivery": slot},
            {"side": "ask", "quantity": 900, "price": 0.1, "time_delivery": slot, "commit_id": "x2", "source": "bess"},
            {"side": "ask", "quantity": 300, "price": 0.1, "time_delivery": slot, "commit_id": "x3", "source": "solar"},
        ]
        for i, p in enumerate(prosumers):
            for fill in odd[(i + k) % 3 :]:
                p.on_settled(fill)
                population.on_settled(i, parse(fill, Settled))
        decide_alike(k, parse(opened.start_round, StartRound), prosumers, population)
        market.process(t, t)
    for i, p in enumerate(prosumers):
        assert population.stats_of(i) == p.stats
        assert population.battery(i) == p.battery


def test_fills_added_up_at_once_are_counted_as_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Population.on_fills` (a round's fills, their Wh added a column at a time) takes the
    odd fills above, every member's in one batch, as each prosumer takes its own one by
    one: a resent fill once, a fill without a commit id each time, a source nobody has, a
    `bess` sale without a battery, fills of two slots in one batch."""
    import participants.population as pop_module

    monkeypatch.setattr(pop_module, "FILLS_AT_ONCE", 1)
    scenario, prosumers, population, market = twelve()
    d = scenario.step
    for k in range(30):
        t = scenario.start_time + k * d
        opened = market.open_round(t, None)
        batch = []
        for i, p in enumerate(prosumers):
            for n, slot in enumerate(([t + 2 * d, t + 3 * d], [t + 3 * d, t + 4 * d])):

                def fill(side: str, q: int, cid: str | None = None, src: str | None = None) -> dict[str, Any]:
                    out = {"side": side, "quantity": q, "price": 0.1, "time_delivery": slot}  # noqa: B023
                    return out | ({"commit_id": cid} if cid else {}) | ({"source": src} if src else {})

                odd = [
                    fill("ask", 400, "x1", "gas"),
                    fill("ask", 400, "x1", "gas"),
                    fill("bid", 250 + n),
                    fill("bid", 250, f"b{k}"),
                    fill("ask", 900, "x2", "bess"),
                    fill("ask", 300, "x3", "solar"),
                ]
                for event in odd[(i + k) % 3 :]:
                    p.on_settled(event)
                    s = parse(event, Settled)
                    batch.append((i, s.time_delivery[0], s.commit_id, s.side, s.quantity, s.source))
        batch.reverse()  # members and slots interleaved otherwise than the prosumers saw them
        population.on_fills(batch)
        decide_alike(k, parse(opened.start_round, StartRound), prosumers, population)
        market.process(t, t)
    for i, p in enumerate(prosumers):
        assert population.stats_of(i) == p.stats
        assert population.battery(i) == p.battery


@pytest.mark.parametrize("per_slot", [False, True])
def test_forecasts_drawn_a_day_block_at_once_are_each_prosumers(
    per_slot: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Population.forecast` draws the erring members' forecasts a day block at once
    (`_forecast_z`), or slot by slot where it cannot: slots that do not tile a day, a day
    block past the 32-bit words the seeding takes in arrays. `per_slot`: more erring pairs
    than a day block may draw, each slot's drawn together. The same Wh as each
    `Prosumer.forecast`, in every case; a second population finds the shared blocks."""
    from participants import population as pop_module

    if per_slot:
        monkeypatch.setattr(pop_module, "Z_BLOCK_DRAWS", 0)
        monkeypatch.setattr(pop_module, "SEED_TOGETHER", 2)
        drawn: list[int] = []
        normals = pop_module.forecast_normals
        monkeypatch.setattr(pop_module, "forecast_normals", lambda *a: drawn.append(len(a[1])) or normals(*a))
    scenario = load_scenario(SCENARIO)
    specs = [_erring(s, 0.3) for s in community(scenario, 12)]
    t0 = scenario.start_time
    prosumers = [Prosumer(s, 5, timezone=scenario.timezone) for s in specs]
    blocks: list[Any] = []
    for _ in range(2):  # a new population, then one that finds the first one's blocks
        population = Population(specs, 5, timezone=scenario.timezone)
        erred = 0
        for first, d in ((t0, 900), (t0 + 450, 700), (2**32 - 2 * 3600, 900)):
            for k in range(0, 96, 3):
                slot = (first + k * d, first + (k + 1) * d)
                gen, _ = population.forecast(slot)
                truth, _ = population.energy(slot)
                for i, p in enumerate(prosumers):
                    theirs, _ = p.forecast(slot)
                    assert gen[i].tolist() == [theirs.get(src, 0) for src in population.sources], (slot, i)
                erred += int((gen != truth).sum())
        assert erred > 30
        if per_slot:
            assert not population._zs and drawn and max(drawn) < 96  # a slot's pairs, never a day's
            continue
        assert len(population._zs) == 1  # the one day block of 900 s slots below 2**32
        blocks.append(next(iter(population._zs.values())))
    assert per_slot or (blocks[1] is blocks[0] and any(b is blocks[0] for b in pop_module._SHARED_Z.values()))


def test_the_shared_forecast_draws_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_SHARED_Z` keeps at most `_SHARED_Z_CELLS` draws: the oldest blocks go first, and a
    block bigger than the bound is not kept."""
    import numpy as np

    from participants import population as pop_module

    monkeypatch.setattr(pop_module, "_SHARED_Z", {})
    monkeypatch.setattr(pop_module, "_SHARED_Z_CELLS", 500)
    for k in range(5):
        pop_module._share_z(("k", k), np.zeros((2, 96)))
    assert list(pop_module._SHARED_Z) == [("k", 3), ("k", 4)]
    pop_module._share_z(("big",), np.zeros((6, 96)))
    assert ("big",) not in pop_module._SHARED_Z
    assert sum(b.size for b in pop_module._SHARED_Z.values()) <= 500


def test_a_community_after_2106_decides_as_one_prosumer_each() -> None:
    """Slot starts past 2**32 s (2106-02-07) do not fit the 32-bit words that seeding in
    arrays takes: the day blocks of random prices and forecasts are drawn the other way
    there, with the same orders, readings and bills as one prosumer each."""
    scenario = load_scenario(SCENARIO)
    specs = [_erring(s, 0.3) for s in community(scenario, 24)]
    assert run_side_by_side(specs, scenario.seed, 12, {"start": 2**32 + 3 * 86400 + 36000}) > 20
