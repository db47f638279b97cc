"""Pseudonyms on /grid (issue #19 item 2, docs/parity.md *Pseudonyms*): the ledger's /grid
tables and every /grid reply carry pseudonyms, never registry ids.

- A real `microte market` run with every /grid event, the auction's meter readings and the
  periodic solver: every /grid table is grepped for registry ids and holds none; neither
  does any reply; `microte pseudonym resolve` gives the operator the ids back from the key.
- An external pseudonymization service (a real aiohttp server on 127.0.0.1, the seed's
  `enabled` and `timeout`): its pseudonyms are used; a slow, failing or odd service is a
  clear `unavailable` and nothing is written; `enabled = false` is keyed HMAC.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import socketio
from aiohttp import web

from controller.sim import market_process
from ledger import open_sink
from ledger.digest import read_rows
from market.community.messages import ParityConfig, PseudonymConfig
from market.community.namespace import NAMESPACE
from market.community.parity import PARITY_RECORDS
from market.community.pseudonyms import create_key, hmac_pseudonym, read_key
from market.core.engine import MarketConfig
from market.server.app import MarketServer
from tests.e2e.conftest import serving
from tests.e2e.test_grid import (
    ROLE_OF,
    SEED_SLA,
    TOKENS,
    ZERO,
    H,
    Q,
    T,
    call,
    connect,
    lem,
    meters_and_rounds,
    ok,
    registry,
    step,
    used,
)

IDS = frozenset(TOKENS)
NAME = re.compile(r"[A-Za-z0-9_.:-]+")  # the characters of an id: a registry id is one such token


def names_in(value: Any) -> set[str]:
    """Every id-like token in a value (strings, JSON text, nested lists and dicts, keys too)."""
    if isinstance(value, str):
        return set(NAME.findall(value))
    if isinstance(value, dict):
        return set().union(*(names_in(k) | names_in(v) for k, v in value.items())) if value else set()
    if isinstance(value, list | tuple):
        return set().union(*(names_in(v) for v in value)) if value else set()
    return set()


def write_registry(path: Path) -> None:
    path.write_text(
        "\n".join(
            f'[[participants]]\nid = "{p}"\ntoken = "{t}"\nrole = "{ROLE_OF.get(p, "prosumer")}"\n'
            for p, t in TOKENS.items()
        )
    )


async def test_no_grid_table_or_reply_holds_a_registry_id(tmp_path: Path) -> None:
    reg, ledger = tmp_path / "registry.toml", f"sqlite:///{tmp_path}/grid.db"
    write_registry(reg)
    sla = {**SEED_SLA, "kpis": [{**SEED_SLA["kpis"][0], "players": ["P1", "ORA"]}]}
    replies: list[dict[str, Any]] = []

    async def keep(sio: Any, event: str, payload: Any = None) -> dict[str, Any]:
        reply = await ok(sio, event, payload)
        replies.append(reply)
        return reply

    args = ["--registry", str(reg), "--port", "0", "--ledger", ledger, "--duration", "900", "--round-timeout", "2"]
    async with market_process(args) as url:
        ctl, dso, agg = await connect(url, "CTL", "/simulation"), await connect(url, "DSO"), await connect(url, "AGG")
        op, ora = await connect(url, "OP"), await connect(url, "ORA")
        p1, p2 = await connect(url, "P1", "/market", NAMESPACE), await connect(url, "P2", "/market", NAMESPACE)
        p3 = await connect(url, "P3")
        # The auction's readings of [12:00, 12:15]: P1 imports 800 Wh, P2 exports 500 Wh.
        meters_and_rounds(p1, {T: {**ZERO, "consumption": {"bess": {}, "other": {"external": 800}}}}, [])
        meters_and_rounds(p2, {T: {**ZERO, "generation": {"solar": 500}}}, [])
        await step(ctl, T - Q)
        await keep(
            op,
            "lem.defaults.set",
            {"grid_state": "YELLOW", "pbBAU": 24, "psBAU": 6, "pbP2P": 14, "psP2P": 8, "beta": 0.02},
        )
        await keep(dso, "grid_state.set", {"time_delivery": [T, T + Q], "state": "YELLOW"})
        got = await keep(agg, "lem.set", lem(T, ["P1", "P2", "P3"]))
        pseudonym = dict(zip(["P1", "P2", "P3"], got["lem"]["players"], strict=True))
        await keep(agg, "lem.set", lem(T + Q, [pseudonym["P1"], "P2"]))  # a pseudonym given out names its player too
        await keep(agg, "sla.set", sla)
        await step(ctl, T)
        await step(ctl, T + Q)  # [12:00, 12:15] delivered: the readings are in the ledger
        await keep(p3, "lem.measure", used(T, 100, 300))
        await step(ctl, T + H)
        for sio in (p1, ora):
            await keep(
                sio, "kpi.measure", {"sla": sla["id"], "kpi": "KPI1", "time_interval": [T, T + H], "value": 12.0}
            )
        await step(ctl, T + H + Q)  # 13:15 (13:01 is due): the hourly solver solves both LEMs
        for sio in (agg, op, p1, dso):
            await keep(sio, "tokens.balances")
        await step(ctl, T + 3 * H)
        await keep(agg, "sla.solve", {"sla": sla["id"]})
        await keep(op, "sla.solve", {"sla": sla["id"]})
        await keep(op, "lem.solve", {"start": T, "end": T + H})
        for c in (ctl, dso, agg, op, ora, p1, p2, p3):
            await c.disconnect()

    tables = {cls.TABLE: read_rows(ledger, cls.TABLE) for cls in PARITY_RECORDS}
    assert all(tables.values()), {t: len(rows) for t, rows in tables.items()}  # every /grid table has rows
    for table, rows in tables.items():
        for row in rows:
            assert not names_in(row) & IDS, (table, row)
    for reply in replies:
        assert not names_in(reply) & IDS, reply
    # The solve fell back on the meters (P1, P2) and on P3's own measurement, under pseudonyms.
    results = {r["participant_id"]: r for r in tables["lem_results"] if r["time_delivery_start"] == T}
    assert {p: (r["measured"], r["consumption"], r["production"]) for p, r in results.items()} == {
        pseudonym["P1"]: ("meter", 800, 0),
        pseudonym["P2"]: ("meter", 0, 500),
        pseudonym["P3"]: ("prosumer", 100, 300),
    }
    # The key beside the registry made them; with it the operator resolves them.
    key_file = tmp_path / "pseudonym.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert pseudonym == {p: hmac_pseudonym(read_key(key_file), p) for p in ("P1", "P2", "P3")}
    penalised = {r["payer_id"] for r in tables["token_transfers"] if r["kind"] == "sla_penalty"}
    out = resolve(key_file, reg, *sorted(penalised), "ps-0000")
    assert out.returncode == 1  # one of them is nobody's
    lines = dict(line.split() for line in out.stdout.splitlines())
    assert lines == {pseudonym["P1"]: "P1", hmac_pseudonym(read_key(key_file), "ORA"): "ORA"}
    assert "ps-0000: not the pseudonym of any id" in out.stderr


def resolve(key: Path, reg: Path, *pseudonyms: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "controller", "pseudonym", "resolve", *pseudonyms, "--key", str(key)]
    return subprocess.run([*cmd, "--registry", str(reg)], capture_output=True, text=True, timeout=60)


# -- an external pseudonymization service ----------------------------------------------------

CONFIG = MarketConfig(duration=60, close_steps=2, round_timeout=2.0)


@asynccontextmanager
async def service(answer: Callable[[str], Any]) -> AsyncIterator[tuple[str, list[str]]]:
    """A pseudonymization service on 127.0.0.1: GET /pseudonym?plain=<id>, answered by
    `answer(id)` (a coroutine giving a web.Response). Yields the URL to configure (ending
    with its query key, as the seed's) and the ids it was asked for."""
    asked: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        plain = request.query["plain"]
        asked.append(plain)
        response: web.StreamResponse = await answer(plain)
        return response

    app = web.Application()
    app.router.add_get("/pseudonym", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/pseudonym?plain", asked
    finally:
        await runner.cleanup()


def svc_pseudonym(pid: str) -> str:
    return "svc-" + hashlib.sha256(pid.encode()).hexdigest()[:12]


async def good(pid: str) -> web.Response:
    return web.json_response({"pseudonym": svc_pseudonym(pid)})


@asynccontextmanager
async def market(ledger_url: str, pseudonyms: PseudonymConfig) -> AsyncIterator[tuple[str, MarketServer]]:
    server = MarketServer(CONFIG, registry(), open_sink(ledger_url))
    server.grid.configure(ParityConfig(pseudonyms=pseudonyms))
    async with serving(server) as url:
        yield url, server


def grid_rows(ledger_url: str) -> int:
    return sum(len(read_rows(ledger_url, cls.TABLE)) for cls in PARITY_RECORDS)


async def test_an_external_service_gives_the_pseudonyms(ledger_url: str) -> None:
    async with service(good) as (url, asked), market(ledger_url, PseudonymConfig(service=url, timeout=5)) as (m, _):
        ctl, agg, p1 = await connect(m, "CTL", "/simulation"), await connect(m, "AGG"), await connect(m, "P1")
        await step(ctl, T - 60)
        got = await ok(agg, "lem.set", lem(T, ["P1", "P2"]))
        assert got["lem"]["players"] == [svc_pseudonym("P1"), svc_pseudonym("P2")]
        assert got["lem"]["aggregator"] == svc_pseudonym("AGG")
        await step(ctl, T + Q)
        await ok(p1, "lem.measure", used(T, 1000, 0))
        solved = await ok(agg, "lem.solve", {"start": T, "end": T + Q})
        assert solved["balances"] == {svc_pseudonym("P1"): -200_000, svc_pseudonym("P2"): 0}
        assert (await ok(p1, "tokens.balances"))["balances"] == {svc_pseudonym("P1"): -200_000}
        assert sorted(asked) == ["AGG", "P1", "P2"]  # each id asked once, then remembered
        for c in (ctl, agg, p1):
            await c.disconnect()
    assert [r["players"] for r in read_rows(ledger_url, "lems")] == [
        json.dumps([svc_pseudonym("P1"), svc_pseudonym("P2")], separators=(",", ":"))
    ]


async def slow(pid: str) -> web.Response:
    await asyncio.sleep(2)
    return await good(pid)


async def failing(pid: str) -> web.Response:
    return web.Response(status=500, text="boom")


async def identity(pid: str) -> web.Response:
    return web.json_response({"pseudonym": pid})  # a registry id is no pseudonym


async def slashed(pid: str) -> web.Response:
    return web.json_response({"pseudonym": f"a/{pid}"})


async def nameless(pid: str) -> web.Response:
    return web.json_response({"id": pid})


async def test_a_slow_or_failing_service_is_unavailable_and_nothing_is_written(ledger_url: str) -> None:
    cases = [
        (slow, "did not answer within 0.5 s"),
        (failing, "answered HTTP 500"),
        (identity, "gave a registry id as a pseudonym"),
        (slashed, "not 1-64 of A-Z a-z 0-9"),
        (nameless, 'without a "pseudonym" string'),
    ]
    for answer, message in cases:
        async with (
            service(answer) as (url, asked),
            market(ledger_url, PseudonymConfig(service=url, timeout=0.5)) as (
                m,
                server,
            ),
        ):
            ctl, agg, dso = await connect(m, "CTL", "/simulation"), await connect(m, "AGG"), await connect(m, "DSO")
            await step(ctl, T - 60)
            before = server.grid.core.snapshot()
            for sio, event, payload in (
                (agg, "lem.set", lem(T, ["P1"])),
                (dso, "grid_state.set", {"time_delivery": [T, T + Q], "state": "RED"}),
                (agg, "tokens.balances", {}),  # sees every account: needs no pseudonym
            ):
                reply = await call(sio, event, payload)
                if event == "tokens.balances":
                    assert reply == {"ok": True, "balances": {}}
                    continue
                assert reply["ok"] is False and reply["error"]["code"] == "unavailable", (answer, reply)
                assert message in reply["error"]["message"] and url in reply["error"]["message"], reply
                assert "nothing was written" in reply["error"]["message"]
                assert not names_in(reply["error"]["message"]) & IDS  # the message names no id
            assert asked and server.grid.core.snapshot() == before
            for c in (ctl, agg, dso):
                await c.disconnect()
        assert grid_rows(ledger_url) == 0, answer


async def test_service_disabled_means_keyed_hmac(ledger_url: str, tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    config = PseudonymConfig(service="http://127.0.0.1:9/never", enabled=False, key_file=str(key))
    async with service(good) as (_url, asked), market(ledger_url, config) as (m, _):
        agg = await connect(m, "AGG")
        ctl = await connect(m, "CTL", "/simulation")
        await step(ctl, T - 60)
        got = await ok(agg, "lem.set", lem(T, ["P1"]))
        assert got["lem"]["players"] == [hmac_pseudonym(read_key(key), "P1")] and asked == []
        for c in (ctl, agg):
            await c.disconnect()


async def test_a_pseudonymous_auction_names_no_registry_id(ledger_url: str, tmp_path: Path) -> None:
    """`[parity.pseudonyms] market = true`: the auction knows every participant by its /grid
    pseudonym (book, fills, readings, rounds, every ledger row); a participant's own private
    messages name it by its own id; /fleet, whose batches name members by id, is refused."""
    key = tmp_path / "k.key"
    slot = T + 60
    async with market(ledger_url, PseudonymConfig(key_file=str(key), market=True)) as (m, _server):
        ps = lambda pid: hmac_pseudonym(read_key(key), pid)  # noqa: E731
        ctl = await connect(m, "CTL", "/simulation")
        p1, p2 = await connect(m, "P1", "/market"), await connect(m, "P2", "/market")
        deliveries: list[Any] = []
        p1.on("delivery", deliveries.append, namespace="/market")
        meters_and_rounds(p1, {slot: {"generation": {"solar": 1000}}}, [])
        meters_and_rounds(p2, {slot: {"consumption": {"other": {"external": 1000}}}}, [])
        status = await ctl.call("status", {}, namespace="/simulation", timeout=10)
        assert ps("P1") in status["participants"]["registered"] and "P1" not in status["participants"]["registered"]
        await step(ctl, T - 60)
        ask = {"quantity": 1000, "price": 0.05, "time_delivery": [slot, slot + 60], "source": "solar"}
        bid = {"quantity": 1000, "price": 0.20, "time_delivery": [slot, slot + 60]}
        assert (await p1.call("ask", ask, namespace="/market"))["ok"]
        assert (await p2.call("bid", bid, namespace="/market"))["ok"]
        for t in (T, slot):
            await step(ctl, t)
        assert (await step(ctl, slot + 60))["missing"] == [ps(p) for p in ("P3", "P4")]
        fleet, refusals = socketio.AsyncClient(reconnection=False), []
        fleet.on("connect_error", refusals.append, namespace="/fleet")
        with pytest.raises(socketio.exceptions.ConnectionError):
            await fleet.connect(
                m,
                namespaces=["/fleet"],
                auth={"fleet": [{"id": "P3", "token": TOKENS["P3"]}]},
                transports=["websocket"],
                wait_timeout=5,
            )
        assert "unavailable: /fleet is off while the auction trades under pseudonyms" in str(refusals)
        for c in (ctl, p1, p2):
            await c.disconnect()
    txs = [t for d in deliveries for t in d["transactions"] if t["kind"] == "p2p"]
    assert [(t["seller_id"], t["buyer_id"]) for t in txs] == [("P1", ps("P2"))]  # itself by its id, P2 by pseudonym
    fills = read_rows(ledger_url, "settlements")
    assert [(f["seller_id"], f["buyer_id"], f["quantity"]) for f in fills] == [(ps("P1"), ps("P2"), 1000)]
    for table in ("entries", "settlements", "meters", "transactions", "rounds"):
        rows = read_rows(ledger_url, table)
        assert rows, table
        names = {n for r in rows for v in r.values() if isinstance(v, str) for n in NAME.findall(v)}
        assert not names & IDS, (table, names & IDS)


async def test_a_pseudonymous_auction_refuses_another_key_on_restart(ledger_url: str, tmp_path: Path) -> None:
    """The open book was stored under the pseudonyms of one key; a restart with another
    valid key would orphan it (every participant renamed): the server does not start."""
    key = tmp_path / "k.key"
    config = PseudonymConfig(key_file=str(key), market=True)
    slot = T + 600
    async with market(ledger_url, config) as (m, _server):
        ctl, p1 = await connect(m, "CTL", "/simulation"), await connect(m, "P1", "/market")
        await step(ctl, T - 60)
        bid = {"quantity": 1000, "price": 0.20, "time_delivery": [slot, slot + 60]}
        assert (await p1.call("bid", bid, namespace="/market"))["ok"]
        await step(ctl, T)  # the entry is stored with the round
        for c in (ctl, p1):
            await c.disconnect()
    assert [e["participant_id"] for e in read_rows(ledger_url, "entries")] == [hmac_pseudonym(read_key(key), "P1")]
    key.rename(tmp_path / "right.key")
    create_key(key)
    with pytest.raises(RuntimeError, match="the pseudonym key or service changed"):
        async with market(ledger_url, config):
            pass
    key.unlink()
    (tmp_path / "right.key").rename(key)
    async with market(ledger_url, config) as (_m, server):
        assert len(server.market.book) == 1  # the right key: the book is back, under the same name
