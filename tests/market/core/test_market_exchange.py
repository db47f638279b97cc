"""Energy exchange of a delivered slot (PROTOCOL.md section Energy exchange).

The scenarios of the reference's docstring, each written out row by row:
(kind, seller, buyer, source, quantity, price_buy, price_sell, amount_buy, amount_sell, commit_id).
Grid buys at 0.25 and sells at 0.125 per kWh; settlements are 100 Wh of solar at 0.1875
(binary fractions: every amount below is exact). Amount = Wh * price * 1000 (micro-currency).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from market.core.exchange import exchange
from market.core.protocol import MeterMsg
from market.core.records import Settlement, Transaction
from tests.market.builders import SLOT, TxRow, meter, rows, settlement

BUY, SELL, P, C = 0.25, 0.125, 0.1875, "c0-0"
S, B = "seller", "buyer"


def run(settlements: Sequence[Settlement], meters: Mapping[str, MeterMsg]) -> list[Transaction]:
    return exchange(SLOT, settlements, meters, BUY, SELL, now=60)


def ex(settlements: Sequence[Settlement], meters: Mapping[str, MeterMsg]) -> list[TxRow]:
    return rows(run(settlements, meters))


ONE = [settlement(S, B, 100, P)]

SCENARIOS: dict[str, tuple[dict[str, MeterMsg], list[TxRow]]] = {
    # 1 + 4: seller generated and buyer imported exactly what was settled.
    "exact": (
        {S: meter(gen={"solar": 100}), B: meter(other={"external": 100})},
        [("p2p", S, B, "solar", 100, P, P, 18750, 18750, C)],
    ),
    # 2: seller short by 40, no battery: it pays the buyer the grid buy price; the buyer buys 40 from the grid.
    "seller_less": (
        {S: meter(gen={"solar": 60}), B: meter(other={"external": 100})},
        [
            ("p2p", S, B, "solar", 60, P, P, 11250, 11250, C),
            ("financial", S, B, "grid", 40, -BUY, -BUY, -10000, -10000, C),
            ("grid_buy", "grid", B, "grid", 40, BUY, BUY, 10000, 10000, None),
        ],
    ),
    # 3: seller's residual 50 is sold to the grid.
    "seller_more": (
        {S: meter(gen={"solar": 150}), B: meter(other={"external": 100})},
        [
            ("p2p", S, B, "solar", 100, P, P, 18750, 18750, C),
            ("grid_sell", S, "grid", "solar", 50, SELL, SELL, 6250, 6250, None),
        ],
    ),
    # 5: buyer used 60 of 100: it pays the 40 extra; the seller's 40 is NOT sold to the grid again.
    "buyer_less": (
        {S: meter(gen={"solar": 100}), B: meter(other={"external": 60})},
        [
            ("p2p", S, B, "solar", 60, P, P, 11250, 11250, C),
            ("financial", S, B, "solar", 40, P, P, 7500, 7500, C),
        ],
    ),
    # 6: buyer imports 50 more than settled: from the grid.
    "buyer_more": (
        {S: meter(gen={"solar": 100}), B: meter(other={"external": 150})},
        [
            ("p2p", S, B, "solar", 100, P, P, 18750, 18750, C),
            ("grid_buy", "grid", B, "grid", 50, BUY, BUY, 12500, 12500, None),
        ],
    ),
    # 2 + 5: generated 60, used 40: 40 physical, 20 extra paid by the buyer, 40 of the 100 void.
    "seller_less_buyer_less": (
        {S: meter(gen={"solar": 60}), B: meter(other={"external": 40})},
        [
            ("p2p", S, B, "solar", 40, P, P, 7500, 7500, C),
            ("financial", S, B, "solar", 20, P, P, 3750, 3750, C),
        ],
    ),
    # 2 + 6: generated 60, imported 150: short 40 paid by the seller, the buyer buys 90 from the grid.
    "seller_less_buyer_more": (
        {S: meter(gen={"solar": 60}), B: meter(other={"external": 150})},
        [
            ("p2p", S, B, "solar", 60, P, P, 11250, 11250, C),
            ("financial", S, B, "grid", 40, -BUY, -BUY, -10000, -10000, C),
            ("grid_buy", "grid", B, "grid", 90, BUY, BUY, 22500, 22500, None),
        ],
    ),
    # 3 + 5: generated 150, used 60: extra 40 paid once, only the 50 beyond the settlement goes to the grid.
    "seller_more_buyer_less": (
        {S: meter(gen={"solar": 150}), B: meter(other={"external": 60})},
        [
            ("p2p", S, B, "solar", 60, P, P, 11250, 11250, C),
            ("financial", S, B, "solar", 40, P, P, 7500, 7500, C),
            ("grid_sell", S, "grid", "solar", 50, SELL, SELL, 6250, 6250, None),
        ],
    ),
    # 3 + 6 (per participant in id order: buyer before seller).
    "seller_more_buyer_more": (
        {S: meter(gen={"solar": 150}), B: meter(other={"external": 150})},
        [
            ("p2p", S, B, "solar", 100, P, P, 18750, 18750, C),
            ("grid_buy", "grid", B, "grid", 50, BUY, BUY, 12500, 12500, None),
            ("grid_sell", S, "grid", "solar", 50, SELL, SELL, 6250, 6250, None),
        ],
    ),
    # A seller that sent no reading generated nothing.
    "seller_missing": (
        {B: meter(other={"external": 100})},
        [
            ("financial", S, B, "grid", 100, -BUY, -BUY, -25000, -25000, C),
            ("grid_buy", "grid", B, "grid", 100, BUY, BUY, 25000, 25000, None),
        ],
    ),
    # A buyer that sent no reading imported nothing: it pays for all it bought, once.
    "buyer_missing": (
        {S: meter(gen={"solar": 100})},
        [("financial", S, B, "solar", 100, P, P, 18750, 18750, C)],
    ),
    "nobody_metered": ({}, []),
    # bess covers a solar short first, the rest is financial.
    "bess_covers_part": (
        {S: meter(gen={"solar": 60, "bess": 30}), B: meter(other={"external": 100})},
        [
            ("p2p", S, B, "solar", 60, P, P, 11250, 11250, C),
            ("bess_compensation", S, B, "bess", 30, P, P, 5625, 5625, C),
            ("financial", S, B, "grid", 10, -BUY, -BUY, -2500, -2500, C),
            ("grid_buy", "grid", B, "grid", 10, BUY, BUY, 2500, 2500, None),
        ],
    ),
    "bess_covers_all": (
        {S: meter(gen={"solar": 60, "bess": 50}), B: meter(other={"external": 100})},
        [
            ("p2p", S, B, "solar", 60, P, P, 11250, 11250, C),
            ("bess_compensation", S, B, "bess", 40, P, P, 7500, 7500, C),
            ("grid_sell", S, "grid", "bess", 10, SELL, SELL, 1250, 1250, None),
        ],
    ),
    # The short is what the buyer needed (min(q, c) - g), not the whole settlement.
    "bess_covers_buyer_need_only": (
        {S: meter(gen={"solar": 20, "bess": 100}), B: meter(other={"external": 50})},
        [
            ("p2p", S, B, "solar", 20, P, P, 3750, 3750, C),
            ("bess_compensation", S, B, "bess", 30, P, P, 5625, 5625, C),
            ("grid_sell", S, "grid", "bess", 70, SELL, SELL, 8750, 8750, None),
        ],
    ),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(name: str) -> None:
    meters, expected = SCENARIOS[name]
    assert ex(ONE, meters) == expected


def test_wind_short_is_compensated_by_bess() -> None:
    meters = {S: meter(gen={"wind": 70, "bess": 100}), B: meter(other={"external": 100})}
    assert ex([settlement(S, B, 100, P, "wind")], meters) == [
        ("p2p", S, B, "wind", 70, P, P, 13125, 13125, C),
        ("bess_compensation", S, B, "bess", 30, P, P, 5625, 5625, C),
        ("grid_sell", S, "grid", "bess", 70, SELL, SELL, 8750, 8750, None),
    ]


def test_dispatch_short_is_not_compensated() -> None:
    # A bess settlement that the battery did not deliver: solar does not stand in, it is financial.
    meters = {S: meter(gen={"bess": 60, "solar": 100}), B: meter(other={"external": 100})}
    assert ex([settlement(S, B, 100, P, "bess")], meters) == [
        ("p2p", S, B, "bess", 60, P, P, 11250, 11250, C),
        ("financial", S, B, "grid", 40, -BUY, -BUY, -10000, -10000, C),
        ("grid_buy", "grid", B, "grid", 40, BUY, BUY, 10000, 10000, None),
        ("grid_sell", S, "grid", "solar", 100, SELL, SELL, 12500, 12500, None),
    ]


def test_extra_purchase_at_pay_as_bid_prices() -> None:
    s = settlement(S, B, 100, 0.25, price_sell=0.125)
    meters = {S: meter(gen={"solar": 100}), B: meter(other={"external": 60})}
    assert ex([s], meters) == [
        ("p2p", S, B, "solar", 60, 0.25, 0.125, 15000, 7500, C),
        ("financial", S, B, "solar", 40, 0.25, 0.125, 10000, 5000, C),
    ]


def test_extra_purchase_is_paid_once() -> None:
    # The reference paid the seller the settlement for the extra 40 Wh AND sold them to the grid.
    txs = run(ONE, {S: meter(gen={"solar": 100}), B: meter(other={"external": 60})})
    received = sum(t.amount_sell for t in txs if t.seller_id == S)
    assert received == ONE[0].amount_sell == 18750
    assert not [t for t in txs if t.kind == "grid_sell"]
    assert sum(t.quantity for t in txs if t.seller_id == S) == 100


def test_second_seller_to_a_saturated_buyer() -> None:
    s1 = settlement("S1", B, 100, P, seq=0)
    s2 = settlement("S2", B, 100, P, seq=1)
    meters = {"S1": meter(gen={"solar": 100}), "S2": meter(gen={"solar": 100}), B: meter(other={"external": 100})}
    assert ex([s1, s2], meters) == [
        ("p2p", "S1", B, "solar", 100, P, P, 18750, 18750, "c0-0"),
        ("financial", "S2", B, "solar", 100, P, P, 18750, 18750, "c0-1"),
    ]


def test_self_consumption_rows() -> None:
    m = meter(gen={"solar": 100}, other={"external": 0, "solar": 30, "bess": 5}, bess={"solar": 20})
    assert ex([], {"P": m}) == [
        ("self", "P", "P", "solar", 20, 0.0, 0.0, 0, 0, None),
        ("self", "P", "P", "bess", 5, 0.0, 0.0, 0, 0, None),
        ("self", "P", "P", "solar", 30, 0.0, 0.0, 0, 0, None),
        ("grid_sell", "P", "grid", "solar", 100, SELL, SELL, 12500, 12500, None),
    ]


def test_participants_in_id_order_and_sources_sorted() -> None:
    meters = {
        "Z": meter(gen={"wind": 10, "bess": 20, "solar": 30}),
        "A": meter(other={"external": 40}),
        "M": meter(gen={"solar": 8}, other={"external": 4}),
    }
    assert ex([], meters) == [
        ("grid_buy", "grid", "A", "grid", 40, BUY, BUY, 10000, 10000, None),
        ("grid_sell", "M", "grid", "solar", 8, SELL, SELL, 1000, 1000, None),
        ("grid_buy", "grid", "M", "grid", 4, BUY, BUY, 1000, 1000, None),
        ("grid_sell", "Z", "grid", "bess", 20, SELL, SELL, 2500, 2500, None),
        ("grid_sell", "Z", "grid", "solar", 30, SELL, SELL, 3750, 3750, None),
        ("grid_sell", "Z", "grid", "wind", 10, SELL, SELL, 1250, 1250, None),
    ]


DISPATCH_ORDER = (
    [settlement("S", "B1", 100, P, "solar", seq=0), settlement("S", "B2", 50, P, "bess", seq=1)],
    {
        "S": meter(gen={"solar": 50, "bess": 60}),
        "B1": meter(other={"external": 100}),
        "B2": meter(other={"external": 50}),
    },
)
DISPATCH_EXPECTED: list[TxRow] = [
    # The bess settlement (committed second) is exchanged first and takes 50 of the battery's 60 ...
    ("p2p", "S", "B2", "bess", 50, P, P, 9375, 9375, "c0-1"),
    # ... so only 10 are left to cover the solar short of 50.
    ("p2p", "S", "B1", "solar", 50, P, P, 9375, 9375, "c0-0"),
    ("bess_compensation", "S", "B1", "bess", 10, P, P, 1875, 1875, "c0-0"),
    ("financial", "S", "B1", "grid", 40, -BUY, -BUY, -10000, -10000, "c0-0"),
    ("grid_buy", "grid", "B1", "grid", 40, BUY, BUY, 10000, 10000, None),
]


def test_dispatch_settlements_first_regardless_of_commit_order() -> None:
    settlements, meters = DISPATCH_ORDER
    assert ex(settlements, meters) == DISPATCH_EXPECTED
    assert ex(settlements[::-1], meters) == DISPATCH_EXPECTED


def test_commit_order_within_a_class_not_list_order() -> None:
    a = settlement(S, "B1", 100, P, seq=0)
    b = settlement(S, "B2", 100, P, seq=1)
    meters = {S: meter(gen={"solar": 100}), "B1": meter(other={"external": 100}), "B2": meter(other={"external": 100})}
    assert (
        ex([b, a], meters)
        == ex([a, b], meters)
        == [
            ("p2p", S, "B1", "solar", 100, P, P, 18750, 18750, "c0-0"),
            ("financial", S, "B2", "grid", 100, -BUY, -BUY, -25000, -25000, "c0-1"),
            ("grid_buy", "grid", "B2", "grid", 100, BUY, BUY, 25000, 25000, None),
        ]
    )


def test_transaction_fields_and_ids() -> None:
    txs = exchange(
        (600, 660),
        [settlement(S, B, 100, P, slot=(600, 660))],
        {S: meter(gen={"solar": 150}, slot=(600, 660))},
        BUY,
        SELL,
        now=777,
    )
    assert txs == [
        Transaction(
            id="t600-0",
            kind="financial",
            time_delivery_start=600,
            time_delivery_end=660,
            seller_id=S,
            buyer_id=B,
            energy_source="solar",
            quantity=100,
            price_buy=P,
            price_sell=P,
            amount_buy=18750,
            amount_sell=18750,
            commit_id="c600-0",
            time_creation=777,
        ),
        Transaction(
            id="t600-1",
            kind="grid_sell",
            time_delivery_start=600,
            time_delivery_end=660,
            seller_id=S,
            buyer_id="grid",
            energy_source="solar",
            quantity=50,
            price_buy=SELL,
            price_sell=SELL,
            amount_buy=6250,
            amount_sell=6250,
            commit_id=None,
            time_creation=777,
        ),
    ]


def test_inputs_are_not_mutated() -> None:
    meters = {S: meter(gen={"solar": 60, "bess": 30}), B: meter(other={"external": 100})}
    before = {p: (dict(m.generation), dict(m.consumption.other)) for p, m in meters.items()}
    run(ONE, meters)
    assert {p: (dict(m.generation), dict(m.consumption.other)) for p, m in meters.items()} == before


def test_amount_rounding() -> None:
    from market.core.records import amount

    assert amount(1, 0.0015) == 2  # 1.5 micro rounds half to even -> 2
    assert amount(1, 0.0025) == 2  # 2.5 -> 2 (banker's rounding of Python round)
    assert amount(333, 0.1) == 33300
    assert amount(7, -0.25) == -1750
