"""Helpers of the balancing core tests: the seed 002 example and short builders."""

from __future__ import annotations

from typing import Any

from market.balancing.balance import Balancing
from market.balancing.messages import AddSettlementMsg, AssetUpsertMsg, ContractAddMsg
from market.balancing.state import Flow
from market.core.protocol import decode

EPOCH = 1337


def flows(*triples: tuple[str, str, int]) -> tuple[Flow, ...]:
    return tuple(Flow(f, t, e) for f, t, e in triples)


def upsert(core: Balancing, asset: str, **rule: str) -> dict[str, Any]:
    return core.upsert_asset(decode({"assetId": asset, "type": "balance", "balancerule": rule}, AssetUpsertMsg))


def ppa(core: Balancing, asset: str, partner: str, energy: int, **extra: Any) -> str:
    payload = {
        "assetId": asset,
        "partnerId": partner,
        "direction": "to",
        "status": "active",
        "energy": energy,
        "load_min": 0,
        "load_max": 20000,
        **extra,
    }
    return str(core.add_contract(decode(payload, ContractAddMsg))["contract"]["id"])


def settle(core: Balancing, meter: str, energy: int, epoch: int = EPOCH, label: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"meterId": meter, "epoch": epoch, "consumption": energy}
    if label is not None:
        payload["label"] = label
    return core.add_settlement(decode(payload, AddSettlementMsg))


def balancer(core: Balancing, asset: str = "seller1", by: str = "bigbalancer") -> None:
    upsert(core, asset, **{"from": by, "to": by})


def seed_example() -> Balancing:
    """The worked example of seed 002, step by step, with its exact payloads."""
    core = Balancing()
    upsert(core, "production1", to="seller1")
    upsert(core, "seller1", **{"from": "bigbalancer", "to": "bigbalancer"})
    contract = {
        "assetId": "seller1",
        "partnerId": "buyer1",
        "direction": "to",
        "status": "active",
        "energy": 200,
        "load_min": 0,
        "load_max": 20000,
        "balanced": 0,
    }
    core.add_contract(decode(contract, ContractAddMsg))
    reply = core.add_settlement(
        decode({"meterId": "production1", "epoch": 1337, "consumption": 500, "label": "virtual_1"}, AddSettlementMsg)
    )
    assert reply == {"late": False}
    return core


SEED_TRANSACTIONS = flows(
    ("production1", "seller1", 500),
    ("seller1", "bigbalancer", 500),
    ("seller1", "buyer1", 200),
    ("bigbalancer", "seller1", 200),
)


def net(core: Balancing, asset: str, assets: list[str], epoch: int = EPOCH) -> int:
    """What `asset` holds at the end of `epoch`: its metered energy plus every transaction
    into it minus every transaction out of it, over the sealed balances of `assets` in
    that epoch (0: balanced)."""
    total = core.metered(asset, epoch)
    for a in assets:
        balance = core.balance(a, epoch)
        if balance.sealed:
            for f in balance.transactions:
                total += (f.to == asset) * f.energy - (f.from_ == asset) * f.energy
    return total
