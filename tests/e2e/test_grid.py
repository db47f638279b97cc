"""The Parity market over real socket.io (namespace /grid, seed 000): the DSO's grid state in
the auction, aggregator LEMs, community pricing, token settlement on the ledger, SLA/KPIs.

Times: T is 12:00 UTC. The market clock is the controller's `step` (sim mode), so "12:15"
in the seed's sequence is a `step` to 12:15; actions "before the slot starts" happen a
minute before it. Every expected balance is computed by hand in the comments.

The periodic solver follows `step`: the server calls `GridNamespace.on_time(t)` after each
step to `t`, before it replies (`SimServer` below makes that call; calling it twice is
harmless, so it also works with a server that makes it itself).

Replies and /grid ledger rows name participants by pseudonym (docs/parity.md, *Pseudonyms*):
the server's key is `pseudonym.key` beside the ledger, and `pseudonyms(ledger_url)` gives
the tests the same names (`ps("P1")`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import socketio

from controller.sim import market_process
from ledger import ledger_digest, open_sink
from ledger.digest import read_rows
from market.community.messages import ParityConfig, PseudonymConfig
from market.community.namespace import NAMESPACE, GridNamespace
from market.community.parity import PARITY_RECORDS
from market.community.pseudonyms import create_key, hmac_pseudonym, read_key
from market.core.engine import MarketConfig
from market.core.registry import Registry
from market.server.app import MarketServer
from tests.e2e.conftest import refusal, serving

CONFIG = MarketConfig(duration=60, close_steps=2, round_timeout=2.0)
T = 1_699_963_200  # 2023-11-14 12:00 UTC
Q = 900  # a LEM slot
H = 3600
TOKENS = {p: f"tok-{p.lower()}" for p in ("DSO", "AGG", "OP", "ORA", "P1", "P2", "P3", "P4", "CTL")}
ROLE_OF = {"DSO": "dso", "AGG": "aggregator", "OP": "operator", "ORA": "oracle", "CTL": "controller"}
ZERO = {"generation": {}, "consumption": {"bess": {}, "other": {"external": 0}}}


def registry() -> Registry:
    return Registry.from_dict(
        {"participants": [{"id": p, "token": t, "role": ROLE_OF.get(p, "prosumer")} for p, t in TOKENS.items()]}
    )


class SimServer(MarketServer):
    """The market server, telling /grid of each new market time after a `step`."""

    async def step(self, t: int, duration: int | None) -> dict[str, Any]:
        reply = await super().step(t, duration)
        await self.grid.on_time(t)
        return reply


def key_path(ledger_url: str) -> Path:
    """The pseudonym key of a test's server: beside its SQLite ledger."""
    return Path(ledger_url.removeprefix("sqlite:///")).with_name("pseudonym.key")


def pseudonyms(ledger_url: str) -> Callable[[str], str]:
    """registry id -> the pseudonym the test's server gives it (the key is made if need be)."""
    path = key_path(ledger_url)
    key = read_key(path) if path.exists() else create_key(path)
    return lambda pid: hmac_pseudonym(key, pid)


def renamed(ps: Callable[[str], str], balances: dict[str, Any]) -> dict[str, Any]:
    return {ps(p): v for p, v in balances.items()}


@asynccontextmanager
async def running(
    ledger_url: str, config: MarketConfig = CONFIG, parity: ParityConfig | None = None
) -> AsyncIterator[tuple[str, GridNamespace]]:
    server = SimServer(config, registry(), open_sink(ledger_url))
    keyed = PseudonymConfig(key_file=str(key_path(ledger_url)))
    server.grid.configure(msgspec.structs.replace(parity or ParityConfig(), pseudonyms=keyed))
    async with serving(server) as url:
        yield url, server.grid


async def connect(url: str, pid: str, *namespaces: str) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(
        url,
        namespaces=list(namespaces or (NAMESPACE,)),
        auth={"id": pid, "token": TOKENS[pid]},
        transports=["websocket"],
        wait_timeout=5,
    )
    return sio


async def call(sio: socketio.AsyncClient, event: str, payload: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = await sio.call(
        event, payload if payload is not None else {}, namespace=NAMESPACE, timeout=10
    )
    return reply


async def ok(sio: socketio.AsyncClient, event: str, payload: Any = None) -> dict[str, Any]:
    reply = await call(sio, event, payload)
    assert reply["ok"] is True, (event, payload, reply)
    return reply


async def refused(sio: socketio.AsyncClient, event: str, payload: Any, code: str) -> None:
    reply = await call(sio, event, payload)
    assert reply["ok"] is False and reply["error"]["code"] == code, (event, payload, reply)


async def step(ctl: socketio.AsyncClient, t: int) -> dict[str, Any]:
    reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=10)
    assert reply["ok"], reply
    round_: dict[str, Any] = reply["round"]
    return round_


def meters_and_rounds(sio: socketio.AsyncClient, readings: dict[int, dict[str, Any]], seen: list[Any]) -> None:
    """On every start_round: keep it, and send this prosumer's reading of the current round."""

    async def on_start_round(msg: dict[str, Any]) -> None:
        seen.append(msg)
        start = msg["current_round"][0]
        reply = await sio.call(
            "meter", {"time_interval": msg["current_round"], **readings.get(start, ZERO)}, namespace="/market"
        )
        assert reply["ok"], reply

    sio.on("start_round", on_start_round, namespace="/market")


def lem(start: int, players: list[str], params: dict[str, float] | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"time_delivery": [start, start + Q], "players": players}
    if params is not None:
        payload["params"] = params
    return payload


def used(start: int, consumption: int, production: int) -> dict[str, Any]:
    return {"time_delivery": [start, start + Q], "consumption": consumption, "production": production}


async def test_red_slot_clears_no_p2p_trade_and_meters_count_for_the_lem(ledger_url: str) -> None:
    """RED LEM [12:00, 12:15], GREEN LEM [12:15, 12:30]; P1 sells P2 1 kWh in both."""
    red, green = T, T + Q
    ps = pseudonyms(ledger_url)
    async with running(ledger_url) as (url, _ns):
        ctl = await connect(url, "CTL", "/simulation")
        dso, agg = await connect(url, "DSO"), await connect(url, "AGG")
        p1, p2 = await connect(url, "P1", "/market", NAMESPACE), await connect(url, "P2", "/market", NAMESPACE)
        rounds: list[Any] = []
        # The one delivered slot of the GREEN LEM that trades: P1 exports 1 kWh, P2 imports it.
        meters_and_rounds(p1, {green: {"generation": {"solar": 1000}}}, rounds)
        meters_and_rounds(p2, {green: {"consumption": {"other": {"external": 1000}}}}, [])

        await step(ctl, T - 120)  # 11:58: next_settle is [12:00, 12:01]
        assert (await ok(dso, "grid_state.set", {"time_delivery": [red, red + Q], "state": "RED"}))["grid_state"] == {
            "time_delivery": [red, red + Q],
            "state": "RED",
        }
        await ok(dso, "grid_state.set", {"time_delivery": [green, green + Q], "state": "GREEN"})
        got = await ok(agg, "lem.set", lem(red, ["P1", "P2"]))
        assert got["lem"] == {
            "time_delivery": [red, red + Q],
            "aggregator": ps("AGG"),
            "players": [ps("P1"), ps("P2")],
            "params": None,
        }
        await ok(agg, "lem.set", lem(green, ["P1", "P2"]))
        for slot in (red, green):  # the same trade offered in a RED and in a GREEN auction slot
            ask = {"quantity": 1000, "price": 0.05, "time_delivery": [slot, slot + 60], "source": "solar"}
            bid = {"quantity": 1000, "price": 0.20, "time_delivery": [slot, slot + 60]}
            assert (await p1.call("ask", ask, namespace="/market"))["ok"]
            assert (await p2.call("bid", bid, namespace="/market"))["ok"]

        assert (await step(ctl, red - 60))["trades"] == 0  # [12:00, 12:01] cleared: RED, no P2P fill
        info = {tuple(i["time_delivery"]): i["grid_state"] for i in rounds[-1]["market_info"]}
        assert info[(red, red + 60)] == "RED"  # the DSO's state reaches participants
        await step(ctl, green - 120)  # a jump: its reply counts the fills of the first slot it processes
        assert (await step(ctl, green - 60))["trades"] == 1  # [12:15, 12:16] cleared: GREEN trades
        assert {tuple(i["time_delivery"]): i["grid_state"] for i in rounds[-1]["market_info"]}[
            (green, green + 60)
        ] == "GREEN"
        assert (await step(ctl, green))["metered"] == 2  # delivered: P1's and P2's readings

        # The RED LEM was measured by its prosumers; the GREEN one only by the meters.
        await step(ctl, green + Q)  # 12:30: both LEMs have ended
        await ok(p1, "lem.measure", used(red, 0, 500))
        await ok(p2, "lem.measure", used(red, 500, 0))
        solved = await ok(agg, "lem.solve", {"start": T, "end": T + H})
        # RED: skipped. GREEN, from the meters: Ec = Ep = 1 kWh: p_buy = (20 - 6)/1 = 14 c,
        # p_sell = (6.5 + 1.5)/1 = 8 c: P1 +0.08, P2 -0.14, the aggregator keeps 0.06. The
        # auction already paid P1 0.125 for that kWh (P2 paid it): tokens move only the rest
        # of the LEM's price, -0.045 and -0.015, so neither pays the kWh twice.
        assert [(x["grid_state"], x["skipped"], x["balances"]) for x in solved["lems"]] == [
            ("RED", True, {ps("P1"): 0, ps("P2"): 0}),
            ("GREEN", False, {ps("P1"): -45_000, ps("P2"): -15_000}),
        ]
        assert solved["balances"] == {ps("P1"): -45_000, ps("P2"): -15_000}
        assert sorted((t["from"], t["to"], t["amount"]) for t in solved["transfers"]) == sorted(
            [(ps("P1"), ps("AGG"), 45_000), (ps("P2"), ps("AGG"), 15_000)]
        )
        assert (await ok(agg, "tokens.balances"))["balances"] == renamed(
            ps, {"AGG": 60_000, "P1": -45_000, "P2": -15_000}
        )
        assert (await ok(p1, "tokens.balances"))["balances"] == {ps("P1"): -45_000}  # its own only
        assert (await ok(dso, "tokens.balances"))["balances"] == {ps("DSO"): 0}
        assert (await ok(agg, "lem.solve", {"start": T, "end": T + H}))["transfers"] == []  # solved once
        await refused(p1, "lem.measure", used(green, 0, 1), "closed")
        for c in (ctl, dso, agg, p1, p2):
            await c.disconnect()

    settlements = read_rows(ledger_url, "settlements")
    assert [(s["time_delivery_start"], s["seller_id"], s["buyer_id"], s["quantity"]) for s in settlements] == [
        (green, "P1", "P2", 1000)
    ]
    p2p = [r for r in read_rows(ledger_url, "transactions") if r["kind"] == "p2p"]
    assert [(r["time_delivery_start"], r["quantity"]) for r in p2p] == [(green, 1000)]
    transfers = read_rows(ledger_url, "token_transfers")
    agg, p1, p2 = ps("AGG"), ps("P1"), ps("P2")
    assert sorted((r["id"], r["payer_id"], r["payee_id"], r["amount"]) for r in transfers) == sorted(
        [
            (f"t/s{red}-{green + Q}/{p1}/{agg}", p1, agg, 45_000),
            (f"t/s{red}-{green + Q}/{p2}/{agg}", p2, agg, 15_000),
        ]
    )
    # Auction money plus tokens is the LEM's price of each player's energy, paid once.
    money = {"P1": 0, "P2": 0}
    for r in read_rows(ledger_url, "transactions"):
        if r["time_delivery_start"] >= green and r["time_delivery_end"] <= green + Q:
            money[r["seller_id"]] = money.get(r["seller_id"], 0) + r["amount_sell"]
            money[r["buyer_id"]] = money.get(r["buyer_id"], 0) - r["amount_buy"]
    assert (money["P1"], money["P2"]) == (125_000, -125_000)
    results = {(r["time_delivery_start"], r["participant_id"]): r for r in read_rows(ledger_url, "lem_results")}
    assert results[(green, p1)]["measured"] == "meter" and results[(green, p1)]["production"] == 1000
    assert results[(green, p2)]["measured"] == "meter" and results[(green, p2)]["consumption"] == 1000
    assert {p: results[(green, p)]["auction"] + results[(green, p)]["amount"] for p in (p1, p2)} == {
        p1: 80_000,
        p2: -140_000,
    }
    assert results[(red, p1)]["auction"] == 0 == results[(red, p1)]["amount"]  # RED: nothing traded, nothing moved
    assert results[(red, p1)]["measured"] == "prosumer" and results[(red, p1)]["skipped"]
    assert [r["state"] for r in read_rows(ledger_url, "grid_states")] == ["RED", "GREEN"]


# The seed's LEM example: grid states, players, energies (Wh) and own parameters per LEM.
OVERRIDE = {"pbBAU": 25.0, "psBAU": 5.0, "pbP2P": 15.0, "psP2P": 10.0, "beta": 0.0}
SEED_LEMS: list[tuple[int, str, dict[str, tuple[int, int]], dict[str, float] | None]] = [
    # L1 GREEN, P1 and P4. Ec = 2, Ep = 3, matched 2: p_buy = (40 - 2*6)/2 = 14 c,
    # p_sell = (3*6.5 + 2*1.5)/3 = 7.5 c. P1 -2*0.14 = -0.28; P4 3*0.075 = +0.225.
    (T, "GREEN", {"P1": (2000, 0), "P4": (0, 3000)}, None),
    # L2 YELLOW, P1, P2, P4. Ec = 2, Ep = 1, matched 1: p_buy = (48 - 10)/2 = 19 c, p_sell =
    # (6.3 + 1.7)/1 = 8 c; the community's flow (Ec - Ep)/(Ec + Ep) = 1/3. P1, P2: -0.19 -
    # 0.025*1*(1/3) = -0.198333; P4: 0.08 + 0.025*1*(1/3) = +0.088333 (micro-units rounded).
    (T + Q, "YELLOW", {"P1": (1000, 0), "P2": (1000, 0), "P4": (0, 1000)}, None),
    # L3 RED, P2, P3, P4: business as usual, nothing moves.
    (T + 2 * Q, "RED", {"P2": (500, 0), "P3": (0, 500), "P4": (100, 0)}, None),
    # L4 GREEN with the aggregator's own parameters, P1-P4 (P4 saves nothing: 0, 0).
    # Ec = 2, Ep = 2: p_buy = (50 - 2*10)/2 = 15 c, p_sell = (10 + 2*5)/2 = 10 c.
    # P1, P3: -0.15; P2: 2*0.10 = +0.20; P4: 0.
    (T + 3 * Q, "GREEN", {"P1": (1000, 0), "P2": (0, 2000), "P3": (1000, 0), "P4": (-1, -1)}, OVERRIDE),
]
# Totals: P1 -0.28 - 0.198333 - 0.15 = -0.628333; P2 -0.198333 + 0.20 = +0.001667; P3 -0.15;
# P4 0.225 + 0.088333 = +0.313333; the aggregator keeps 0.628333 - 0.001667 + 0.15 - 0.313333 = 0.463333.
LEM_BALANCES = {"AGG": 463_333, "P1": -628_333, "P2": 1_667, "P3": -150_000, "P4": 313_333}
# The seed's SLA example, 12:00-14:00, KPIs at 1-hour resolution.
SEED_SLA: dict[str, Any] = {
    "id": "SLA_12_14",
    "start": T,
    "end": T + 2 * H,
    "kpis": [
        {
            "id": "KPI1",
            "signal": "peak_kw",
            "rule": "gt",
            "limit": 10,
            "penalty": 100_000,
            "players": ["P1", "P2"],
            "resolution": H,
        },
        {
            "id": "KPI2",
            "signal": "power_factor",
            "rule": "lt",
            "limit": 0.5,
            "penalty": 50_000,
            "players": ["P3", "P4"],
            "resolution": H,
        },
    ],
}
KPI_VALUES = {  # (player, kpi) -> values of 12:00-13:00 and 13:00-14:00
    ("P1", "KPI1"): (12.0, 8.0),  # 12 > 10 breaks
    ("P2", "KPI1"): (9.0, 10.0),  # 10 > 10 is false: keeps
    ("P3", "KPI2"): (0.4, 0.45),  # both < 0.5: break
    ("P4", "KPI2"): (0.9, 0.6),
}
PENALTIES = [
    {"player": "P1", "kpi": "KPI1", "time_interval": [T, T + H], "amount": 100_000},
    {"player": "P3", "kpi": "KPI2", "time_interval": [T, T + H], "amount": 50_000},
    {"player": "P3", "kpi": "KPI2", "time_interval": [T + H, T + 2 * H], "amount": 50_000},
]
FINAL = {"AGG": 663_333, "P1": -728_333, "P2": 1_667, "P3": -250_000, "P4": 313_333}


async def test_seed_lem_and_sla_sequences(ledger_url: str) -> None:
    ps = pseudonyms(ledger_url)
    async with running(ledger_url) as (url, ns):
        ctl = await connect(url, "CTL", "/simulation")
        dso, agg, op = await connect(url, "DSO"), await connect(url, "AGG"), await connect(url, "OP")
        pr = {p: await connect(url, p) for p in ("P1", "P2", "P3", "P4")}
        # The operator sets the seed's default parameters (what `microte init` would do).
        for state, (pb, psb, pbp, psp, beta) in {
            "GREEN": (20, 6.5, 14, 8, 0),
            "YELLOW": (24, 6.3, 14, 8, 0.025),
        }.items():
            defaults = {"pbBAU": pb, "psBAU": psb, "pbP2P": pbp, "psP2P": psp, "beta": beta}
            await ok(op, "lem.defaults.set", {"grid_state": state, **defaults})

        previous: int | None = None
        for start, state, energies, params in SEED_LEMS:
            await step(ctl, start - 60)  # just before the slot: its grid state and its LEM
            if previous is None:
                await ok(agg, "sla.set", SEED_SLA)  # 12:00: the SLA and its KPIs for [12:00, 14:00]
            await ok(dso, "grid_state.set", {"time_delivery": [start, start + Q], "state": state})
            await ok(agg, "lem.set", lem(start, list(energies), params))
            if previous is not None:
                await step(ctl, start)  # the previous LEM has ended: its players save their data
                await save(pr, SEED_LEMS, previous)
            previous = start
        await step(ctl, T + H)  # 13:00: the last LEM's data, and the KPIs of the first hour
        assert previous is not None
        await save(pr, SEED_LEMS, previous)
        for (p, k), values in KPI_VALUES.items():
            await ok(
                pr[p], "kpi.measure", {"sla": SEED_SLA["id"], "kpi": k, "time_interval": [T, T + H], "value": values[0]}
            )
        assert (await ok(agg, "tokens.balances"))["balances"] == {}  # nothing solved at 13:00

        await step(ctl, T + H + 60)  # 13:01: the hourly solver solves the four LEMs, before the reply
        assert (await ok(agg, "tokens.balances"))["balances"] == renamed(ps, LEM_BALANCES)
        assert ns.solved_at_boundary == {T + H: (T, T + Q, T + 2 * Q, T + 3 * Q)}
        for p in ("P1", "P2", "P3", "P4"):
            assert (await ok(pr[p], "tokens.balances"))["balances"] == {ps(p): LEM_BALANCES[p]}
        assert (await ok(op, "lem.solve", {"start": T, "end": T + H}))["lems"] == []  # nothing left

        await step(ctl, T + 2 * H)  # 14:00: the KPIs of the second hour
        for (p, k), values in KPI_VALUES.items():
            interval = [T + H, T + 2 * H]
            await ok(
                pr[p], "kpi.measure", {"sla": SEED_SLA["id"], "kpi": k, "time_interval": interval, "value": values[1]}
            )
        await step(ctl, T + 3 * H)  # 15:00: the SLA is checked and its penalties applied
        penalties = [{**x, "player": ps(x["player"])} for x in PENALTIES]
        assert (await ok(agg, "sla.solve", {"sla": SEED_SLA["id"]}))["penalties"] == penalties
        again = await ok(op, "sla.solve", {"sla": SEED_SLA["id"]})
        assert again["penalties"] == penalties and again["duplicate"] is True  # applied once
        assert (await ok(op, "tokens.balances"))["balances"] == renamed(ps, FINAL)
        assert sum(FINAL.values()) == 0
        snapshot = ns.core.snapshot()
        for c in (ctl, dso, agg, op, *pr.values()):
            await c.disconnect()

    transfers = read_rows(ledger_url, "token_transfers")
    solve = f"s{T}-{T + H}"
    agg_, p1, p2, p3, p4 = (ps(p) for p in ("AGG", "P1", "P2", "P3", "P4"))
    assert sorted((r["id"], r["amount"]) for r in transfers if r["kind"] == "lem") == sorted(
        [
            (f"t/{solve}/{agg_}/{p4}", 313_333),
            (f"t/{solve}/{p1}/{agg_}", 628_333),
            (f"t/{solve}/{agg_}/{p2}", 1_667),  # P2 earns a little now: it sold 2 kWh in L4
            (f"t/{solve}/{p3}/{agg_}", 150_000),
        ]
    )
    assert sorted(r["id"] for r in transfers if r["kind"] == "sla_penalty") == sorted(
        [f"p/SLA_12_14/KPI1/{p1}/{T}", f"p/SLA_12_14/KPI2/{p3}/{T}", f"p/SLA_12_14/KPI2/{p3}/{T + H}"]
    )
    assert len(read_rows(ledger_url, "lem_measures")) == 11 and len(read_rows(ledger_url, "kpi_values")) == 8

    # A restarted server resumes /grid from the ledger: same state, and nothing applies twice.
    async with running(ledger_url) as (url, ns):
        assert ns.core.snapshot() == snapshot
        agg = await connect(url, "AGG")
        assert (await ok(agg, "sla.solve", {"sla": SEED_SLA["id"]}))["duplicate"] is True
        assert (await ok(agg, "tokens.balances"))["balances"] == renamed(ps, FINAL)
        await agg.disconnect()


async def save(pr: dict[str, socketio.AsyncClient], lems: list[Any], start: int) -> None:
    """Each player of the LEM starting at `start` saves its consumption and production."""
    energies = next(e for s, _, e, _ in lems if s == start)
    for p, (c, e) in energies.items():
        if c >= 0:  # (-1, -1): this player saves nothing
            await ok(pr[p], "lem.measure", used(start, c, e))


# -- roles and refusals ----------------------------------------------------------------------

ALLOWED: dict[str, set[str]] = {
    "grid_state.set": {"DSO"},
    "lem.defaults.set": {"OP"},
    "lem.set": {"AGG"},
    "lem.measure": {"P1"},
    "lem.solve": {"AGG", "OP"},
    "tokens.balances": {"DSO", "AGG", "OP", "ORA", "P1"},
    "sla.set": {"AGG"},
    "kpi.measure": {"ORA", "P1"},
    "sla.solve": {"AGG", "OP"},
}
PAYLOADS: dict[str, Any] = {
    "grid_state.set": {"time_delivery": [T + 2 * H, T + 2 * H + Q], "state": "RED"},
    "lem.defaults.set": {"grid_state": "GREEN", "pbBAU": 1, "psBAU": 1, "pbP2P": 1, "psP2P": 1, "beta": 0},
    "lem.set": lem(T + 2 * H, ["P1"]),
    "lem.measure": used(T, 1, 1),
    "lem.solve": {"start": T, "end": T + 4 * H},
    "tokens.balances": {},
    "sla.set": {**SEED_SLA, "id": "other"},
    "kpi.measure": {"sla": "sla", "kpi": "K", "time_interval": [T, T + H], "value": 1.0},
    "sla.solve": {"sla": "sla"},
}


async def test_each_event_only_for_its_roles(ledger_url: str) -> None:
    async with running(ledger_url) as (url, ns):
        assert (await refusal(url, "CTL", NAMESPACE, token=TOKENS["CTL"])).startswith("unauthorized")
        assert (await refusal(url, "P1", NAMESPACE, token="wrong")).startswith("unauthorized")
        clients = {p: await connect(url, p) for p in ("DSO", "AGG", "OP", "ORA", "P1")}
        ctl = await connect(url, "CTL", "/simulation")
        await step(ctl, T - 60)
        await ok(clients["AGG"], "lem.set", lem(T, ["P1"]))
        sla: dict[str, Any] = {
            "id": "sla",
            "start": T,
            "end": T + H,
            "kpis": [
                {
                    "id": "K",
                    "signal": "s",
                    "rule": "gt",
                    "limit": 0,
                    "penalty": 5,
                    "players": ["P1", "ORA"],
                    "resolution": H,
                }
            ],
        }
        await ok(clients["AGG"], "sla.set", sla)
        before = ns.core.snapshot()
        for event, allowed in ALLOWED.items():
            for pid, sio in clients.items():
                if pid not in allowed:
                    await refused(sio, event, PAYLOADS[event], "forbidden")
        assert ns.core.snapshot() == before

        # Allowed roles, refused payloads: clear errors, nothing changed.
        agg, dso, op, p1, ora = (clients[p] for p in ("AGG", "DSO", "OP", "P1", "ORA"))
        p2 = await connect(url, "P2")
        bad: list[tuple[socketio.AsyncClient, str, Any, str]] = [
            (dso, "grid_state.set", {"time_delivery": [T - Q, T], "state": "RED"}, "closed"),  # started
            (dso, "grid_state.set", {"time_delivery": [T + 60, T + 960], "state": "RED"}, "invalid"),  # misaligned
            (dso, "grid_state.set", {"time_delivery": [T + Q, T + 2 * Q], "state": "red"}, "invalid"),
            (dso, "grid_state.set", "RED", "invalid"),
            (
                op,
                "lem.defaults.set",
                {"grid_state": "GREEN", "pbBAU": "20", "psBAU": 1, "pbP2P": 1, "psP2P": 1, "beta": 0},
                "invalid",
            ),
            (
                op,
                "lem.defaults.set",
                {"grid_state": "GREEN", "pbBAU": -1, "psBAU": 1, "pbP2P": 1, "psP2P": 1, "beta": 0},
                "invalid",
            ),
            (agg, "lem.set", lem(T, ["P1"]), "conflict"),  # a LEM for that slot exists
            (agg, "lem.set", lem(T + Q, ["P1", "DSO"]), "invalid"),  # not a prosumer
            (agg, "lem.set", {**lem(T + Q, ["P1"]), "extra": 1}, "invalid"),
            (p1, "lem.measure", used(T, 1, 1), "invalid"),  # the slot has not ended
            (p1, "lem.measure", used(T + Q, 1, 1), "not_found"),  # unknown LEM
            (p2, "lem.measure", used(T, 1, 1), "forbidden"),  # not a player of it
            (p1, "lem.measure", {**used(T, 1, 1), "consumption": True}, "invalid"),
            (agg, "lem.solve", {"start": T + H, "end": T}, "invalid"),
            (agg, "sla.set", sla, "conflict"),
            (agg, "sla.set", {**sla, "id": "sla2", "kpis": [{**sla["kpis"][0], "players": ["AGG"]}]}, "invalid"),
            (p2, "kpi.measure", {**PAYLOADS["kpi.measure"]}, "forbidden"),  # not in the KPI
            (ora, "kpi.measure", {**PAYLOADS["kpi.measure"], "kpi": "K9"}, "not_found"),
            (ora, "kpi.measure", {**PAYLOADS["kpi.measure"], "sla": "nope"}, "not_found"),
            (ora, "kpi.measure", {**PAYLOADS["kpi.measure"], "value": "high"}, "invalid"),
            (ora, "kpi.measure", PAYLOADS["kpi.measure"], "invalid"),  # its period has not ended
            (agg, "sla.set", {**sla, "id": "late", "start": T - H}, "invalid"),  # its period has started
            (agg, "sla.solve", {"sla": "sla"}, "invalid"),  # the SLA has not ended
            (agg, "sla.solve", {"sla": "nope"}, "not_found"),
            (agg, "lem_set", lem(T + Q, ["P1"]), "invalid"),  # only the dotted names exist
            (agg, "lem.nonsense", {}, "invalid"),
        ]
        for sio, event, payload, code in bad:
            await refused(sio, event, payload, code)
        assert ns.core.snapshot() == before

        # Duplicate saves: the first one stands, the second is refused.
        await step(ctl, T + Q)
        await ok(p1, "lem.measure", used(T, 300, 0))
        await refused(p1, "lem.measure", used(T, 300, 0), "conflict")
        mine = ns.core.measurement(T, pseudonyms(ledger_url)("P1"))
        assert mine is not None and mine.consumption == 300
        await step(ctl, T + H)  # the KPI's period [12:00, 13:00] has ended
        await ok(ora, "kpi.measure", PAYLOADS["kpi.measure"])
        await refused(ora, "kpi.measure", {**PAYLOADS["kpi.measure"], "value": 2.0}, "conflict")
        for c in (*clients.values(), p2, ctl):
            await c.disconnect()


# -- the periodic solver follows the market clock --------------------------------------------

STEPPED = MarketConfig(duration=Q, close_steps=2, round_timeout=5.0)  # one auction slot per LEM slot
FLOW_STATES = ["GREEN", "YELLOW", "GREEN", "RED", "YELLOW", "GREEN"]  # by LEM slot, cycling


def grid_digest(ledger_url: str) -> str:
    """sha256 of every /grid table (`ledger_digest` covers the auction's tables only)."""
    digest = hashlib.sha256()
    for cls in PARITY_RECORDS:
        digest.update(json.dumps([cls.TABLE, read_rows(ledger_url, cls.TABLE)], sort_keys=True).encode())
    return digest.hexdigest()


def solves(ledger_url: str) -> dict[str, list[int]]:
    """Solve id -> the LEMs it solved (from the ledger's results)."""
    found: dict[str, set[int]] = {}
    for r in read_rows(ledger_url, "lem_results"):
        found.setdefault(r["solve_id"], set()).add(r["time_delivery_start"])
    return {k: sorted(v) for k, v in sorted(found.items())}


async def parity_flow(ledger_url: str, pause: float) -> tuple[dict[int, tuple[int, ...]], dict[str, int]]:
    """Three hours of Parity, one `step` per LEM slot: before each slot the DSO sets its
    state and the aggregator its LEM (P1, P2, P3); P1 and P2 send meter readings (the auction),
    P3 measures each LEM after it ends (`lem.measure`). `pause`: wall seconds the controller
    sleeps after some steps (a slow machine, a busy controller)."""
    async with running(ledger_url, STEPPED) as (url, ns):
        ctl, dso, agg = await connect(url, "CTL", "/simulation"), await connect(url, "DSO"), await connect(url, "AGG")
        p1, p2 = await connect(url, "P1", "/market", NAMESPACE), await connect(url, "P2", "/market", NAMESPACE)
        p3 = await connect(url, "P3")
        slots = [T + k * Q for k in range(12)]
        meters_and_rounds(
            p1,
            {
                s: {**ZERO, "consumption": {"bess": {}, "other": {"external": 400 + 90 * k}}}
                for k, s in enumerate(slots)
            },
            [],
        )
        meters_and_rounds(p2, {s: {**ZERO, "generation": {"solar": 700 - 40 * k}} for k, s in enumerate(slots)}, [])
        for i, t in enumerate(range(T - Q, T + 3 * H + 2 * Q, Q)):
            await step(ctl, t)
            if t + Q in slots:  # the next slot: its grid state and its LEM, before it starts
                k = slots.index(t + Q)
                state = FLOW_STATES[k % len(FLOW_STATES)]
                await ok(dso, "grid_state.set", {"time_delivery": [t + Q, t + 2 * Q], "state": state})
                await ok(agg, "lem.set", lem(t + Q, ["P1", "P2", "P3"]))
            if t - Q in slots:  # the slot that just ended
                k = slots.index(t - Q)
                await ok(p3, "lem.measure", used(t - Q, 100 * (k % 3), 250 * (k % 2)))
            if pause and (i % 4 == 1 or i % 5 == 0):  # after each step at hh:15, and some others
                await asyncio.sleep(pause)
        solved, balances = dict(ns.solved_at_boundary), ns.core.balances()
        for c in (ctl, dso, agg, p1, p2, p3):
            await c.disconnect()
    return solved, balances


async def test_periodic_solver_follows_step_not_the_machine_speed(tmp_path: Path) -> None:
    """The issue's determinism test: the same flow, once as fast as it goes and once with the
    controller sleeping (longer than the old solver's 1 s poll) after some steps, gives the
    same ledger, and the same LEMs are solved at each boundary: hour by hour at hh:01 of the
    market clock, whatever the wall clock did."""
    fast, slow = f"sqlite:///{tmp_path}/fast.db", f"sqlite:///{tmp_path}/slow.db"
    solved_fast, balances_fast = await parity_flow(fast, 0.0)
    solved_slow, balances_slow = await parity_flow(slow, 1.3)
    hours = {T + h * H: tuple(T + h * H + k * Q for k in range(4)) for h in range(3)}
    expected = {b + H: lems for b, lems in hours.items()}  # the LEMs of 12:00-13:00 at 13:00, ...
    assert solved_fast == expected and solved_slow == expected
    assert solves(fast) == solves(slow) == {f"s{b}-{b + H}": list(lems) for b, lems in hours.items()}
    assert ledger_digest(fast) == ledger_digest(slow)
    assert grid_digest(fast) == grid_digest(slow)
    assert balances_fast == balances_slow and any(balances_fast.values())
    created = {r["solve_id"]: r["time_creation"] for r in read_rows(fast, "lem_results")}
    assert created == {f"s{b}-{b + H}": b + H + Q for b in hours}  # solved by the step to hh:15, before its reply


async def test_a_step_that_jumps_ahead_solves_each_boundary_once_in_order(ledger_url: str) -> None:
    async with running(ledger_url, STEPPED) as (url, ns):
        ctl, agg = await connect(url, "CTL", "/simulation"), await connect(url, "AGG")
        await step(ctl, T - Q)
        hours = (0, 1, 3)  # nothing in 14:00-15:00
        for h in hours:
            for k in range(4):
                await ok(agg, "lem.set", lem(T + h * H + k * Q, ["P1", "P2"]))
        await step(ctl, T + 4 * H + Q)  # 11:45 -> 16:15: boundaries 13:00, 14:00, 15:00, 16:00 at once
        expected = {T + (h + 1) * H: tuple(T + h * H + k * Q for k in range(4)) for h in hours}
        assert ns.solved_at_boundary == expected
        assert ns.periodic_solves == 3  # 15:00 had nothing to solve
        assert (await ok(agg, "lem.solve", {"start": T, "end": T + 5 * H}))["lems"] == []  # each solved once
        await step(ctl, T + 4 * H + 2 * Q)  # nothing new is due
        assert ns.periodic_solves == 3
        for c in (ctl, agg):
            await c.disconnect()
    assert solves(ledger_url) == {f"s{T + h * H}-{T + (h + 1) * H}": list(expected[T + (h + 1) * H]) for h in hours}
    assert all(r["time_creation"] == T + 4 * H + Q for r in read_rows(ledger_url, "lem_results"))


async def test_sla_and_kpi_are_judged_by_the_market_clock(ledger_url: str) -> None:
    """An SLA whose period has started and a KPI value for a period that has not ended are
    `invalid` (the message names the field and the bound); nothing is written."""
    sla: dict[str, Any] = {**SEED_SLA, "kpis": [SEED_SLA["kpis"][0]]}
    kpi = {"sla": sla["id"], "kpi": "KPI1", "time_interval": [T, T + H], "value": 11.0}
    async with running(ledger_url) as (url, ns):
        ctl, agg, p1 = await connect(url, "CTL", "/simulation"), await connect(url, "AGG"), await connect(url, "P1")
        await step(ctl, T)  # 12:00: the SLA of [12:00, 14:00] has started
        before = ns.core.snapshot()
        reply = await call(agg, "sla.set", sla)
        assert reply["error"]["code"] == "invalid" and f"start {T}" in reply["error"]["message"]
        assert f"market time {T}" in reply["error"]["message"]
        await step(ctl, T + 3 * H)  # long after it
        await refused(agg, "sla.set", sla, "invalid")
        assert ns.core.snapshot() == before and read_rows(ledger_url, "slas") == []
        await ok(agg, "sla.set", {**sla, "id": "next", "start": T + 4 * H, "end": T + 6 * H})  # ahead: fine
        next_kpi = {**kpi, "sla": "next", "time_interval": [T + 4 * H, T + 5 * H]}
        await step(ctl, T + 4 * H + 60)  # inside the first period
        before = ns.core.snapshot()
        reply = await call(p1, "kpi.measure", next_kpi)
        assert reply["error"]["code"] == "invalid" and "time_interval" in reply["error"]["message"]
        assert f"market time {T + 4 * H + 60}" in reply["error"]["message"]
        await refused(p1, "kpi.measure", {**next_kpi, "time_interval": [T + 5 * H, T + 6 * H]}, "invalid")
        assert ns.core.snapshot() == before
        await step(ctl, T + 5 * H)  # the first period has ended
        await ok(p1, "kpi.measure", next_kpi)
        await refused(p1, "kpi.measure", {**next_kpi, "time_interval": [T + 5 * H, T + 6 * H]}, "invalid")
        for c in (ctl, agg, p1):
            await c.disconnect()
    assert [r["id"] for r in read_rows(ledger_url, "kpi_values")] == [
        f"kv/next/KPI1/{pseudonyms(ledger_url)('P1')}/{T + 4 * H}"
    ]


async def test_market_command_takes_the_lem_flags(tmp_path: Path) -> None:
    """`microte market --lem-duration 300 --lem-solve-every 300 --lem-solve-delay 0`: 5-minute
    LEMs, solved at each 5-minute boundary of the market clock (here by the restarted server,
    which catches up on the boundaries that passed before it started)."""
    reg = tmp_path / "registry.toml"
    reg.write_text(
        "\n".join(
            f'[[participants]]\nid = "{p}"\ntoken = "{TOKENS[p]}"\nrole = "{ROLE_OF.get(p, "prosumer")}"\n'
            for p in ("CTL", "AGG", "P1")
        )
    )
    ledger = f"sqlite:///{tmp_path}/cli.db"
    args = ["--registry", str(reg), "--port", "0", "--ledger", ledger, "--duration", "300", "--round-timeout", "1"]
    flags = ["--lem-duration", "300", "--lem-solve-every", "300", "--lem-solve-delay", "0"]
    async with market_process([*args, *flags]) as url:
        ctl, agg = await connect(url, "CTL", "/simulation"), await connect(url, "AGG")
        await step(ctl, T - 300)
        reply = await call(agg, "lem.set", lem(T, ["P1"]))  # a 900 s slot
        assert reply["error"]["code"] == "invalid" and "300 s LEM slot" in reply["error"]["message"]
        await ok(agg, "lem.set", {"time_delivery": [T, T + 300], "players": ["P1"]})
        await step(ctl, T + 300)  # the LEM has ended: its boundary 12:05 is due (delay 0)
        for c in (ctl, agg):
            await c.disconnect()
    async with market_process([*args, *flags]) as url:
        agg = await connect(url, "AGG")
        assert (await ok(agg, "lem.solve", {"start": T, "end": T + H}))["lems"] == []  # solved at 12:05
        await agg.disconnect()
    assert solves(ledger) == {f"s{T}-{T + 300}": [T]}
