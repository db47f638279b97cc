"""EAF balancing core (seed 002, PROTOCOL.md /balancing): rules, PPAs, merit order, seals."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.balancing.balance import Balancing, settlement_from_meter
from market.balancing.messages import (
    AddSettlementMsg,
    AssetUpsertMsg,
    BalanceRefMsg,
    ContractAddMsg,
    ContractCancelMsg,
    ContractUpdateMsg,
    MeritOrderAddMsg,
    MeritOrderRemoveMsg,
    MeritOrderReorderMsg,
)
from market.balancing.seals import seal_of, verify_seal
from market.balancing.state import Balance, BalancingConfig, Flow
from market.core.errors import MarketError
from market.core.protocol import decode
from market.core.records import BalanceEventRecord, BalanceSeal, BalanceTransaction, MeterRecord
from tests.market.balancing.eaf import EPOCH, balancer, flows, ppa, seed_example, settle, upsert

# -- the seed's worked example -----------------------------------------------------------------


def test_seed_example_gives_exactly_the_four_transactions() -> None:
    core = seed_example()
    production = core.seal("production1", EPOCH)
    seller = core.seal("seller1", EPOCH)
    assert production.transactions == flows(("production1", "seller1", 500))
    assert seller.transactions == flows(
        ("seller1", "bigbalancer", 500),
        ("seller1", "buyer1", 200),
        ("bigbalancer", "seller1", 200),
    )
    every = [t.wire() for t in production.transactions + seller.transactions]
    assert every == [
        {"from": "production1", "to": "seller1", "energy": 500},
        {"from": "seller1", "to": "bigbalancer", "energy": 500},
        {"from": "seller1", "to": "buyer1", "energy": 200},
        {"from": "bigbalancer", "to": "seller1", "energy": 200},
    ]
    assert verify_seal(production.wire()) and verify_seal(seller)


def test_seed_example_leaves_the_balancing_point_balanced() -> None:
    core = seed_example()
    production = core.seal("production1", EPOCH)
    seller = core.seal("seller1", EPOCH)

    def net(who: str, transactions: tuple[Flow, ...]) -> int:
        return sum(f.energy for f in transactions if f.to == who) - sum(
            f.energy for f in transactions if f.from_ == who
        )

    every = production.transactions + seller.transactions
    assert net("seller1", every) == 0  # a balancing point is balanced in its epoch
    assert net("production1", every) == -500 and net("buyer1", every) == 200 and net("bigbalancer", every) == 300
    ppa_flows = seller.transactions[1:]
    assert net("seller1", ppa_flows) == 0  # the PPA does not change seller1's balance


def test_seed_example_replies_and_wire_balance() -> None:
    core = Balancing(BalancingConfig(epoch_duration=60))
    assert upsert(core, "production1", to="seller1") == {
        "asset": {"assetId": "production1", "type": "balance", "balancerule": {"to": "seller1"}}
    }
    upsert(core, "seller1", **{"from": "bigbalancer", "to": "bigbalancer"})
    cid = ppa(core, "seller1", "buyer1", 200)
    assert cid == "c1"
    settle(core, "production1", 500, label="virtual_1")
    core.seal("production1", EPOCH)
    wire = core.seal("seller1", EPOCH).wire()
    assert wire["assetId"] == "seller1" and wire["epoch"] == EPOCH and wire["sealed"] is True
    assert wire["interval"] == [EPOCH * 60, EPOCH * 60 + 60]
    assert wire["seal"] == seal_of("seller1", EPOCH, wire["transactions"])
    assert len(wire["seal"]) == 64 and wire["late"] == []
    assert core.balance("seller1", EPOCH).wire() == wire


def test_seal_is_the_sha256_of_canonical_json() -> None:
    import hashlib
    import json

    core = seed_example()
    balance = core.seal("production1", EPOCH)
    text = json.dumps(
        {
            "assetId": "production1",
            "epoch": 1337,
            "transactions": [{"from": "production1", "to": "seller1", "energy": 500}],
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    assert (
        text
        == '{"assetId":"production1","epoch":1337,"transactions":[{"energy":500,"from":"production1","to":"seller1"}]}'
    )
    assert balance.seal == hashlib.sha256(text.encode()).hexdigest()


def test_tampered_or_unsealed_balances_do_not_verify() -> None:
    core = seed_example()
    core.seal("production1", EPOCH)
    good = core.seal("seller1", EPOCH).wire()
    assert verify_seal(good)
    tampered = {**good, "transactions": [{**t, "energy": t["energy"] + 1} for t in good["transactions"]]}
    assert not verify_seal(tampered)
    assert not verify_seal({**good, "epoch": EPOCH + 1})
    assert not verify_seal({**good, "assetId": "seller2"})
    assert not verify_seal({**good, "transactions": good["transactions"][:-1]})
    assert not verify_seal({**good, "seal": "0" * 64})
    assert not verify_seal({**good, "seal": None})
    assert not verify_seal({"seal": good["seal"]})
    assert not verify_seal({**good, "transactions": [1, 2]})
    assert not verify_seal(core.balance("seller1", EPOCH + 1))  # not sealed


def test_ledger_records_of_a_sealed_balance() -> None:
    core = seed_example()
    core.seal("production1", EPOCH)
    balance = core.seal("seller1", EPOCH)
    records = core.records(balance)
    txs = [r for r in records if isinstance(r, BalanceTransaction)]
    seals = [r for r in records if isinstance(r, BalanceSeal)]
    assert [r.id for r in txs] == ["b1337-seller1-0", "b1337-seller1-1", "b1337-seller1-2"]
    assert [(r.from_id, r.to_id, r.energy, r.seq) for r in txs] == [
        ("seller1", "bigbalancer", 500, 0),
        ("seller1", "buyer1", 200, 1),
        ("bigbalancer", "seller1", 200, 2),
    ]
    assert {r.seal for r in txs} == {balance.seal}
    assert seals == [
        BalanceSeal(
            id="s1337-seller1",
            asset_id="seller1",
            epoch=EPOCH,
            epoch_start=EPOCH * 900,
            epoch_end=EPOCH * 900 + 900,
            transactions=3,
            energy=900,
            seal=str(balance.seal),
        )
    ]
    # A third party can check the seal from the ledger rows alone.
    rows = [{"from": r.from_id, "to": r.to_id, "energy": r.energy} for r in sorted(txs, key=lambda r: r.seq)]
    assert seal_of("seller1", EPOCH, rows) == balance.seal
    with pytest.raises(ValueError):
        core.records(core.balance("seller1", EPOCH + 1))


# -- merit order, load_min, load_max -------------------------------------------------------------


def test_merit_order_serves_priority_1_2_3_until_the_energy_runs_out() -> None:
    core = Balancing()
    balancer(core)
    # Added out of order: the merit order is by priority, not by age.
    ppa(core, "seller1", "buyer3", 200, priority=3)
    ppa(core, "seller1", "buyer1", 200, priority=1)
    ppa(core, "seller1", "buyer2", 200, priority=2)
    settle(core, "seller1", 500)  # short of the 600 the three PPAs want
    assert [c.partner for c in core.merit_order("seller1")] == ["buyer1", "buyer2", "buyer3"]
    assert core.seal("seller1", EPOCH).transactions == flows(
        ("seller1", "bigbalancer", 500),
        ("seller1", "buyer1", 200),
        ("bigbalancer", "seller1", 200),
        ("seller1", "buyer2", 200),
        ("bigbalancer", "seller1", 200),
        ("seller1", "buyer3", 100),  # only what is left
        ("bigbalancer", "seller1", 100),
    )


def test_merit_order_ties_go_by_age() -> None:
    core = Balancing()
    balancer(core)
    ppa(core, "seller1", "old", 300, priority=1)
    ppa(core, "seller1", "young", 300, priority=1)
    ppa(core, "seller1", "first", 100, priority=0)
    settle(core, "seller1", 500)
    served = [(f.to, f.energy) for f in core.seal("seller1", EPOCH).transactions if f.from_ == "seller1"]
    assert served == [("bigbalancer", 500), ("first", 100), ("old", 300), ("young", 100)]


def test_load_min_not_met_means_not_served_at_all() -> None:
    core = Balancing()
    balancer(core)
    ppa(core, "seller1", "buyer1", 400, priority=1)
    ppa(core, "seller1", "buyer2", 200, priority=2, load_min=150)  # only 100 left: skipped
    ppa(core, "seller1", "buyer3", 200, priority=3, load_min=50)  # takes the 100 left
    settle(core, "seller1", 500)
    served = [(f.to, f.energy) for f in core.seal("seller1", EPOCH).transactions if f.from_ == "seller1"]
    assert served == [("bigbalancer", 500), ("buyer1", 400), ("buyer3", 100)]


def test_load_max_caps_a_contract() -> None:
    core = Balancing()
    balancer(core)
    ppa(core, "seller1", "buyer1", 400, priority=1, load_max=250)
    ppa(core, "seller1", "buyer2", 400, priority=2, load_max=20000)
    settle(core, "seller1", 500)
    served = [(f.to, f.energy) for f in core.seal("seller1", EPOCH).transactions if f.from_ == "seller1"]
    assert served == [("bigbalancer", 500), ("buyer1", 250), ("buyer2", 250)]


def test_nothing_received_serves_no_contract() -> None:
    core = Balancing()
    balancer(core)
    ppa(core, "seller1", "buyer1", 200)
    assert core.seal("seller1", EPOCH).transactions == ()


@settings(max_examples=200, deadline=None)
@given(
    received=st.integers(0, 5000),
    ppas=st.lists(
        st.tuples(st.integers(1, 3000), st.integers(0, 3000), st.integers(0, 3000), st.integers(0, 5)),
        max_size=8,
    ),
)
def test_contracts_stay_within_received_energy_and_their_bounds(
    received: int, ppas: list[tuple[int, int, int, int]]
) -> None:
    core = Balancing()
    balancer(core)
    bounds = {}
    for i, (energy, a, b, priority) in enumerate(ppas):
        lo, hi = min(a, b, energy), max(a, b)
        ppa(core, "seller1", f"buyer{i}", energy, load_min=lo, load_max=hi, priority=priority)
        bounds[f"buyer{i}"] = (lo, min(energy, hi))
    settle(core, "seller1", received)
    txs = core.seal("seller1", EPOCH).transactions
    served = {f.to: f.energy for f in txs if f.from_ == "seller1" and f.to != "bigbalancer"}
    assert sum(served.values()) <= received
    for partner, energy in served.items():
        lo, hi = bounds[partner]
        assert lo <= energy <= hi and energy > 0
    drawn = sum(f.energy for f in txs if f.from_ == "bigbalancer")
    assert drawn == sum(served.values())  # every delivery is drawn from the balancer
    # Greedy in merit order: a skipped or partly served contract means the rest was short.
    order = [c.partner for c in core.merit_order("seller1")]
    left = received
    for partner in order:
        lo, hi = bounds[partner]
        want = min(hi, left)
        expected = want if want >= lo and want > 0 else 0
        assert served.get(partner, 0) == expected
        left -= expected


# -- contracts: update, cancel, direction, no balancer -----------------------------------------------


def test_update_and_cancel_change_later_seals_only() -> None:
    core = Balancing()
    balancer(core)
    cid = ppa(core, "seller1", "buyer1", 200)
    settle(core, "seller1", 500, epoch=1)
    settle(core, "seller1", 500, epoch=2)
    settle(core, "seller1", 500, epoch=3)
    first = core.seal("seller1", 1)
    reply = core.update_contract(decode({"id": cid, "energy": 300, "priority": 4}, ContractUpdateMsg))
    assert reply["contract"]["energy"] == 300 and reply["contract"]["priority"] == 4
    assert reply["contract"]["load_max"] == 20000  # fields not given are kept
    second = core.seal("seller1", 2)
    cancelled = core.cancel_contract(decode({"id": cid}, ContractCancelMsg))
    assert cancelled["contract"]["status"] == "cancelled"
    third = core.seal("seller1", 3)
    assert first.transactions[1] == Flow("seller1", "buyer1", 200)
    assert second.transactions[1] == Flow("seller1", "buyer1", 300)
    assert third.transactions == flows(("seller1", "bigbalancer", 500))
    assert core.balance("seller1", 1) == first  # sealed: the update did not touch it
    with pytest.raises(MarketError) as info:
        core.cancel_contract(decode({"id": cid}, ContractCancelMsg))
    assert info.value.code == "closed"
    with pytest.raises(MarketError) as info:
        core.update_contract(decode({"id": cid, "energy": 1}, ContractUpdateMsg))
    assert info.value.code == "closed"


def test_without_a_from_rule_contracts_are_served_out_of_the_received_energy() -> None:
    core = Balancing()
    upsert(core, "production1", to="seller1")
    ppa(core, "production1", "buyer1", 200)
    settle(core, "production1", 500)
    assert core.seal("production1", EPOCH).transactions == flows(
        ("production1", "seller1", 300),
        ("production1", "buyer1", 200),
    )


def test_direction_from_delivers_to_the_asset_which_passes_it_on() -> None:
    core = Balancing()
    upsert(core, "buyer1", **{"from": "bigbalancer", "to": "bigbalancer"})
    ppa(core, "buyer1", "seller1", 150, direction="from")
    settle(core, "buyer1", 400)
    assert core.seal("buyer1", EPOCH).transactions == flows(
        ("buyer1", "bigbalancer", 400),
        ("seller1", "buyer1", 150),
        ("buyer1", "bigbalancer", 150),
    )


def test_settlement_labels_add_up_and_retries_are_duplicates() -> None:
    core = Balancing()
    upsert(core, "production1", to="seller1")
    assert settle(core, "production1", 300, label="a") == {"late": False}
    assert settle(core, "production1", 200, label="b") == {"late": False}
    assert settle(core, "production1", 200, label="b") == {"late": False, "duplicate": True}
    before = core.snapshot()
    with pytest.raises(MarketError) as info:
        settle(core, "production1", 201, label="b")
    assert info.value.code == "conflict" and core.snapshot() == before
    assert core.seal("production1", EPOCH).transactions == flows(("production1", "seller1", 500))


# -- sealed epochs are final ------------------------------------------------------------------------


def test_late_settlement_is_kept_apart_and_changes_nothing() -> None:
    core = seed_example()
    sealed = core.seal("production1", EPOCH)
    reply = settle(core, "production1", 70, label="virtual_2")
    assert reply == {"late": True}
    again = core.balance("production1", EPOCH)
    assert again.transactions == sealed.transactions and again.seal == sealed.seal
    assert verify_seal(again)
    assert [e.wire() for e in again.late] == [
        {"source": "settlement", "from": "production1", "to": "production1", "energy": 70, "label": "virtual_2"}
    ]
    assert core.metered("production1", EPOCH) == 500  # the late 70 is not part of it
    # Nor does it reach seller1, sealed afterwards.
    seller = core.seal("seller1", EPOCH)
    assert seller.transactions[0] == Flow("seller1", "bigbalancer", 500)
    # Other epochs are open as ever.
    assert settle(core, "production1", 70, epoch=EPOCH + 1) == {"late": False}


def test_a_sealed_epoch_cannot_be_sealed_again() -> None:
    core = seed_example()
    core.seal("production1", EPOCH)
    before = core.snapshot()
    with pytest.raises(MarketError) as info:
        core.seal("production1", EPOCH)
    assert info.value.code == "closed" and core.snapshot() == before


def test_preview_of_an_unsealed_epoch() -> None:
    core = seed_example()
    preview = core.balance("production1", EPOCH)
    assert preview.seal is None and not preview.sealed
    assert preview.transactions == flows(("production1", "seller1", 500))
    assert preview.wire()["sealed"] is False
    assert isinstance(preview, Balance)


# -- refusals change nothing ------------------------------------------------------------------------

ASSET = {"assetId": "a1", "type": "balance", "balancerule": {"to": "b1"}}
CONTRACT = {
    "assetId": "seller1",
    "partnerId": "buyer9",
    "direction": "to",
    "status": "active",
    "energy": 200,
    "load_min": 0,
    "load_max": 300,
}
SETTLEMENT = {"meterId": "production1", "epoch": 5, "consumption": 10}
REF = {"assetId": "seller1", "epoch": 5}

INVALID: list[tuple[type[Any], Any]] = [
    (AssetUpsertMsg, {**ASSET, "type": "meter"}),
    (AssetUpsertMsg, {k: v for k, v in ASSET.items() if k != "type"}),
    (AssetUpsertMsg, {**ASSET, "balancerule": {"to": "b1", "via": "x"}}),
    (AssetUpsertMsg, {**ASSET, "balancerule": {"from_": "b1"}}),
    (AssetUpsertMsg, {**ASSET, "balancerule": {"to": ""}}),
    (AssetUpsertMsg, {**ASSET, "balancerule": {"to": 5}}),
    (AssetUpsertMsg, {**ASSET, "assetId": "a b"}),
    (AssetUpsertMsg, {**ASSET, "extra": 1}),
    (AssetUpsertMsg, [ASSET]),
    (AssetUpsertMsg, None),
    (ContractAddMsg, {**CONTRACT, "energy": 0}),
    (ContractAddMsg, {**CONTRACT, "energy": -5}),
    (ContractAddMsg, {**CONTRACT, "energy": 200.0}),
    (ContractAddMsg, {**CONTRACT, "energy": "200"}),
    (ContractAddMsg, {**CONTRACT, "energy": True}),
    (ContractAddMsg, {**CONTRACT, "load_min": -1}),
    (ContractAddMsg, {**CONTRACT, "direction": "sideways"}),
    (ContractAddMsg, {**CONTRACT, "status": "pending"}),
    (ContractAddMsg, {**CONTRACT, "priority": -1}),
    (ContractAddMsg, {**CONTRACT, "priority": 1.5}),
    (ContractAddMsg, {**CONTRACT, "id": "mine"}),
    (ContractAddMsg, {k: v for k, v in CONTRACT.items() if k != "load_max"}),
    (ContractAddMsg, {**CONTRACT, "energy": 10**10}),
    (ContractUpdateMsg, {"energy": 5}),
    (ContractUpdateMsg, {"id": "c1", "status": "cancelled"}),
    (ContractUpdateMsg, {"id": "c1", "energy": 0}),
    (ContractCancelMsg, {"id": ""}),
    (AddSettlementMsg, {**SETTLEMENT, "consumption": -1}),
    (AddSettlementMsg, {**SETTLEMENT, "consumption": 1.0}),
    (AddSettlementMsg, {**SETTLEMENT, "consumption": float("nan")}),
    (AddSettlementMsg, {**SETTLEMENT, "epoch": -1}),
    (AddSettlementMsg, {**SETTLEMENT, "epoch": "5"}),
    (AddSettlementMsg, {**SETTLEMENT, "label": ""}),
    (AddSettlementMsg, {**SETTLEMENT, "meter": "production1"}),
    (BalanceRefMsg, {"assetId": "seller1"}),
    (BalanceRefMsg, {**REF, "epoch": False}),
]


@pytest.mark.parametrize(("kind", "payload"), INVALID)
def test_invalid_payloads_are_refused(kind: type[Any], payload: Any) -> None:
    with pytest.raises(MarketError) as info:
        decode(payload, kind)
    assert info.value.code == "invalid"


def refused(core: Balancing, code: str, action: Any) -> None:
    before = core.snapshot()
    with pytest.raises(MarketError) as info:
        action()
    assert info.value.code == code, info.value
    assert core.snapshot() == before


def test_refused_actions_change_no_state() -> None:
    core = seed_example()
    core.seal("production1", EPOCH)

    def add(**kw: Any) -> Callable[[], dict[str, Any]]:
        return lambda: core.add_contract(decode({**CONTRACT, **kw}, ContractAddMsg))

    refused(core, "invalid", lambda: upsert(core, "seller1", to="seller1"))
    refused(core, "invalid", lambda: upsert(core, "seller1", **{"from": "seller1"}))
    refused(core, "not_found", add(assetId="nobody"))
    refused(core, "invalid", add(partnerId="seller1"))
    refused(core, "invalid", add(load_min=301))
    refused(core, "invalid", add(energy=100, load_min=150))
    refused(core, "not_found", lambda: core.update_contract(decode({"id": "c99", "energy": 5}, ContractUpdateMsg)))
    refused(core, "invalid", lambda: core.update_contract(decode({"id": "c1", "load_min": 30000}, ContractUpdateMsg)))
    refused(
        core, "invalid", lambda: core.update_contract(decode({"id": "c1", "partnerId": "seller1"}, ContractUpdateMsg))
    )
    refused(core, "not_found", lambda: core.cancel_contract(decode({"id": "c99"}, ContractCancelMsg)))
    refused(core, "not_found", lambda: core.seal("buyer1", EPOCH))
    refused(core, "not_found", lambda: core.balance("buyer1", EPOCH))
    refused(core, "closed", lambda: core.seal("production1", EPOCH))
    refused(core, "conflict", lambda: settle(core, "production1", 501, label="virtual_1"))
    # The example still seals exactly as the seed says.
    assert core.seal("seller1", EPOCH).transactions[1:] == flows(
        ("seller1", "buyer1", 200), ("bigbalancer", "seller1", 200)
    )


def test_limits_are_too_large() -> None:
    core = Balancing(BalancingConfig(max_assets=1, max_contracts=1, max_settlements=1))
    upsert(core, "a1", to="b1")
    upsert(core, "a1", to="b2")  # an update is not a new asset
    refused(core, "too_large", lambda: upsert(core, "a2", to="b1"))
    ppa(core, "a1", "p1", 10)
    refused(core, "too_large", lambda: ppa(core, "a1", "p2", 10))
    settle(core, "a1", 5)
    refused(core, "too_large", lambda: settle(core, "a1", 5, label="x"))


# -- epochs and the market's meter data -----------------------------------------------------------------


def test_an_epoch_can_be_one_market_slot() -> None:
    core = Balancing(BalancingConfig(epoch_duration=60))
    assert core.epoch_interval(12) == (720, 780)
    assert core.epoch_of(720) == core.epoch_of(779) == 12
    reading = MeterRecord(
        id="m-P1-720",
        participant_id="P1",
        time_interval_start=720,
        time_interval_end=780,
        generation='{"solar":600,"bess":50}',
        consumption='{"bess":{},"other":{"external":0}}',
        time_creation=720,
    )
    msg = settlement_from_meter(reading, 60)
    assert msg == AddSettlementMsg(meter_id="P1", epoch=12, consumption=650, label="market")
    upsert(core, "P1", to="community")
    core.add_settlement(msg)
    assert core.seal("P1", 12).transactions == flows(("P1", "community", 650))
    with pytest.raises(MarketError) as info:
        settlement_from_meter(reading, 900)
    assert info.value.code == "invalid"


# -- the journal and restoring from the ledger -------------------------------------------------


def busy_day(core: Balancing, after_each: Callable[[], None] = lambda: None) -> None:
    """Every kind of event, merit order changes, seals with and without inputs, late
    readings and transfers, retries."""
    steps: list[Callable[[], Any]] = [
        lambda: upsert(core, "production1", to="seller1"),
        lambda: upsert(core, "seller1", **{"from": "bigbalancer", "to": "bigbalancer"}),
        lambda: upsert(core, "production1", to="seller1"),  # the same again: nothing new
        lambda: ppa(core, "seller1", "buyer1", 200, priority=1),
        lambda: ppa(core, "seller1", "buyer2", 300, priority=2),
        lambda: ppa(core, "seller1", "buyer3", 100),
        lambda: core.update_contract(decode({"id": "c2", "energy": 250}, ContractUpdateMsg)),
        lambda: core.cancel_contract(decode({"id": "c3"}, ContractCancelMsg)),
        lambda: core.meritorder_reorder(decode({"assetId": "seller1", "order": ["c2", "c1"]}, MeritOrderReorderMsg)),
        lambda: core.meritorder_remove(decode({"assetId": "seller1", "id": "c1"}, MeritOrderRemoveMsg)),
        lambda: core.meritorder_add(decode({"assetId": "seller1", "id": "c1", "position": 1}, MeritOrderAddMsg)),
        lambda: settle(core, "production1", 500, label="v1"),
        lambda: settle(core, "production1", 40, label="v2"),
        lambda: settle(core, "production1", 500, label="v1"),  # a retry: nothing new
        lambda: settle(core, "production1", 700, epoch=EPOCH + 1),
        lambda: settle(core, "production1", 400, epoch=EPOCH + 2),
        lambda: core.seal("production1", EPOCH),
        lambda: core.seal("seller1", EPOCH),
        lambda: core.seal("seller1", EPOCH + 1),  # seals its input production1 first
        lambda: upsert(core, "production2", to="seller1"),  # a source added after that seal
        lambda: settle(core, "production2", 60, epoch=EPOCH + 1),
        lambda: core.seal("production2", EPOCH + 1),  # its transfer to seller1 is late
        lambda: settle(core, "production1", 80),  # late
        lambda: settle(core, "seller1", 5, epoch=EPOCH + 1, label="x"),  # late
    ]
    for step in steps:
        step()
        after_each()


def test_every_accepted_change_is_one_journal_record_and_retries_none() -> None:
    core = Balancing()
    busy_day(core)
    records = core.take_records()
    events = [r for r in records if isinstance(r, BalanceEventRecord)]
    assert [(e.id, e.seq, e.event) for e in events] == [
        (f"e{n}", n, name)
        for n, name in enumerate(
            ["asset.upsert"] * 2
            + ["contract.add"] * 3
            + ["contract.update", "contract.cancel"]
            + ["meritorder.reorder", "meritorder.remove", "meritorder.add"]
            + ["balancing.addSettlement"] * 4
            + ["balancing.seal"] * 4
            + ["asset.upsert", "balancing.addSettlement", "balancing.seal"]
            + ["balancing.addSettlement"] * 2,
            start=1,
        )
    ]
    assert events[0].payload == '{"assetId":"production1","type":"balance","balancerule":{"from":null,"to":"seller1"}}'
    seal = core.balance("production1", EPOCH).seal
    assert events[14].payload == f'{{"assetId":"production1","epoch":1337,"meritorder":[],"seal":"{seal}"}}'
    assert msgspec.json.decode(events[16].payload) == {
        "assetId": "production1",
        "epoch": EPOCH + 1,
        "meritorder": [],
        "seal": core.balance("production1", EPOCH + 1).seal,
        "inputOf": "seller1",
    }
    assert msgspec.json.decode(events[17].payload)["meritorder"] == ["c2", "c1"]
    seals = [r.id for r in records if isinstance(r, BalanceSeal)]
    assert seals == [
        "s1337-production1",
        "s1337-seller1",
        "s1338-production1",
        "s1338-seller1",
        "s1338-production2",
    ]
    assert core.take_records() == []


def test_restore_of_the_records_written_so_far_gives_the_same_state() -> None:
    live, written = Balancing(), []

    def restart() -> None:
        written.extend(live.take_records())
        resumed = Balancing()
        resumed.restore(written)
        assert resumed.snapshot() == live.snapshot()

    busy_day(live, after_each=restart)
    resumed = Balancing()
    resumed.restore(reversed(written))  # the ledger's order does not matter
    assert resumed.snapshot() == live.snapshot()
    for asset, epoch in [
        ("production1", EPOCH),
        ("seller1", EPOCH),
        ("production1", EPOCH + 1),
        ("seller1", EPOCH + 1),
        ("production2", EPOCH + 1),
        ("production1", EPOCH + 2),
    ]:
        assert resumed.balance(asset, epoch) == live.balance(asset, epoch)
    assert verify_seal(resumed.balance("seller1", EPOCH))
    assert resumed.balance("seller1", EPOCH + 1).meritorder == ("c2", "c1")
    assert [e.wire() for e in resumed.balance("seller1", EPOCH + 1).late] == [
        {"source": "transfer", "from": "production2", "to": "seller1", "energy": 60, "label": None},
        {"source": "settlement", "from": "seller1", "to": "seller1", "energy": 5, "label": "x"},
    ]
    # Sealed stays sealed and writes nothing; a retried reading is a duplicate again.
    with pytest.raises(MarketError) as info:
        resumed.seal("production1", EPOCH)
    assert info.value.code == "closed"
    assert settle(resumed, "production1", 500, label="v1") == {"late": False, "duplicate": True}
    assert settle(resumed, "production1", 80) == {"late": True, "duplicate": True}
    assert resumed.take_records() == []
    # Ids and the journal continue where the ledger ends.
    assert ppa(resumed, "seller1", "buyer4", 10) == "c4"
    assert [r.id for r in resumed.take_records()] == ["e24"]  # 23 events were journalled
    assert resumed.seal("production1", EPOCH + 2) == live.seal("production1", EPOCH + 2)


def test_late_entries_keep_their_arrival_order_across_a_restore() -> None:
    live, written = Balancing(), []
    upsert(live, "a", to="b")
    upsert(live, "b", to="c")
    live.seal("b", 1)  # seals its input a first
    settle(live, "b", 3, epoch=1, label="first")
    upsert(live, "a2", to="b")  # a source added after b's seal
    settle(live, "a2", 10, epoch=1)
    live.seal("a2", 1)  # its transfer to b is late, after b's late reading
    settle(live, "b", 4, epoch=1, label="last")
    written += live.take_records()
    resumed = Balancing()
    resumed.restore(written)
    assert [(e.source, e.energy) for e in resumed.balance("b", 1).late] == [
        ("settlement", 3),
        ("transfer", 10),
        ("settlement", 4),
    ]
    assert resumed.snapshot() == live.snapshot()


def test_seals_written_before_the_journal_stay_sealed() -> None:
    live = seed_example()
    production, seller = live.seal("production1", EPOCH), live.seal("seller1", EPOCH)
    rows = [*live.records(production), *live.records(seller)]  # no journal records
    resumed = Balancing()
    resumed.restore(rows)
    # As stored; which merit order it applied was not recorded then.
    assert resumed.balance("seller1", EPOCH) == msgspec.structs.replace(seller, meritorder=None)
    assert verify_seal(resumed.balance("production1", EPOCH))
    with pytest.raises(MarketError) as info:
        resumed.seal("seller1", EPOCH)
    assert info.value.code == "closed"  # though the asset itself was never journalled
    upsert(resumed, "seller1", to="bigbalancer")
    with pytest.raises(MarketError) as info:
        resumed.seal("seller1", EPOCH)
    assert info.value.code == "closed"


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (
            lambda rs: [
                r.__class__(**{**r.row(), "energy": 501}) if isinstance(r, BalanceTransaction) else r for r in rs
            ],
            "does not match",
        ),
        (lambda rs: [r for r in rs if not isinstance(r, BalanceSeal)], "without a seal"),
        (lambda rs: [r for r in rs if not (isinstance(r, BalanceTransaction) and r.seq == 1)], "incomplete"),
        (lambda rs: [r for r in rs if not isinstance(r, BalanceTransaction | BalanceSeal)], "no such seal"),
        (lambda rs: [*rs, BalanceEventRecord("e99", 1, "asset.upsert", "{}")], "alike"),
        (lambda rs: [*rs, BalanceEventRecord("e99", 99, "asset.delete", "{}")], "unknown event"),
        (lambda rs: [*rs, BalanceEventRecord("e99", 99, "contract.cancel", '{"id":"c7"}')], "does not replay"),
        (lambda rs: [*rs, BalanceEventRecord("e99", 99, "contract.cancel", '{"id":7}')], "does not replay"),
        (
            lambda rs: [*rs, BalanceEventRecord("e99", 99, "balancing.seal", '{"assetId":"seller1","epoch":1337}')],
            "second time",
        ),
        (
            lambda rs: [
                msgspec.structs.replace(r, payload=json.dumps({**json.loads(r.payload), "seal": "0" * 64}))
                if isinstance(r, BalanceEventRecord) and r.event == "balancing.seal"
                else r
                for r in rs
            ],
            "the ledger as",
        ),
    ],
)
def test_records_that_do_not_fit_are_refused_and_change_nothing(
    tamper: Callable[[list[Any]], list[Any]], message: str
) -> None:
    live = seed_example()
    live.seal("production1", EPOCH)
    live.seal("seller1", EPOCH)
    records = list(live.take_records())
    core = Balancing()
    upsert(core, "other", to="x")
    before = core.snapshot()
    with pytest.raises(ValueError, match=message):
        core.restore(tamper(records))
    assert core.snapshot() == before


def test_rollback_undoes_an_event_whose_records_could_not_be_stored() -> None:
    core = seed_example()
    core.take_records()
    saved, before = core.checkpoint(), core.snapshot()
    core.seal("production1", EPOCH)
    settle(core, "production1", 9, label="late")
    ppa(core, "seller1", "buyer9", 10)
    core.rollback(saved)
    assert core.snapshot() == before and core.take_records() == []
    assert core.seal("production1", EPOCH).seal is not None  # as if nothing had happened
