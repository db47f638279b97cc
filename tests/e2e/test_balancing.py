"""The seed 002 balancing example over real socket.io (namespace /balancing, role operator)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import socketio

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
    async with running(ledger_url) as (url, _server):
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
        await op.disconnect()


async def test_only_operators_may_use_balancing(ledger_url: str) -> None:
    async with running(ledger_url) as (url, _server):
        for pid in ("P1", "CTL"):
            message = await refusal(url, pid, NAMESPACE, token=TOKENS[pid])
            assert message.startswith("unauthorized"), message
        assert (await refusal(url, "OP", NAMESPACE, token="wrong")).startswith("unauthorized")
