"""The `microte market` command line of PROTOCOL.md, driven by plain socket.io clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import socketio

from controller.sim import market_process
from ledger import read_rows


def registry_of(tmp_path: Path, roles: dict[str, str]) -> Path:
    """A registry file of `roles` (id -> role), each id's token `secret-<id>`."""
    path = tmp_path / "registry.toml"
    path.write_text(
        "\n".join(f'[[participants]]\nid = "{p}"\ntoken = "secret-{p}"\nrole = "{r}"\n' for p, r in roles.items())
    )
    return path


async def connect_all(url: str, namespaces: dict[str, str]) -> dict[str, socketio.AsyncClient]:
    """A plain socket.io client per id (id -> namespace), logged in with `secret-<id>`."""
    clients = {}
    for pid, ns in namespaces.items():
        sio = socketio.AsyncClient(reconnection=False)
        await sio.connect(url, namespaces=[ns], auth={"id": pid, "token": f"secret-{pid}"})
        clients[pid] = sio
    return clients


async def test_market_command_serves_the_protocol(tmp_path: Path) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text(
        '[[participants]]\nid = "A"\ntoken = "secret-a"\nrole = "prosumer"\n\n'
        '[[participants]]\nid = "B"\ntoken = "secret-b"\nrole = "prosumer"\n\n'
        '[[participants]]\nid = "C"\ntoken = "secret-c"\nrole = "controller"\n'
    )
    ledger = f"sqlite:///{tmp_path}/cli.db"
    args = ["--registry", str(registry), "--port", "0", "--ledger", ledger, "--duration", "60", "--round-timeout", "1"]
    async with market_process(args) as url:
        assert url.startswith("http://127.0.0.1:")
        clients = {}
        for pid, ns in (("A", "/market"), ("B", "/market"), ("C", "/simulation")):
            sio = socketio.AsyncClient(reconnection=False)
            await sio.connect(url, namespaces=[ns], auth={"id": pid, "token": f"secret-{pid.lower()}"})
            clients[pid] = sio
        ctl = clients["C"]
        assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
        status = await ctl.call("status", {}, namespace="/simulation")
        assert status["participants"]["online"] == ["A", "B"] and status["mode"] == "sim"
        slot = [720, 780]
        ask = await clients["A"].call(
            "ask", {"quantity": 100, "price": 0.1, "time_delivery": slot, "source": "wind"}, namespace="/market"
        )
        bid = await clients["B"].call(
            "bid", {"quantity": 100, "price": 0.3, "time_delivery": slot}, namespace="/market"
        )
        assert ask["ok"] and bid["ok"]
        r = await ctl.call("step", {"time": 660}, namespace="/simulation")
        assert r["round"]["trades"] == 1 and r["round"]["missing"] == ["A", "B"]  # nobody metered: zeros
        bad = await clients["A"].call(
            "bid", {"quantity": True, "price": 0.1, "time_delivery": slot}, namespace="/market"
        )
        assert bad["ok"] is False and bad["error"]["code"] == "invalid"
        for sio in clients.values():
            await sio.disconnect()
    # SIGTERM flushed the ledger: the fill is there.
    fills = read_rows(ledger, "settlements")
    assert [(f["seller_id"], f["buyer_id"], f["quantity"], f["price_buy"]) for f in fills] == [("A", "B", 100, 0.2)]


async def test_market_command_selects_pro_rata_matching(tmp_path: Path) -> None:
    registry = registry_of(tmp_path, {"A": "prosumer", "B": "prosumer", "S": "prosumer", "C": "controller"})
    ledger = f"sqlite:///{tmp_path}/cli.db"
    args = ["--registry", str(registry), "--port", "0", "--ledger", ledger, "--duration", "60", "--round-timeout", "1"]
    async with market_process([*args, "--matching", "pro_rata"]) as url:
        clients = await connect_all(url, {"A": "/market", "B": "/market", "S": "/market", "C": "/simulation"})
        ctl = clients["C"]
        assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
        slot = [720, 780]
        for pid, q in (("A", 60), ("B", 40)):  # one price level: tied bids
            bid = {"quantity": q, "price": 0.3, "time_delivery": slot}
            assert (await clients[pid].call("bid", bid, namespace="/market"))["ok"]
        ask = {"quantity": 50, "price": 0.1, "time_delivery": slot, "source": "solar"}
        assert (await clients["S"].call("ask", ask, namespace="/market"))["ok"]
        assert (await ctl.call("step", {"time": 660}, namespace="/simulation"))["round"]["trades"] == 2
        for sio in clients.values():
            await sio.disconnect()
    fills = read_rows(ledger, "settlements")
    assert sorted((f["buyer_id"], f["quantity"]) for f in fills) == [("A", 30), ("B", 20)]
    assert '"matching":"pro_rata"' in read_rows(ledger, "runs")[0]["config"]


async def test_market_command_bounds_the_outbox_for_resume(tmp_path: Path) -> None:
    """`--outbox-mib`: the events kept for `resume`, in all. With room for about one event,
    a participant that was away for a fill and its delivery finds the older one gone."""
    registry = registry_of(tmp_path, {"A": "prosumer", "B": "prosumer", "C": "controller"})
    args = ["--registry", str(registry), "--port", "0", "--duration", "60", "--round-timeout", "1"]
    results = {}
    for mib in ("256", "0.0006"):
        ledger = f"sqlite:///{tmp_path}/cli-{mib}.db"
        async with market_process([*args, "--ledger", ledger, "--outbox-mib", mib]) as url:
            clients = await connect_all(url, {"A": "/market", "B": "/market", "C": "/simulation"})
            ctl = clients["C"]
            assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
            slot = [720, 780]
            ask = {"quantity": 50, "price": 0.1, "time_delivery": slot, "source": "solar"}
            assert (await clients["A"].call("ask", ask, namespace="/market"))["ok"]
            bid = {"quantity": 50, "price": 0.3, "time_delivery": slot}
            assert (await clients["B"].call("bid", bid, namespace="/market"))["ok"]
            await clients["B"].disconnect()  # away for the fill and the delivery
            seller = clients["A"]

            async def on_start_round(msg: dict[str, Any], sio: socketio.AsyncClient = seller) -> None:
                if msg["current_round"] == [720, 780]:  # A delivers: B owes for what it bought
                    reading = {"time_interval": msg["current_round"], "generation": {"solar": 50}}
                    await sio.call("meter", reading, namespace="/market")

            seller.on("start_round", on_start_round, namespace="/market")
            for t in (660, 720):
                assert (await ctl.call("step", {"time": t}, namespace="/simulation"))["ok"]
            back = (await connect_all(url, {"B": "/market"}))["B"]
            results[mib] = await back.call("resume", {"since": 0}, namespace="/market")
            for sio in (back, clients["A"], ctl):
                await sio.disconnect()
    assert [e["event"] for e in results["256"]["events"]] == ["settled", "delivery"]
    assert results["0.0006"]["ok"] is False and results["0.0006"]["error"]["code"] == "not_found"
