"""/fleet at scale (#16): large logins, the first round's deadline, the same ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import socketio

import controller.sim as sim
import participants.fleet_client as fleet_client
from controller.sim import run_sim
from ledger import ledger_digest
from market.core.engine import MarketConfig
from participants.spec import ParticipantSpec
from tests.e2e.conftest import TOKENS, client, running

SCENARIO = Path(__file__).parents[2] / "scenarios" / "community.toml"
CONFIG = MarketConfig(duration=60, round_timeout=0.5)
SLOT = [720, 780]


async def test_first_fleet_round_meets_a_short_deadline(tmp_path: Path) -> None:
    """500 prosumers' first round builds a day of profiles each (~0.5 ms apiece, ~0.25 s),
    which outlasted a 0.15 s round_timeout and missed every reading: the clients build them
    before connecting now; the rounds after cost a few ms."""
    url = f"sqlite:///{tmp_path}/first.db"
    result = await run_sim(
        SCENARIO,
        ledger=url,
        participants=500,
        days=3 * 900 / 86400,
        progress=False,
        fleets=1,
        overrides={"market.round_timeout": 0.15},
    )
    assert result.summary.rounds == 3
    assert result.missing_total == 0


async def test_a_fleet_larger_than_one_login_packet_joins_the_rest(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connect packet is held to the 64 KB budget before login (a 5,000-member fleet
    was closed unheard); the client connects with its first members and `join`s the rest."""
    monkeypatch.setattr(fleet_client, "LOGIN_BYTES", 60)  # one member per message
    members = [(ParticipantSpec(id=p), TOKENS[p]) for p in ("P1", "P2", "P3")]
    async with running(CONFIG, ledger_url) as (url, server):
        fc = fleet_client.FleetClient(members, seed=1)
        await fc.connect(url)
        assert server.online() == ["P1", "P2", "P3"]
        assert server.fleet.members[next(iter(server.fleet.members))] == {"P1", "P2", "P3"}
        await fc.disconnect()


async def test_a_join_with_one_bad_token_admits_none_of_it(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        sio = socketio.AsyncClient(reconnection=False)
        await sio.connect(
            url, namespaces=["/fleet"], auth={"fleet": [{"id": "P1", "token": TOKENS["P1"]}]}, transports=["websocket"]
        )
        bad: Any = await sio.call(
            "join", {"fleet": [{"id": "P2", "token": TOKENS["P2"]}, {"id": "P3", "token": "wrong"}]}, namespace="/fleet"
        )
        assert not bad["ok"] and bad["error"]["code"] == "unauthorized" and "P3" in bad["error"]["message"]
        assert server.online() == ["P1"]
        good = await sio.call("join", {"fleet": [{"id": "P2", "token": TOKENS["P2"]}]}, namespace="/fleet")
        assert good == {"ok": True, "members": 2}
        assert server.online() == ["P1", "P2"]
        assert (await sio.call("join", {"fleet": []}, namespace="/fleet"))["error"]["code"] == "invalid"
        await sio.disconnect()


async def test_fleet_rounds_give_the_ledger_of_one_connection_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The population's columns and v1 batches, and one `Prosumer` each in pipelined
    chunks (columnar and v1): one ledger."""
    single = f"sqlite:///{tmp_path}/single.db"
    await run_sim(SCENARIO, ledger=single, participants=40, days=0.25, progress=False)
    monkeypatch.setattr(fleet_client, "PIPELINE", 7)  # several chunks per connection and round
    monkeypatch.setattr(fleet_client, "MAX_FLEET_ITEMS", 9)  # several batches of the population
    stats: dict[tuple[bool, bool], dict[str, Any]] = {}
    for columns, population in ((True, True), (False, True), (True, False), (False, False)):
        made: list[fleet_client.FleetClient] = []

        def client(
            *args: Any, made: list[Any] = made, columns: bool = columns, population: bool = population, **kw: Any
        ) -> Any:
            made.append(fleet_client.FleetClient(*args, **kw, columns=columns, population=population))
            return made[-1]

        monkeypatch.setattr(sim, "FleetClient", client)
        fleet = f"sqlite:///{tmp_path}/fleet-{columns}-{population}.db"
        result = await run_sim(SCENARIO, ledger=fleet, participants=40, days=0.25, progress=False, fleets=2)
        assert result.missing_total == 0 and result.summary.trades > 0
        assert ledger_digest(fleet) == ledger_digest(single), f"columns={columns} population={population}"
        stats[columns, population] = {p: s for c in made for p, s in c.stats().items()}
        assert not any(c.errors for c in made)
    # What each prosumer heard of its fills and deliveries: the same from columns and v1 batches.
    for population in (True, False):
        assert stats[True, population] == stats[False, population]
        assert sum(s.delivered for s in stats[True, population].values()) > 0


async def fleet(url: str, pids: tuple[str, ...] = ("P1", "P2")) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    creds = [{"id": p, "token": TOKENS[p]} for p in pids]
    await sio.connect(url, namespaces=["/fleet"], auth={"fleet": creds}, transports=["websocket"])
    return sio


async def test_columnar_orders_reply_a_uuid_each_and_the_refused_by_index(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        f = await fleet(url)
        assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
        cols = {
            "participant": ["P1", "P2", "P3", "P2"],  # P3 is not a member
            "side": ["ask", "bid", "bid", "bid"],
            "quantity": [50, 50, 50, 10],
            "price": [0.1, 0.3, 0.3, 0.3],
            "time_delivery": [SLOT, SLOT, SLOT, [0, 60]],  # the last one's gate has closed
            "source": ["solar", None, None, None],
        }
        reply = await f.call("orders.columns", cols, namespace="/fleet")
        assert reply["ok"] and reply["uuid"][0] == f"{SLOT[0]}.P1.0" and reply["uuid"][2:] == [None, None]
        assert [(r["index"], r["code"]) for r in reply["refused"]] == [(2, "unauthorized"), (3, "closed")]
        bad = await f.call("orders.columns", {**cols, "quantity": [50, -1, 5, 5]}, namespace="/fleet")
        assert not bad["ok"] and bad["error"]["code"] == "invalid" and "$.quantity[1]" in bad["error"]["message"]
        assert (await ctl.call("step", {"time": 660}, namespace="/simulation"))["round"]["trades"] == 1
        readings = {
            "participant": ["P1", "P2"],
            "time_interval": [SLOT, SLOT],
            "generation": {"solar": [50, None]},
            "other": {"external": [None, 50]},
        }
        task = asyncio.ensure_future(ctl.call("step", {"time": 720}, namespace="/simulation"))
        await asyncio.sleep(0.05)
        assert await f.call("meters.columns", readings, namespace="/fleet") == {"ok": True, "refused": []}
        step = await task
        assert step["ok"] and step["round"]["metered"] == 2
        # The v1 events still work on the same connection.
        v1 = await f.call("meters", {"readings": [{"participant": "P3", "time_interval": SLOT}]}, namespace="/fleet")
        assert v1["ok"] and v1["results"][0]["error"]["code"] == "unauthorized"
        assert server.online() == ["P1", "P2"]
        await f.disconnect()
        await ctl.disconnect()
