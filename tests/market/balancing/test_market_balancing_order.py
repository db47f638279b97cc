"""EAF balancing (seed 002): sealing in dependency order, and every balancing point balanced."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.balancing.balance import Balancing
from market.balancing.messages import ContractCancelMsg
from market.balancing.seals import verify_seal
from market.balancing.state import Flow
from market.core.errors import MarketError
from market.core.protocol import decode
from market.core.records import BalanceEventRecord, BalanceSeal, BalanceTransaction
from tests.market.balancing.eaf import EPOCH, SEED_TRANSACTIONS, balancer, flows, net, ppa, seed_example, settle, upsert


def refused(core: Balancing, code: str, asset: str, epoch: int = EPOCH) -> str:
    """Sealing `asset` is refused with `code` and changes nothing; returns the message."""
    core.take_records()
    before = core.snapshot()
    with pytest.raises(MarketError) as info:
        core.seal(asset, epoch)
    assert info.value.code == code, info.value
    assert core.snapshot() == before and core.take_records() == []
    return info.value.message


# -- item 8: the order of seal requests does not matter --------------------------------------------


@pytest.mark.parametrize("order", [["production1", "seller1"], ["seller1", "production1"]])
def test_both_sealing_orders_give_the_seed_four_transactions(order: list[str]) -> None:
    core = seed_example()
    for asset in order:
        if not core.is_sealed(asset, EPOCH):
            core.seal(asset, EPOCH)
    production, seller = core.balance("production1", EPOCH), core.balance("seller1", EPOCH)
    assert production.transactions + seller.transactions == SEED_TRANSACTIONS
    assert production.late == () and seller.late == ()
    assert verify_seal(production) and verify_seal(seller)
    # The ledger holds the four transactions, the source's balance first.
    rows = [r for r in core.take_records() if isinstance(r, BalanceTransaction)]
    assert [(r.asset_id, r.from_id, r.to_id, r.energy) for r in rows] == [
        ("production1", "production1", "seller1", 500),
        ("seller1", "seller1", "bigbalancer", 500),
        ("seller1", "seller1", "buyer1", 200),
        ("seller1", "bigbalancer", "seller1", 200),
    ]


def test_sealing_an_asset_seals_its_inputs_first_and_says_so() -> None:
    core = seed_example()
    sealed = core.seal_with_inputs("seller1", EPOCH)
    assert [(b.asset, b.transactions) for b in sealed] == [
        ("production1", SEED_TRANSACTIONS[:1]),
        ("seller1", SEED_TRANSACTIONS[1:]),
    ]
    assert core.is_sealed("production1", EPOCH)
    records = core.take_records()
    journal = [
        msgspec.json.decode(r.payload)
        for r in records
        if isinstance(r, BalanceEventRecord) and r.event == "balancing.seal"
    ]
    assert [(p["assetId"], p.get("inputOf")) for p in journal] == [("production1", "seller1"), ("seller1", None)]
    assert [r.asset_id for r in records if isinstance(r, BalanceSeal)] == ["production1", "seller1"]
    # The input is sealed like any other: sealing it again is `closed`.
    refused(core, "closed", "production1")


def test_inputs_are_sealed_transitively_and_sealed_ones_are_left_as_they_are() -> None:
    core = Balancing()
    upsert(core, "pv", to="house")
    upsert(core, "wind", to="house")
    balancer(core, "house", by="grid")
    upsert(core, "neighbour")  # an endpoint: no rule
    ppa(core, "house", "neighbour", 300)
    settle(core, "pv", 800)
    settle(core, "wind", 100)
    wind = core.seal("wind", EPOCH)
    sealed = core.seal_with_inputs("neighbour", EPOCH)
    assert [b.asset for b in sealed] == ["pv", "house", "neighbour"]
    assert core.balance("wind", EPOCH) == wind
    assert core.balance("house", EPOCH).transactions == flows(
        ("house", "grid", 900), ("house", "neighbour", 300), ("grid", "house", 300)
    )
    assert sealed[-1].transactions == ()  # an endpoint keeps what it receives
    assert net(core, "neighbour", ["pv", "wind", "house", "neighbour"]) == 300


def test_an_input_added_after_a_seal_is_late_there() -> None:
    core = seed_example()
    core.seal("seller1", EPOCH)
    upsert(core, "production2", to="seller1")  # a new source, after seller1's epoch is final
    settle(core, "production2", 40)
    core.seal("production2", EPOCH)
    seller = core.balance("seller1", EPOCH)
    assert seller.transactions == SEED_TRANSACTIONS[1:]
    assert [e.wire() for e in seller.late] == [
        {"source": "transfer", "from": "production2", "to": "seller1", "energy": 40, "label": None}
    ]


def test_balances_that_depend_on_each_other_are_refused_naming_the_cycle() -> None:
    core = Balancing()
    upsert(core, "a", to="b")
    upsert(core, "b", to="a")
    settle(core, "a", 10)
    message = refused(core, "invalid", "a")
    assert "a -> b -> a" in message or "b -> a -> b" in message, message
    assert core.balance("a", EPOCH).transactions == flows(("a", "b", 10))  # a preview still answers
    # Mutual PPAs, each on its own asset, are a cycle too; on one asset they are not.
    core = Balancing()
    balancer(core, "s1", by="grid")
    balancer(core, "s2", by="grid")
    ppa(core, "s1", "s2", 100)
    c2 = ppa(core, "s2", "s1", 50)
    assert "s1" in refused(core, "invalid", "s2")
    core.cancel_contract(decode({"id": c2}, ContractCancelMsg))
    ppa(core, "s1", "s2", 50, direction="from")
    settle(core, "s1", 500)
    # s2 received 100 from s1 and delivered 50 to it: 50 go on to the grid.
    assert core.seal("s2", EPOCH).transactions == flows(("s2", "grid", 50))


# -- item 9: every balancing point is balanced -------------------------------------------------------


def test_a_balancer_that_is_an_asset_passes_on_only_its_net() -> None:
    core = seed_example()
    upsert(core, "bigbalancer", **{"from": "tso", "to": "tso"})
    for asset in ("production1", "seller1", "bigbalancer"):
        core.seal(asset, EPOCH)
    # bigbalancer received 500 from seller1 and delivered 200 to it: 300 go on to the TSO.
    assert core.balance("bigbalancer", EPOCH).transactions == flows(("bigbalancer", "tso", 300))
    points = ["production1", "seller1", "bigbalancer"]
    assert [net(core, p, points) for p in points] == [0, 0, 0]
    # The same when the balancer is sealed first.
    again = seed_example()
    upsert(again, "bigbalancer", **{"from": "tso", "to": "tso"})
    assert [b.asset for b in again.seal_with_inputs("bigbalancer", EPOCH)] == points
    assert again.balance("bigbalancer", EPOCH) == core.balance("bigbalancer", EPOCH)


def test_a_shortfall_is_drawn_from_the_balancer() -> None:
    core = Balancing()
    balancer(core, "hub", by="grid")
    balancer(core, "shop", by="hub")
    ppa(core, "shop", "customer", 300)
    settle(core, "hub", 100)
    settle(core, "shop", 500)
    core.seal("hub", EPOCH)
    # shop drew 300 from hub for its PPA; hub had 100 and received shop's 500: 300 left over.
    assert core.balance("shop", EPOCH).transactions == flows(
        ("shop", "hub", 500), ("shop", "customer", 300), ("hub", "shop", 300)
    )
    assert core.balance("hub", EPOCH).transactions == flows(("hub", "grid", 300))
    # A hub that delivered more than it had draws the difference from its own balancer.
    core = Balancing()
    balancer(core, "hub", by="grid")
    upsert(core, "shop", **{"from": "hub", "to": "market"})
    ppa(core, "shop", "customer", 300)
    settle(core, "shop", 500)
    core.seal("hub", EPOCH)
    assert core.balance("shop", EPOCH).transactions == flows(
        ("shop", "market", 500), ("shop", "customer", 300), ("hub", "shop", 300)
    )
    assert core.balance("hub", EPOCH).transactions == flows(("grid", "hub", 300))
    assert [net(core, p, ["hub", "shop"]) for p in ("hub", "shop")] == [0, 0]


def test_an_unbalanced_point_is_refused_and_nothing_is_sealed() -> None:
    core = seed_example()
    upsert(core, "buyer1", **{"from": "bigbalancer"})  # a balancing point with no `to`
    message = refused(core, "invalid", "buyer1")
    # The refusal names the point, the epoch, the amounts and what to change.
    assert "buyer1" in message and "1337" in message and "200" in message and "`to`" in message, message
    assert not core.is_sealed("production1", EPOCH) and not core.is_sealed("seller1", EPOCH)
    # The preview shows it too.
    assert core.balance("buyer1", EPOCH).imbalance == 200
    # As an endpoint (no rule) it keeps what it receives, and the seal goes through.
    upsert(core, "buyer1")
    assert [b.asset for b in core.seal_with_inputs("buyer1", EPOCH)] == ["production1", "seller1", "buyer1"]
    assert core.balance("production1", EPOCH).transactions + core.balance("seller1", EPOCH).transactions == (
        SEED_TRANSACTIONS
    )


def test_an_unbalanced_input_refuses_the_whole_seal() -> None:
    core = Balancing()
    upsert(core, "production1", to="seller1")  # no `from`: nothing covers a shortfall
    balancer(core, "buyer1")
    ppa(core, "buyer1", "production1", 300, direction="from")  # production1 delivers 300 to buyer1
    settle(core, "production1", 100)
    settle(core, "buyer1", 400)
    message = refused(core, "invalid", "production1")
    assert "production1" in message and "200" in message and "`from`" in message, message
    assert not core.is_sealed("buyer1", EPOCH)
    upsert(core, "production1", **{"from": "bigbalancer", "to": "seller1"})
    assert [b.asset for b in core.seal_with_inputs("production1", EPOCH)] == ["buyer1", "production1"]
    assert core.balance("production1", EPOCH).transactions == flows(("bigbalancer", "production1", 200))
    assert [net(core, p, ["buyer1", "production1"]) for p in ("buyer1", "production1")] == [0, 0]


def test_refused_seals_can_be_retried_once_fixed() -> None:
    core = Balancing()
    upsert(core, "a", **{"from": "grid"})
    settle(core, "a", 5)
    refused(core, "invalid", "a")
    upsert(core, "a", **{"from": "grid", "to": "grid"})
    assert core.seal("a", EPOCH).transactions == flows(("a", "grid", 5))


# -- property: any community, any order of seal requests ---------------------------------------------

NAMES = ["a0", "a1", "a2", "a3", "a4"]
TARGETS = st.sampled_from([*NAMES, "grid", None])


@settings(max_examples=150, deadline=None)
@given(
    rules=st.lists(st.tuples(TARGETS, TARGETS), min_size=len(NAMES), max_size=len(NAMES)),
    contracts=st.lists(
        st.tuples(
            st.sampled_from(NAMES),
            st.sampled_from([*NAMES, "x", "y"]),
            st.sampled_from(["to", "from"]),
            st.integers(1, 400),
            st.integers(0, 3),
        ),
        max_size=6,
    ),
    meters=st.lists(st.tuples(st.sampled_from(NAMES), st.integers(0, 600)), max_size=6),
    order=st.permutations(NAMES),
)
def test_every_sealed_balancing_point_is_balanced_whatever_the_order(
    rules: list[tuple[str | None, str | None]],
    contracts: list[tuple[str, str, str, int, int]],
    meters: list[tuple[str, int]],
    order: list[str],
) -> None:
    core = Balancing()
    for name, (src, dst) in zip(NAMES, rules, strict=True):
        rule = {k: v for k, v in (("from", src), ("to", dst)) if v is not None and v != name}
        upsert(core, name, **rule)
    for asset, partner, direction, energy, priority in contracts:
        if partner != asset:
            ppa(core, asset, partner, energy, direction=direction, priority=priority)
    for i, (meter, wh) in enumerate(meters):
        settle(core, meter, wh, label=f"m{i}")
    for name in order:
        if core.is_sealed(name, EPOCH):
            continue
        preview = core.balance(name, EPOCH)
        try:
            sealed = core.seal(name, EPOCH)
        except MarketError as err:
            assert err.code == "invalid", err  # a cycle, or a point that cannot balance
        else:  # the preview was what sealing gave
            assert (sealed.transactions, sealed.meritorder, preview.imbalance) == (
                preview.transactions,
                preview.meritorder,
                0,
            )
    for name in NAMES:
        balance = core.balance(name, EPOCH)
        assert balance.late == ()  # nothing ever reaches a sealed epoch afterwards
        asset = core.asset(name)
        if balance.sealed and (asset.from_ is not None or asset.to is not None):
            assert net(core, name, NAMES) == 0, (name, [core.balance(n, EPOCH).wire() for n in NAMES])
        assert all(isinstance(f, Flow) and f.energy > 0 for f in balance.transactions)
