"""The seed 002 balancing example over real socket.io (namespace /balancing, role operator)."""

from __future__ import annotations

import asyncio
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
        assert got["late"] == [{"source": "settlement", "from": "production1", "energy": 80, "label": None}]
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


SEALED = [("production1", 1337), ("seller1", 1337), ("seller1", 1338), ("production1", 1338)]
OPEN = [("production1", 1339), ("seller1", 1339)]


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
        # 1337 in the seed's order; in 1338 seller1 is sealed first, so production1's delivery is late there.
        for asset, epoch in SEALED:
            await ok(op, "balancing.seal", {"assetId": asset, "epoch": epoch})
        late = await ok(op, "balancing.addSettlement", {"meterId": "production1", "epoch": 1337, "consumption": 80})
        assert late["late"] is True
        retried = await call(
            op, "balancing.addSettlement", {"meterId": "production1", "epoch": 1337, "consumption": 500, "label": "v1"}
        )
        assert retried == first | {"duplicate": True}
        before = {k: await ok(op, "balancing.get", {"assetId": k[0], "epoch": k[1]}) for k in SEALED + OPEN}
        assert before[("seller1", 1338)]["balance"]["late"] == [
            {"source": "transfer", "from": "production1", "energy": 700, "label": None}
        ]
        assert [t["energy"] for t in before[("seller1", 1337)]["balance"]["transactions"]] == [500, 200, 200, 250, 250]
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
        # Contracts and settlements survived too: sealing the open epoch gives its preview.
        sealed = await ok(op, "balancing.seal", {"assetId": "production1", "epoch": 1339})
        assert sealed["balance"]["transactions"] == before[("production1", 1339)]["balance"]["transactions"]
        added = await ok(op, "contract.add", ppa | {"partnerId": "buyer4", "energy": 10})
        assert added["contract"]["id"] == "c4"
        await op.disconnect()
    finally:
        await kill9(proc)
    final = ledger_ids(ledger)
    assert final["balance_seals"] == sorted([*rows["balance_seals"], "s1339-production1"])
    seals = read_rows(ledger, "balance_seals")
    assert len({(r["asset_id"], r["epoch"]) for r in seals}) == len(seals)
