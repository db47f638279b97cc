"""EAF balancing (seed 002): the merit order list of PPAs, as the seed's `meritorder` service
manages it: list, add, remove, reorder; sealing uses and records the order of the moment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from market.balancing.balance import Balancing
from market.balancing.messages import (
    ContractCancelMsg,
    ContractUpdateMsg,
    MeritOrderAddMsg,
    MeritOrderRefMsg,
    MeritOrderRemoveMsg,
    MeritOrderReorderMsg,
)
from market.core.errors import MarketError
from market.core.protocol import decode
from market.core.records import BalanceEventRecord
from tests.market.balancing.eaf import EPOCH, balancer, ppa, settle, upsert


def listed(core: Balancing, asset: str = "seller1") -> dict[str, Any]:
    reply: dict[str, Any] = core.meritorder_list(decode({"assetId": asset}, MeritOrderRefMsg))["meritorder"]
    return reply


def add(core: Balancing, cid: str, asset: str = "seller1", **extra: Any) -> dict[str, Any]:
    reply: dict[str, Any] = core.meritorder_add(decode({"assetId": asset, "id": cid, **extra}, MeritOrderAddMsg))
    return reply


def remove(core: Balancing, cid: str, asset: str = "seller1") -> dict[str, Any]:
    reply: dict[str, Any] = core.meritorder_remove(decode({"assetId": asset, "id": cid}, MeritOrderRemoveMsg))
    return reply


def reorder(core: Balancing, order: list[Any], asset: str = "seller1") -> dict[str, Any]:
    reply: dict[str, Any] = core.meritorder_reorder(decode({"assetId": asset, "order": order}, MeritOrderReorderMsg))
    return reply


def served(core: Balancing, epoch: int, asset: str = "seller1") -> list[tuple[str, int]]:
    """The PPA deliveries of the asset's sealed balance, in order."""
    balance = core.seal(asset, epoch)
    return [(f.to, f.energy) for f in balance.transactions if f.from_ == asset and f.to != "bigbalancer"]


def three_ppas() -> Balancing:
    """Three PPAs of 200 at priorities 1, 2, 3 (c1, c2, c3) and 500 metered in epochs 1 to 5."""
    core = Balancing()
    balancer(core)
    for n in (1, 2, 3):
        ppa(core, "seller1", f"buyer{n}", 200, priority=n)
    for epoch in range(1, 6):
        settle(core, "seller1", 500, epoch=epoch)
    return core


def test_contract_add_places_a_ppa_by_priority_then_age() -> None:
    core = Balancing()
    balancer(core)
    ppa(core, "seller1", "b3", 200, priority=3)
    ppa(core, "seller1", "b1", 200, priority=1)
    ppa(core, "seller1", "b1bis", 200, priority=1)
    ppa(core, "seller1", "off", 200, status="cancelled")
    assert listed(core) == {"assetId": "seller1", "order": ["c2", "c3", "c1"], "unlisted": []}
    assert [c.id for c in core.merit_order("seller1")] == ["c2", "c3", "c1"]
    upsert(core, "seller2", to="x")
    assert listed(core, "seller2") == {"assetId": "seller2", "order": [], "unlisted": []}


def test_list_add_remove_reorder_round_trip_and_change_the_allocation() -> None:
    core = three_ppas()
    assert listed(core)["order"] == ["c1", "c2", "c3"]
    assert served(core, 1) == [("buyer1", 200), ("buyer2", 200), ("buyer3", 100)]

    assert reorder(core, ["c3", "c1", "c2"]) == {
        "meritorder": {"assetId": "seller1", "order": ["c3", "c1", "c2"], "unlisted": []}
    }
    assert listed(core)["order"] == ["c3", "c1", "c2"]
    assert served(core, 2) == [("buyer3", 200), ("buyer1", 200), ("buyer2", 100)]

    assert remove(core, "c1")["meritorder"] == {"assetId": "seller1", "order": ["c3", "c2"], "unlisted": ["c1"]}
    assert listed(core) == {"assetId": "seller1", "order": ["c3", "c2"], "unlisted": ["c1"]}
    assert served(core, 3) == [("buyer3", 200), ("buyer2", 200)]  # c1 is active but not applied

    assert add(core, "c1", position=0)["meritorder"]["order"] == ["c1", "c3", "c2"]
    assert listed(core) == {"assetId": "seller1", "order": ["c1", "c3", "c2"], "unlisted": []}
    assert served(core, 4) == [("buyer1", 200), ("buyer3", 200), ("buyer2", 100)]

    # Without a position a PPA goes where its priority puts it: before the first of a higher one.
    remove(core, "c2")
    assert add(core, "c2")["meritorder"]["order"] == ["c1", "c2", "c3"]
    assert served(core, 5) == [("buyer1", 200), ("buyer2", 200), ("buyer3", 100)]
    # Sealed balances keep the order they were sealed with.
    assert [core.balance("seller1", e).meritorder for e in range(1, 6)] == [
        ("c1", "c2", "c3"),
        ("c3", "c1", "c2"),
        ("c3", "c2"),
        ("c1", "c3", "c2"),
        ("c1", "c2", "c3"),
    ]


def test_cancel_takes_a_ppa_off_and_a_new_priority_moves_it() -> None:
    core = three_ppas()
    reorder(core, ["c3", "c2", "c1"])
    core.update_contract(decode({"id": "c1", "energy": 150}, ContractUpdateMsg))
    assert listed(core)["order"] == ["c3", "c2", "c1"]  # other fields leave its place alone
    core.update_contract(decode({"id": "c1", "priority": 0}, ContractUpdateMsg))
    assert listed(core)["order"] == ["c1", "c3", "c2"]  # a new priority places it anew
    core.cancel_contract(decode({"id": "c3"}, ContractCancelMsg))
    assert listed(core) == {"assetId": "seller1", "order": ["c1", "c2"], "unlisted": []}


def test_seal_records_the_merit_order_it_used() -> None:
    core = three_ppas()
    reorder(core, ["c2", "c3", "c1"])
    remove(core, "c3")
    core.take_records()
    balance = core.seal("seller1", 1)
    assert balance.meritorder == ("c2", "c1") and balance.wire()["meritorder"] == ["c2", "c1"]
    journal = [r for r in core.take_records() if isinstance(r, BalanceEventRecord)]
    assert [(r.event, msgspec.json.decode(r.payload)) for r in journal] == [
        ("balancing.seal", {"assetId": "seller1", "epoch": 1, "meritorder": ["c2", "c1"], "seal": balance.seal})
    ]
    # A preview shows the order a seal would use now.
    reorder(core, ["c1", "c2"])
    assert core.balance("seller1", 2).meritorder == ("c1", "c2")
    assert core.balance("seller1", 1).meritorder == ("c2", "c1")


def test_merit_order_changes_are_journalled_and_survive_a_restore() -> None:
    core = three_ppas()
    reorder(core, ["c3", "c1", "c2"])
    remove(core, "c2")
    add(core, "c2", position=1)
    core.seal("seller1", 1)
    written = core.take_records()
    events = [r.event for r in written if isinstance(r, BalanceEventRecord)]
    assert events[-4:] == ["meritorder.reorder", "meritorder.remove", "meritorder.add", "balancing.seal"]
    resumed = Balancing()
    resumed.restore(written)
    assert resumed.snapshot() == core.snapshot()
    assert listed(resumed) == listed(core) == {"assetId": "seller1", "order": ["c3", "c2", "c1"], "unlisted": []}
    assert resumed.balance("seller1", 1) == core.balance("seller1", 1)
    assert served(resumed, 2) == served(core, 2) == [("buyer3", 200), ("buyer2", 200), ("buyer1", 100)]


# -- bad input is refused and changes nothing -----------------------------------------------------


def refused(core: Balancing, code: str, action: Callable[[], Any], *words: str) -> None:
    core.take_records()
    before = core.snapshot()
    with pytest.raises(MarketError) as info:
        action()
    assert info.value.code == code, info.value
    assert all(w in info.value.message for w in words), info.value.message
    assert core.snapshot() == before and core.take_records() == []


def test_bad_merit_order_requests_are_refused_and_change_nothing() -> None:
    core = three_ppas()
    upsert(core, "seller2", to="x")
    other = ppa(core, "seller2", "buyer9", 10)
    remove(core, "c3")
    refused(core, "not_found", lambda: listed(core, "nobody"), "nobody")
    refused(core, "not_found", lambda: add(core, "c99"), "c99")  # unknown PPA
    refused(core, "not_found", lambda: add(core, "c1", asset="nobody"), "nobody")
    refused(core, "not_found", lambda: remove(core, "c99"), "c99")
    refused(core, "conflict", lambda: add(core, "c1"), "c1", "already")  # a duplicate
    refused(core, "invalid", lambda: add(core, other), other, "seller2")  # another asset's PPA
    refused(core, "invalid", lambda: remove(core, other), other, "seller2")
    refused(core, "not_found", lambda: remove(core, "c3"), "c3")  # not on the list
    refused(core, "invalid", lambda: add(core, "c3", position=3), "position")  # past the end
    refused(core, "invalid", lambda: reorder(core, ["c2"]), "c1")  # a missing id
    refused(core, "invalid", lambda: reorder(core, ["c2", "c1", "c3"]), "c3")  # an extra id
    refused(core, "invalid", lambda: reorder(core, ["c2", "c1", "c99"]), "c99")
    refused(core, "invalid", lambda: reorder(core, ["c1", "c1"]), "c1", "twice")
    refused(core, "not_found", lambda: reorder(core, [], asset="nobody"), "nobody")
    core.cancel_contract(decode({"id": "c3"}, ContractCancelMsg))
    refused(core, "closed", lambda: add(core, "c3"), "c3", "cancelled")
    # Reordering to the same order is accepted and writes nothing.
    core.take_records()
    assert reorder(core, ["c1", "c2"])["meritorder"]["order"] == ["c1", "c2"]
    assert core.take_records() == []


INVALID: list[tuple[type[Any], Any]] = [
    (MeritOrderRefMsg, {}),
    (MeritOrderRefMsg, {"assetId": "a b"}),
    (MeritOrderRefMsg, {"assetId": "seller1", "extra": 1}),
    (MeritOrderAddMsg, {"assetId": "seller1"}),
    (MeritOrderAddMsg, {"assetId": "seller1", "id": ""}),
    (MeritOrderAddMsg, {"assetId": "seller1", "id": 1}),
    (MeritOrderAddMsg, {"assetId": "seller1", "id": "c1", "position": -1}),
    (MeritOrderAddMsg, {"assetId": "seller1", "id": "c1", "position": 1.0}),
    (MeritOrderAddMsg, {"assetId": "seller1", "id": "c1", "position": True}),
    (MeritOrderRemoveMsg, {"id": "c1"}),
    (MeritOrderRemoveMsg, {"assetId": "seller1", "id": "c1", "position": 0}),
    (MeritOrderReorderMsg, {"assetId": "seller1"}),
    (MeritOrderReorderMsg, {"assetId": "seller1", "order": "c1"}),
    (MeritOrderReorderMsg, {"assetId": "seller1", "order": [1, 2]}),
    (MeritOrderReorderMsg, {"assetId": "seller1", "order": ["c1"] * 10_001}),
    (MeritOrderReorderMsg, [["c1"]]),
]


@pytest.mark.parametrize(("kind", "payload"), INVALID)
def test_invalid_merit_order_payloads_are_refused(kind: type[Any], payload: Any) -> None:
    with pytest.raises(MarketError) as info:
        decode(payload, kind)
    assert info.value.code == "invalid"


def test_a_seal_with_no_ppas_records_an_empty_order() -> None:
    core = Balancing()
    upsert(core, "production1", to="seller1")
    settle(core, "production1", 5, epoch=EPOCH)
    assert core.seal("production1", EPOCH).meritorder == ()
