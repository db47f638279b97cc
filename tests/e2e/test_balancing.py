"""The seed 002 balancing example over real socket.io (namespace /balancing, role operator)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import socketio

from controller.sim import LISTENING
from ledger import open_sink
from ledger.digest import read_rows
from market.balancing.namespace import NAMESPACE
from market.balancing.seals import seal_of, verify_seal
from market.core.engine import MarketConfig
from market.core.registry import Registry
from market.server.app import MarketServer
from tests.e2e.conftest import client, refusal, serving

CONFIG = MarketConfig(duration=60, close_steps=2, round_timeout=2.0)
TOKENS = {"OP": "tok-op", "P1": "tok-p1", "CTL": "tok-ctl"}
ROLE_OF = {"OP": "operator", "P1": "prosumer", "CTL": "controller"}
SEED_TRANSACTIONS = [
    {"from": "production1", "to": "seller1", "energy": 500},
    {"from": "seller1", "to": "bigbalancer", "energy": 500},
    {"from": "seller1", "to": "buyer1", "energy": 200},
    {"from": "bigbalancer", "to": "seller1", "energy": 200},
]


def registry() -> Registry:
    return Registry.from_dict({"participants": [{"id": p, "token": t, "role": ROLE_OF[p]} for p, t in TOKENS.items()]})


@asynccontextmanager
async def running(ledger_url: str) -> AsyncIterator[tuple[str, MarketServer]]:
    server = MarketServer(CONFIG, registry(), open_sink(ledger_url))
    async with serving(server) as url:
        yield url, server


async def call(sio: socketio.AsyncClient, event: str, payload: Any) -> dict[str, Any]:
    reply: dict[str, Any] = await sio.call(event, payload, namespace=NAMESPACE, timeout=10)
    return reply


async def ok(sio: socketio.AsyncClient, event: str, payload: Any) -> dict[str, Any]:
    reply = await call(sio, event, payload)
    assert reply["ok"] is True, (event, payload, reply)
    return reply


async def test_seed_example_over_socketio(ledger_url: str) -> None:
    async with running(ledger_url) as (url, _server):
        op = await client(url, "OP", NAMESPACE, token=TOKENS["OP"])
        # The seed's 5_balancing.js, call by call.
        asset = await ok(
            op, "asset.upsert", {"assetId": "production1", "type": "balance", "balancerule": {"to": "seller1"}}
        )
        assert asset["asset"] == {"assetId": "production1", "type": "balance", "balancerule": {"to": "seller1"}}
        await ok(
            op,
            "asset.upsert",
            {"assetId": "seller1", "type": "balance", "balancerule": {"from": "bigbalancer", "to": "bigbalancer"}},
        )
        contract = await ok(
            op,
            "contract.add",
            {
                "assetId": "seller1",
                "partnerId": "buyer1",
                "direction": "to",
                "status": "active",
                "energy": 200,
                "load_min": 0,
                "load_max": 20000,
                "balanced": 0,
            },
        )
        assert contract["contract"]["id"] and contract["contract"]["energy"] == 200
        settled = await ok(
            op,
            "balancing.addSettlement",
            {"meterId": "production1", "epoch": 1337, "consumption": 500, "label": "virtual_1"},
        )
        assert settled == {"ok": True, "late": False}
        production = (await ok(op, "balancing.seal", {"assetId": "production1", "epoch": 1337}))["balance"]
        seller = (await ok(op, "balancing.seal", {"assetId": "seller1", "epoch": 1337}))["balance"]

        assert production["transactions"] + seller["transactions"] == SEED_TRANSACTIONS
        # A third party checks the seals with nothing but the replies.
        assert verify_seal(production) and verify_seal(seller)
        assert seller["seal"] == seal_of("seller1", 1337, SEED_TRANSACTIONS[1:])

        # Sealed is final: a late settlement is kept apart and the balance stays as sealed.
        late = await ok(op, "balancing.addSettlement", {"meterId": "production1", "epoch": 1337, "consumption": 80})
        assert late["late"] is True
        got = (await ok(op, "balancing.get", {"assetId": "production1", "epoch": 1337}))["balance"]
        assert got["transactions"] == production["transactions"] and got["seal"] == production["seal"]
        assert got["late"] == [
            {"source": "settlement", "from": "production1", "to": "production1", "energy": 80, "label": None}
        ]
        assert verify_seal(got)
        again = await call(op, "balancing.seal", {"assetId": "seller1", "epoch": 1337})
        assert again["ok"] is False and again["error"]["code"] == "closed"
        await op.disconnect()

    # The sealed transactions are durable in the ledger, and the seal checks from the rows.
    rows = read_rows(ledger_url, "balance_transactions")
    by_asset = {
        asset: [r for r in sorted(rows, key=lambda r: r["seq"]) if r["asset_id"] == asset]
        for asset in ("production1", "seller1")
    }
    ledger_txs = [{"from": r["from_id"], "to": r["to_id"], "energy": r["energy"]} for r in by_asset["production1"]]
    ledger_txs += [{"from": r["from_id"], "to": r["to_id"], "energy": r["energy"]} for r in by_asset["seller1"]]
    assert ledger_txs == SEED_TRANSACTIONS
    assert [r["id"] for r in by_asset["seller1"]] == ["b1337-seller1-0", "b1337-seller1-1", "b1337-seller1-2"]
    seals = {r["asset_id"]: r["seal"] for r in read_rows(ledger_url, "balance_seals")}
    assert seals == {"production1": production["seal"], "seller1": seller["seal"]}
    assert seals["seller1"] == seal_of("seller1", 1337, SEED_TRANSACTIONS[1:])


async def test_bad_events_are_refused_and_change_nothing(ledger_url: str) -> None:
    async with running(ledger_url) as (url, server):
        op = await client(url, "OP", NAMESPACE, token=TOKENS["OP"])
        await ok(op, "asset.upsert", {"assetId": "seller1", "type": "balance", "balancerule": {"to": "bigbalancer"}})
        before = await ok(op, "balancing.get", {"assetId": "seller1", "epoch": 7})
        bad: list[tuple[str, Any, str]] = [
            ("asset.upsert", {"assetId": "seller1", "type": "balance", "balancerule": {"to": "seller1"}}, "invalid"),
            ("asset.upsert", {"assetId": "seller1", "type": "balance", "extra": 1}, "invalid"),
            ("contract.add", {"assetId": "seller1", "partnerId": "b", "direction": "to"}, "invalid"),
            ("contract.update", {"id": "c9", "energy": 5}, "not_found"),
            ("contract.cancel", {"id": "c9"}, "not_found"),
            ("balancing.addSettlement", {"meterId": "seller1", "epoch": 7, "consumption": True}, "invalid"),
            ("balancing.addSettlement", {"meterId": "seller1", "epoch": 7, "consumption": -1}, "invalid"),
            ("balancing.addSettlement", "not an object", "invalid"),
            ("balancing.seal", {"assetId": "nobody", "epoch": 7}, "not_found"),
            ("balancing.get", {"assetId": "seller1"}, "invalid"),
            ("asset_upsert", {"assetId": "x", "type": "balance"}, "invalid"),  # only the dotted name exists
            ("balancing.nonsense", {}, "invalid"),
        ]
        for event, payload, code in bad:
            reply = await call(op, event, payload)
            assert reply["ok"] is False and reply["error"]["code"] == code, (event, reply)
        assert await ok(op, "balancing.get", {"assetId": "seller1", "epoch": 7}) == before
        # An event whose journal record cannot be made durable is refused and undone.
        write = server.sink.write

        async def failing(_batch: Any) -> None:
            raise OSError("disk full")

        server.sink.write = failing  # type: ignore[method-assign]
        for event, payload in (
            ("asset.upsert", {"assetId": "buyer1", "type": "balance"}),
            ("balancing.addSettlement", {"meterId": "seller1", "epoch": 7, "consumption": 5}),
            ("balancing.seal", {"assetId": "seller1", "epoch": 7}),
        ):
            reply = await call(op, event, payload)
            assert reply["ok"] is False and reply["error"]["code"] == "unavailable", (event, reply)
        server.sink.write = write  # type: ignore[method-assign]
        assert (await call(op, "balancing.get", {"assetId": "buyer1", "epoch": 7}))["error"]["code"] == "not_found"
        assert await ok(op, "balancing.get", {"assetId": "seller1", "epoch": 7}) == before
        await op.disconnect()


async def seed_setup(op: socketio.AsyncClient) -> None:
    """The seed's 5_balancing.js up to its seals."""
    await ok(op, "asset.upsert", {"assetId": "production1", "type": "balance", "balancerule": {"to": "seller1"}})
    await ok(
        op,
        "asset.upsert",
        {"assetId": "seller1", "type": "balance", "balancerule": {"from": "bigbalancer", "to": "bigbalancer"}},
    )
    ppa = {"assetId": "seller1", "partnerId": "buyer1", "direction": "to", "status": "active", "energy": 200}
    await ok(op, "contract.add", ppa | {"load_min": 0, "load_max": 20000, "balanced": 0})
    await ok(
        op,
        "balancing.addSettlement",
        {"meterId": "production1", "epoch": 1337, "consumption": 500, "label": "virtual_1"},
    )


async def test_sealing_seller1_first_seals_production1_first_and_gives_the_four_transactions(ledger_url: str) -> None:
    async with running(ledger_url) as (url, _server):
        op = await client(url, "OP", NAMESPACE, token=TOKENS["OP"])
        await seed_setup(op)
        reply = await ok(op, "balancing.seal", {"assetId": "seller1", "epoch": 1337})
        # production1 is an input of seller1: sealed first, in the same request, and listed.
        assert [b["assetId"] for b in reply["inputs"]] == ["production1"]
        assert reply["inputs"][0]["transactions"] + reply["balance"]["transactions"] == SEED_TRANSACTIONS
        assert verify_seal(reply["inputs"][0]) and verify_seal(reply["balance"])
        again = await call(op, "balancing.seal", {"assetId": "production1", "epoch": 1337})
        assert again["ok"] is False and again["error"]["code"] == "closed"
        got = (await ok(op, "balancing.get", {"assetId": "production1", "epoch": 1337}))["balance"]
        assert got == reply["inputs"][0]
        await op.disconnect()
    rows = sorted(
        read_rows(ledger_url, "balance_transactions"), key=lambda r: (r["asset_id"] != "production1", r["seq"])
    )
    assert [{"from": r["from_id"], "to": r["to_id"], "energy": r["energy"]} for r in rows] == SEED_TRANSACTIONS


async def test_an_unbalanced_point_is_refused_over_socketio(ledger_url: str) -> None:
    async with running(ledger_url) as (url, _server):
        op = await client(url, "OP", NAMESPACE, token=TOKENS["OP"])
        await seed_setup(op)
        await ok(op, "asset.upsert", {"assetId": "buyer1", "type": "balance", "balancerule": {"from": "bigbalancer"}})
        reply = await call(op, "balancing.seal", {"assetId": "buyer1", "epoch": 1337})
        assert reply["ok"] is False and reply["error"]["code"] == "invalid", reply
        assert "buyer1" in reply["error"]["message"] and "200" in reply["error"]["message"]
        preview = (await ok(op, "balancing.get", {"assetId": "buyer1", "epoch": 1337}))["balance"]
        assert preview["sealed"] is False and preview["imbalance"] == 200
        for asset in ("production1", "seller1"):  # nothing was sealed, inputs included
            assert (await ok(op, "balancing.get", {"assetId": asset, "epoch": 1337}))["balance"]["sealed"] is False
        await op.disconnect()
    assert read_rows(ledger_url, "balance_seals") == []


def ppa_of(partner: str, energy: int, priority: int) -> dict[str, Any]:
    return {
        "assetId": "seller1",
        "partnerId": partner,
        "direction": "to",
        "status": "active",
        "energy": energy,
        "load_min": 0,
        "load_max": 20000,
        "priority": priority,
    }


def deliveries(balance: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (t["to"], t["energy"]) for t in balance["transactions"] if t["from"] == "seller1" and t["to"] != "bigbalancer"
    ]


async def test_merit_order_over_socketio(ledger_url: str) -> None:
    async with running(ledger_url) as (url, server):
        op = await client(url, "OP", NAMESPACE, token=TOKENS["OP"])
        await ok(
            op,
            "asset.upsert",
            {"assetId": "seller1", "type": "balance", "balancerule": {"from": "bigbalancer", "to": "bigbalancer"}},
        )
        for n in (1, 2, 3):
            await ok(op, "contract.add", ppa_of(f"buyer{n}", 200, n))
        for epoch in (1, 2, 3):
            await ok(op, "balancing.addSettlement", {"meterId": "seller1", "epoch": epoch, "consumption": 500})
        ref = {"assetId": "seller1"}
        assert await ok(op, "meritorder.list", ref) == {
            "ok": True,
            "meritorder": {"assetId": "seller1", "order": ["c1", "c2", "c3"], "unlisted": []},
        }
        reordered = await ok(op, "meritorder.reorder", ref | {"order": ["c3", "c1", "c2"]})
        assert reordered["meritorder"]["order"] == ["c3", "c1", "c2"]
        assert (await ok(op, "meritorder.list", ref))["meritorder"]["order"] == ["c3", "c1", "c2"]
        first = (await ok(op, "balancing.seal", ref | {"epoch": 1}))["balance"]
        assert deliveries(first) == [("buyer3", 200), ("buyer1", 200), ("buyer2", 100)]
        assert first["meritorder"] == ["c3", "c1", "c2"]
        removed = await ok(op, "meritorder.remove", ref | {"id": "c1"})
        assert removed["meritorder"] == {"assetId": "seller1", "order": ["c3", "c2"], "unlisted": ["c1"]}
        second = (await ok(op, "balancing.seal", ref | {"epoch": 2}))["balance"]
        assert deliveries(second) == [("buyer3", 200), ("buyer2", 200)]
        added = await ok(op, "meritorder.add", ref | {"id": "c1", "position": 0})
        assert added["meritorder"]["order"] == ["c1", "c3", "c2"]
        assert (await ok(op, "meritorder.list", ref))["meritorder"]["order"] == ["c1", "c3", "c2"]

        # Bad input: a clear error, and nothing changes (the list and the ledger stay as they are).
        before = await ok(op, "meritorder.list", ref)
        journal = len(read_rows(ledger_url, "balance_events"))
        bad: list[tuple[str, Any, str]] = [
            ("meritorder.add", ref | {"id": "c99"}, "not_found"),  # unknown PPA
            ("meritorder.add", ref | {"id": "c1"}, "conflict"),  # already on the list
            ("meritorder.add", {"assetId": "nobody", "id": "c1"}, "not_found"),
            ("meritorder.add", ref | {"id": "c1", "position": -1}, "invalid"),
            ("meritorder.remove", ref | {"id": "c99"}, "not_found"),
            ("meritorder.reorder", ref | {"order": ["c1", "c3"]}, "invalid"),  # c2 missing
            ("meritorder.reorder", ref | {"order": ["c1", "c3", "c2", "c4"]}, "invalid"),  # c4 extra
            ("meritorder.reorder", ref | {"order": ["c1", "c3", "c3"]}, "invalid"),
            ("meritorder.reorder", ref | {"order": "c1"}, "invalid"),
            ("meritorder.list", {"assetId": "seller1", "extra": True}, "invalid"),
            ("meritorder.list", {"assetId": "nobody"}, "not_found"),
            ("meritorder_list", ref, "invalid"),
        ]
        for event, payload, code in bad:
            reply = await call(op, event, payload)
            assert reply["ok"] is False and reply["error"]["code"] == code, (event, payload, reply)
            assert reply["error"]["message"], reply
        assert await ok(op, "meritorder.list", ref) == before
        assert len(read_rows(ledger_url, "balance_events")) == journal

        # Durable before acknowledged: a change whose journal record cannot be stored is undone.
        write = server.sink.write

        async def failing(_batch: Any) -> None:
            raise OSError("disk full")

        server.sink.write = failing  # type: ignore[method-assign]
        reply = await call(op, "meritorder.reorder", ref | {"order": ["c2", "c3", "c1"]})
        assert reply["ok"] is False and reply["error"]["code"] == "unavailable", reply
        server.sink.write = write  # type: ignore[method-assign]
        assert await ok(op, "meritorder.list", ref) == before
        third = (await ok(op, "balancing.seal", ref | {"epoch": 3}))["balance"]
        assert deliveries(third) == [("buyer1", 200), ("buyer3", 200), ("buyer2", 100)]

        # The seals recorded the order they used, in the journal on the ledger.
        seals = [
            json.loads(r["payload"])
            for r in sorted(read_rows(ledger_url, "balance_events"), key=lambda r: r["seq"])
            if r["event"] == "balancing.seal"
        ]
        assert [(s["epoch"], s["meritorder"]) for s in seals] == [
            (1, ["c3", "c1", "c2"]),
            (2, ["c3", "c2"]),
            (3, ["c1", "c3", "c2"]),
        ]
        assert [s["seal"] for s in seals] == [first["seal"], second["seal"], third["seal"]]

        # Roles are checked on every merit order event, not only at connect.
        ns = next(n for n in server.namespaces if n.NAME == NAMESPACE)
        ns.sessions.add("not-an-operator", "P1", "prosumer")
        for event, payload in (("meritorder.list", ref), ("meritorder.reorder", ref | {"order": ["c1", "c3", "c2"]})):
            reply = await ns.trigger_event(event, "not-an-operator", payload)
            assert reply["ok"] is False and reply["error"]["code"] == "forbidden", reply
        ns.sessions.remove("not-an-operator")
        assert await ok(op, "meritorder.list", ref) == before
        await op.disconnect()


async def test_only_operators_may_use_balancing(ledger_url: str) -> None:
    async with running(ledger_url) as (url, _server):
        for pid in ("P1", "CTL"):
            message = await refusal(url, pid, NAMESPACE, token=TOKENS[pid])
            assert message.startswith("unauthorized"), message
        assert (await refusal(url, "OP", NAMESPACE, token="wrong")).startswith("unauthorized")


# -- restart: state survives kill -9 of a subprocess server ------------------------------------


async def start_market(tmp: Path, ledger: str) -> tuple[asyncio.subprocess.Process, str]:
    """`microte market` as a subprocess on an ephemeral port, on `ledger`; returns it and its URL."""
    reg = tmp / "registry.toml"
    reg.write_text(
        "".join(f'[[participants]]\nid = "{p}"\ntoken = "{t}"\nrole = "{ROLE_OF[p]}"\n' for p, t in TOKENS.items())
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "controller", "market", "--registry", str(reg), "--port", "0", "--ledger", ledger),
        *("--duration", str(CONFIG.duration), "--log-level", "WARNING"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert line.startswith(LISTENING), line
    return proc, line.removeprefix(LISTENING).strip()


async def kill9(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


def ledger_ids(ledger: str) -> dict[str, list[str]]:
    return {t: sorted(r["id"] for r in read_rows(ledger, t)) for t in ("balance_transactions", "balance_seals")}


# Sealed by request, in this order; seller1's 1338 seals production1's 1338 first (its input).
SEALED = [("production1", 1337), ("seller1", 1337), ("production1", 1338), ("seller1", 1338), ("production2", 1338)]
OPEN = [("production1", 1339), ("seller1", 1339)]
REQUESTS = [("production1", 1337), ("seller1", 1337), ("seller1", 1338)]


async def test_state_survives_a_kill9_restart_and_a_reseal_writes_nothing(tmp_path: Path) -> None:
    ledger = f"sqlite:///{tmp_path}/ledger.db"
    proc, url = await start_market(tmp_path, ledger)
    try:
        op = await client(url, "OP", NAMESPACE, token=TOKENS["OP"])
        await ok(op, "asset.upsert", {"assetId": "production1", "type": "balance", "balancerule": {"to": "seller1"}})
        await ok(
            op,
            "asset.upsert",
            {"assetId": "seller1", "type": "balance", "balancerule": {"from": "bigbalancer", "to": "bigbalancer"}},
        )
        ppa = {"assetId": "seller1", "direction": "to", "status": "active", "load_min": 0, "load_max": 20000}
        await ok(op, "contract.add", ppa | {"partnerId": "buyer1", "energy": 200, "priority": 1})
        await ok(op, "contract.add", ppa | {"partnerId": "buyer2", "energy": 300, "priority": 2})
        await ok(op, "contract.add", ppa | {"partnerId": "buyer3", "energy": 100})
        await ok(op, "contract.update", {"id": "c2", "energy": 250})
        await ok(op, "contract.cancel", {"id": "c3"})
        first = await ok(
            op, "balancing.addSettlement", {"meterId": "production1", "epoch": 1337, "consumption": 500, "label": "v1"}
        )
        for epoch, wh in ((1338, 700), (1339, 400)):
            await ok(op, "balancing.addSettlement", {"meterId": "production1", "epoch": epoch, "consumption": wh})
        ref = {"assetId": "seller1"}
        for asset, epoch in REQUESTS:
            if (asset, epoch) == ("seller1", 1338):  # the merit order changes between the epochs
                await ok(op, "meritorder.reorder", ref | {"order": ["c2", "c1"]})
            await ok(op, "balancing.seal", {"assetId": asset, "epoch": epoch})
        # A source added after seller1's 1338 was sealed: its delivery is late there.
        await ok(op, "asset.upsert", {"assetId": "production2", "type": "balance", "balancerule": {"to": "seller1"}})
        await ok(op, "balancing.addSettlement", {"meterId": "production2", "epoch": 1338, "consumption": 60})
        await ok(op, "balancing.seal", {"assetId": "production2", "epoch": 1338})
        await ok(op, "meritorder.remove", ref | {"id": "c1"})
        late = await ok(op, "balancing.addSettlement", {"meterId": "production1", "epoch": 1337, "consumption": 80})
        assert late["late"] is True
        retried = await call(
            op, "balancing.addSettlement", {"meterId": "production1", "epoch": 1337, "consumption": 500, "label": "v1"}
        )
        assert retried == first | {"duplicate": True}
        before = {k: await ok(op, "balancing.get", {"assetId": k[0], "epoch": k[1]}) for k in SEALED + OPEN}
        order = await ok(op, "meritorder.list", ref)
        assert order["meritorder"] == {"assetId": "seller1", "order": ["c2"], "unlisted": ["c1"]}
        assert before[("seller1", 1338)]["balance"]["late"] == [
            {"source": "transfer", "from": "production2", "to": "seller1", "energy": 60, "label": None}
        ]
        assert [t["energy"] for t in before[("seller1", 1337)]["balance"]["transactions"]] == [500, 200, 200, 250, 250]
        seller_1338 = before[("seller1", 1338)]["balance"]
        assert [t["energy"] for t in seller_1338["transactions"]] == [700, 250, 250, 200, 200]
        assert seller_1338["meritorder"] == ["c2", "c1"]
        assert before[("production1", 1339)]["balance"]["sealed"] is False
        reseal = {k: await call(op, "balancing.seal", {"assetId": k[0], "epoch": k[1]}) for k in SEALED}
        assert all(r["ok"] is False and r["error"]["code"] == "closed" for r in reseal.values()), reseal
        rows = ledger_ids(ledger)
        await kill9(proc)  # no graceful shutdown, no flush
        await op.disconnect()

        proc, url = await start_market(tmp_path, ledger)
        op = await client(url, "OP", NAMESPACE, token=TOKENS["OP"])
        after = {k: await call(op, "balancing.get", {"assetId": k[0], "epoch": k[1]}) for k in SEALED + OPEN}
        assert after == before
        assert all(verify_seal(after[k]["balance"]) for k in SEALED)
        assert await call(op, "meritorder.list", ref) == order  # the merit order survived
        # The operator upserts its assets again, as after any restart: sealed stays sealed,
        # a re-seal is answered as the first time was and stores nothing.
        await ok(op, "asset.upsert", {"assetId": "production1", "type": "balance", "balancerule": {"to": "seller1"}})
        for k in SEALED:
            assert await call(op, "balancing.seal", {"assetId": k[0], "epoch": k[1]}) == reseal[k]
        assert ledger_ids(ledger) == rows
        again = await call(
            op, "balancing.addSettlement", {"meterId": "production1", "epoch": 1337, "consumption": 500, "label": "v1"}
        )
        assert again == retried
        # Contracts, settlements and the merit order survived too: sealing the open epoch
        # (its input first) gives its preview, with the order of before the restart.
        sealed = await ok(op, "balancing.seal", {"assetId": "seller1", "epoch": 1339})
        # Both sources are inputs; production2 metered nothing in 1339 and seals empty.
        assert [(b["assetId"], b["transactions"]) for b in sealed["inputs"]] == [
            ("production1", before[("production1", 1339)]["balance"]["transactions"]),
            ("production2", []),
        ]
        assert sealed["balance"]["transactions"] == before[("seller1", 1339)]["balance"]["transactions"]
        assert sealed["balance"]["meritorder"] == ["c2"]
        assert deliveries(sealed["balance"]) == [("buyer2", 250)]
        added = await ok(op, "contract.add", ppa | {"partnerId": "buyer4", "energy": 10})
        assert added["contract"]["id"] == "c4"
        assert (await ok(op, "meritorder.list", ref))["meritorder"]["order"] == ["c4", "c2"]
        await op.disconnect()
    finally:
        await kill9(proc)
    final = ledger_ids(ledger)
    assert final["balance_seals"] == sorted(
        [*rows["balance_seals"], "s1339-production1", "s1339-production2", "s1339-seller1"]
    )
    seals = read_rows(ledger, "balance_seals")
    assert len({(r["asset_id"], r["epoch"]) for r in seals}) == len(seals)
