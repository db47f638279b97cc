"""Real time (`microte market --upstream URL`; market/server/upstream.py, docs/hierarchy.md):
two community servers join a district server on their own; a seller in one and a buyer in
the other never meet locally, and trade through the district. Checked from the three
ledgers: the district's fills are the communities' upstream settlements exactly, the
members' exchanges deliver them, and each community's readings above are what its upstream
account passed on. A district that is down when a community starts is waited for."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import socketio

from ledger import open_sink, read_rows
from market.core.engine import MarketConfig
from market.core.hierarchy import UPSTREAM_ID
from market.core.registry import Registry
from market.server.app import MarketServer
from market.server.upstream import UpstreamLink
from tests.e2e.conftest import client, serving

D = 2  # seconds per slot
TOKENS = {"P1": "tok-p1", "P2": "tok-p2", "C1": "tok-c1", "C2": "tok-c2"}


def reg(*ids: str) -> Registry:
    return Registry.from_dict({"participants": [{"id": p, "token": TOKENS[p], "role": "prosumer"} for p in ids]})


def trader(sio: socketio.AsyncClient, side: str, reading: dict[str, Any]) -> None:
    """Each round: meter the slot that ended, offer or ask 30 Wh for the next open slot."""

    async def on_start_round(msg: dict[str, Any]) -> None:
        await sio.call("meter", {"time_interval": msg["last_round"], **reading}, namespace="/market")
        order = {"quantity": 30, "price": 0.1 if side == "ask" else 0.3, "time_delivery": msg["next_settle"]}
        await sio.call(side, order | ({"source": "solar"} if side == "ask" else {}), namespace="/market")

    sio.on("start_round", on_start_round, namespace="/market")


async def test_two_communities_trade_through_the_district_in_real_time(tmp_path: Path) -> None:
    ledgers = {m: f"sqlite:///{tmp_path / m}.db" for m in ("district", "C1", "C2")}
    # The district closes a slot's gate one round after the communities and waits longer for readings.
    district = MarketServer(
        MarketConfig(mode="rt", duration=D, close_steps=1, meter_grace=1.2),
        reg("C1", "C2"),
        open_sink(ledgers["district"]),
    )
    community = MarketConfig(mode="rt", duration=D, close_steps=2, meter_grace=0.3)
    c1 = MarketServer(community, reg("P1"), open_sink(ledgers["C1"]), in_district=True)
    c2 = MarketServer(community, reg("P2"), open_sink(ledgers["C2"]), in_district=True)
    async with serving(district) as durl:
        c1.upstream_link = UpstreamLink(c1, durl, "C1", TOKENS["C1"])
        c2.upstream_link = UpstreamLink(c2, durl, "C2", TOKENS["C2"])
        async with serving(c1) as u1, serving(c2) as u2:
            seller = await client(u1, "P1", token=TOKENS["P1"])
            buyer = await client(u2, "P2", token=TOKENS["P2"])
            trader(seller, "ask", {"generation": {"solar": 50}})
            trader(buyer, "bid", {"consumption": {"other": {"external": 40}}})
            await asyncio.sleep(6 * D + 0.5)
            await seller.disconnect()
            await buyer.disconnect()
            links = (c1.upstream_link, c2.upstream_link)
            assert all(link.errors == [] or all("closed" in json.dumps(e) for e in link.errors) for link in links), [
                link.errors for link in links
            ]
    above = read_rows(ledgers["district"], "settlements")
    assert above and all((s["seller_id"], s["buyer_id"]) == ("C1", "C2") for s in above), above
    for cid, side in (("C1", "sell"), ("C2", "buy")):
        below = [s for s in read_rows(ledgers[cid], "settlements") if UPSTREAM_ID in (s["seller_id"], s["buyer_id"])]
        assert Counter((s["time_delivery_start"], s["quantity"], s[f"amount_{side}"]) for s in below) == Counter(
            (s["time_delivery_start"], s["quantity"], s[f"amount_{side}"]) for s in above
        )
    # Locally the seller and the buyer never met: every P2P row goes through `upstream`.
    p2p = [t for c in ("C1", "C2") for t in read_rows(ledgers[c], "transactions") if t["kind"] == "p2p"]
    assert p2p and all(UPSTREAM_ID in (t["seller_id"], t["buyer_id"]) for t in p2p)
    # What C1's upstream account took from P1 is C1's generation above, slot by slot.
    sold = Counter()
    for t in read_rows(ledgers["C1"], "transactions"):
        if t["kind"] == "p2p" and t["buyer_id"] == UPSTREAM_ID:
            sold[t["time_delivery_start"]] += t["quantity"]
    readings = {
        m["time_interval_start"]: m for m in read_rows(ledgers["district"], "meters") if m["participant_id"] == "C1"
    }
    assert sold and all(json.loads(readings[s]["generation"]).get("solar", 0) == q for s, q in sold.items())


async def test_a_community_waits_for_a_district_that_is_not_up_yet(tmp_path: Path) -> None:
    c1 = MarketServer(
        MarketConfig(mode="rt", duration=D, close_steps=2),
        reg("P1"),
        open_sink(f"sqlite:///{tmp_path}/c1.db"),
        in_district=True,
    )
    from tests.e2e.test_connect_retry import free_port

    port = free_port()
    c1.upstream_link = UpstreamLink(c1, f"http://127.0.0.1:{port}", "C1", TOKENS["C1"])
    async with serving(c1):
        await asyncio.sleep(2.5)  # the district is not there: the community trades on, locally
        assert not c1.upstream_link.sio.connected
        district = MarketServer(
            MarketConfig(mode="rt", duration=D, close_steps=1), reg("C1"), open_sink(f"sqlite:///{tmp_path}/d.db")
        )
        from tests.e2e.test_connect_retry import serving_on

        async with serving_on(district, port):
            for _ in range(50):
                if "C1" in district.online():
                    break
                await asyncio.sleep(0.1)
            assert "C1" in district.online()


@pytest.mark.parametrize("mode", ["sim"])
def test_upstream_is_for_rt_markets(tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    from controller import cli

    registry = tmp_path / "r.toml"
    registry.write_text('[[participants]]\nid = "P1"\ntoken = "t"\nrole = "prosumer"\n')
    with pytest.raises(SystemExit, match="rt markets"):
        cli.main(
            ["market", "--registry", str(registry), "--mode", mode, "--upstream", "http://127.0.0.1:1", "--port", "0"]
        )
