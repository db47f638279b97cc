"""kill -9 of the market server mid-run: no acknowledged record is lost or duplicated, a
restarted server resumes from the ledger, and the run ends with the same ledger as a run
that never crashed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import socketio

from controller.sim import LISTENING
from ledger import ledger_digest, read_rows

TOKENS = {"P1": "t-p1", "P2": "t-p2", "CTL": "t-ctl"}
ROUNDS = [600 + 60 * i for i in range(8)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_server(tmp: Path, ledger: str, port: int, *extra: str) -> asyncio.subprocess.Process:
    registry = tmp / "registry.toml"
    registry.write_text(
        "".join(
            f'[[participants]]\nid = "{p}"\ntoken = "{t}"\nrole = "{"controller" if p == "CTL" else "prosumer"}"\n'
            for p, t in TOKENS.items()
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller",
        "market",
        "--registry",
        str(registry),
        "--port",
        str(port),
        "--ledger",
        ledger,
        "--duration",
        "60",
        "--round-timeout",
        "5",
        "--log-level",
        "WARNING",
        *extra,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.decode().startswith(LISTENING), line
    return proc


async def prosumer(url: str, pid: str) -> socketio.AsyncClient:
    """Each round: trade 30 Wh for next_settle (P1 sells solar, P2 buys), then meter the current round."""
    sio = socketio.AsyncClient(reconnection=True, reconnection_delay=0.2, reconnection_delay_max=0.5)
    side = "ask" if pid == "P1" else "bid"
    reading = {"generation": {"solar": 50}} if pid == "P1" else {"consumption": {"other": {"external": 40}}}

    async def on_start_round(msg: dict[str, Any]) -> None:
        order = {"quantity": 30, "price": 0.1 if side == "ask" else 0.3, "time_delivery": msg["next_settle"]}
        await sio.call(side, order | ({"source": "solar"} if side == "ask" else {}), namespace="/market")
        await sio.call("meter", {"time_interval": msg["current_round"], **reading}, namespace="/market")

    sio.on("start_round", on_start_round, namespace="/market")
    await sio.connect(url, namespaces=["/market"], auth={"id": pid, "token": TOKENS[pid]}, transports=["websocket"])
    return sio


async def controller(url: str) -> socketio.AsyncClient:
    ctl = socketio.AsyncClient(reconnection=False)
    await ctl.connect(url, namespaces=["/simulation"], auth={"id": "CTL", "token": TOKENS["CTL"]})
    return ctl


async def wait_online(ctl: socketio.AsyncClient, ids: list[str]) -> None:
    for _ in range(100):
        status = await ctl.call("status", {}, namespace="/simulation")
        if status["participants"]["online"] == ids:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"participants did not come back: {status}")


async def run(tmp: Path, ledger: str, crash_at: int | None) -> list[dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await start_server(tmp, ledger, port)
    clients = [await prosumer(url, p) for p in ("P1", "P2")]
    ctl = await controller(url)
    acked: list[dict[str, Any]] = []
    i = 0
    while i < len(ROUNDS):
        t = ROUNDS[i]
        if t == crash_at:
            step = asyncio.ensure_future(ctl.call("step", {"time": t}, namespace="/simulation", timeout=5))
            await asyncio.sleep(0.05)  # the round is under way
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await asyncio.gather(step, return_exceptions=True)  # its reply never comes
            await ctl.disconnect()
            # Every round acknowledged before the crash is in the ledger, exactly once.
            rounds = {r["time"] for r in read_rows(ledger, "rounds")}
            assert {a["current_round"][0] for a in acked} <= rounds
            crash_at = None
            proc = await start_server(tmp, ledger, port)
            ctl = await controller(url)
            await wait_online(ctl, ["P1", "P2"])
            continue  # the controller retries the round it never saw acknowledged
        reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=10)
        assert reply["ok"], reply
        acked.append(reply["round"])
        i += 1
    for c in (*clients, ctl):
        await c.disconnect()
    proc.send_signal(signal.SIGTERM)
    assert await proc.wait() == 0  # graceful shutdown exits 0
    return acked


async def test_kill9_mid_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    calm, crashed = f"sqlite:///{tmp_path}/calm.db", f"sqlite:///{tmp_path}/crashed.db"
    calm_acks = await run(tmp_path, calm, crash_at=None)
    crash_acks = await run(tmp_path, crashed, crash_at=ROUNDS[4])
    assert [a["current_round"] for a in crash_acks] == [a["current_round"] for a in calm_acks]
    assert ledger_digest(crashed) == ledger_digest(calm)
    rows = read_rows(crashed, "transactions")
    p2p = sorted((r["time_delivery_start"], r["quantity"]) for r in rows if r["kind"] == "p2p")
    # Slots 720.. were traded (orders go in from the first round on): one 30 Wh fill each, never twice.
    assert p2p == [(t, 30) for t in ROUNDS[2:]]
    assert len({r["id"] for r in rows}) == len(rows)
    assert sorted(r["time"] for r in read_rows(crashed, "rounds")) == ROUNDS
    assert os.path.exists(crashed.removeprefix("sqlite:///"))


async def test_acknowledged_entries_survive_kill9_with_ack_durability(tmp_path: Path) -> None:
    ledger, port = f"sqlite:///{tmp_path}/ack.db", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await start_server(tmp_path, ledger, port, "--durability", "ack")
    ctl = await controller(url)
    assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
    seller, buyer = (
        await _plain(url, "P1"),
        await _plain(url, "P2"),
    )
    ask = {"id": "a1", "quantity": 25, "price": 0.1, "time_delivery": [720, 780], "source": "solar"}
    assert (await seller.call("ask", ask, namespace="/market"))["ok"]
    assert (await buyer.call("bid", {"quantity": 25, "price": 0.2, "time_delivery": [720, 780]}, namespace="/market"))[
        "ok"
    ]
    proc.send_signal(signal.SIGKILL)  # right after the acknowledgements
    await proc.wait()
    for c in (ctl, seller, buyer):
        await c.disconnect()
    proc = await start_server(tmp_path, ledger, port, "--durability", "ack")
    seller = await _plain(url, "P1")
    again = await seller.call("ask", ask, namespace="/market")
    assert again["ok"] and again["duplicate"] is True  # the restored book knows the client id
    ctl = await controller(url)
    r = await ctl.call("step", {"time": 660}, namespace="/simulation")
    assert r["ok"] and r["round"]["trades"] == 1, r
    for c in (ctl, seller):
        await c.disconnect()
    proc.send_signal(signal.SIGTERM)
    assert await proc.wait() == 0
    fills = read_rows(ledger, "settlements")
    assert [(f["seller_id"], f["buyer_id"], f["quantity"]) for f in fills] == [("P1", "P2", 25)]


async def _plain(url: str, pid: str) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(url, namespaces=["/market"], auth={"id": pid, "token": TOKENS[pid]}, transports=["websocket"])
    return sio
