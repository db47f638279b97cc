"""Decoding of wire payloads (PROTOCOL.md section Replies): strict, and `invalid` on any fault."""

from __future__ import annotations

import math
from typing import Any

import pytest

from market.core.errors import MarketError
from market.core.protocol import (
    MAX_ORDERS,
    MAX_QUANTITY,
    CancelMsg,
    EmptyMsg,
    EntryMsg,
    MeterMsg,
    OrdersMsg,
    StepMsg,
    decode,
    ok,
)

GOOD: dict[str, Any] = {"quantity": 100, "price": 0.12, "time_delivery": [120, 180]}


def invalid(payload: Any, kind: type[Any] = EntryMsg) -> str:
    with pytest.raises(MarketError) as info:
        decode(payload, kind)
    assert info.value.code == "invalid"
    assert info.value.reply() == {"ok": False, "error": {"code": "invalid", "message": info.value.message}}
    return info.value.message


def test_entry_decodes_to_a_frozen_struct() -> None:
    msg = decode({**GOOD, "id": "x1", "source": "solar"}, EntryMsg)
    assert msg == EntryMsg(quantity=100, price=0.12, time_delivery=(120, 180), id="x1", source="solar")
    with pytest.raises(AttributeError):
        msg.quantity = 5  # type: ignore[misc]


def test_integer_price_is_a_number() -> None:
    assert decode({**GOOD, "price": 1}, EntryMsg).price == 1.0


@pytest.mark.parametrize("field", ["quantity", "price"])
@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_a_number(field: str, value: bool) -> None:
    assert "bool" in invalid({**GOOD, field: value})


@pytest.mark.parametrize("value", ["1", None, [1], {"v": 1}])
def test_string_or_other_type_where_a_number_is_due(value: Any) -> None:
    invalid({**GOOD, "price": value})
    invalid({**GOOD, "quantity": value})


@pytest.mark.parametrize("price", [math.nan, math.inf, -math.inf, 1e7, -1e7])
def test_non_finite_or_huge_price_refused(price: float) -> None:
    invalid({**GOOD, "price": price})


@pytest.mark.parametrize("quantity", [0, -1, -(10**12), MAX_QUANTITY + 1, 1.5, 100.0])
def test_bad_quantity_refused(quantity: Any) -> None:
    invalid({**GOOD, "quantity": quantity})


def test_quantity_bounds_inclusive() -> None:
    assert decode({**GOOD, "quantity": 1}, EntryMsg).quantity == 1
    assert decode({**GOOD, "quantity": MAX_QUANTITY}, EntryMsg).quantity == MAX_QUANTITY


def test_negative_price_is_a_wire_number() -> None:
    # The wire accepts any finite price in the wire bound; the engine applies market bounds.
    assert decode({**GOOD, "price": -0.5}, EntryMsg).price == -0.5


@pytest.mark.parametrize(
    "extra",
    [{"participant_id": "P2"}, {"side": "bid"}, {"Quantity": 1}, {"uuid": "x"}],
)
def test_unknown_fields_refused(extra: dict[str, Any]) -> None:
    # In particular a payload can never name a participant: the id is the session's.
    assert "unknown field" in invalid({**GOOD, **extra})


@pytest.mark.parametrize("missing", ["quantity", "price", "time_delivery"])
def test_missing_required_field(missing: str) -> None:
    invalid({k: v for k, v in GOOD.items() if k != missing})


def test_string_lengths() -> None:
    assert decode({**GOOD, "id": "x" * 64}, EntryMsg).id == "x" * 64
    invalid({**GOOD, "id": "x" * 65})
    invalid({**GOOD, "id": ""})
    invalid({**GOOD, "source": "s" * 33})
    invalid(
        {"uuid": "u" * 129},
        CancelMsg,
    )
    assert decode({"uuid": "u" * 128}, CancelMsg).uuid == "u" * 128


@pytest.mark.parametrize("source", ["Solar", "1solar", "so lar", "", "solar!", "ünder"])
def test_source_names(source: str) -> None:
    invalid({**GOOD, "source": source})


@pytest.mark.parametrize(
    "interval",
    [[120], [120, 180, 240], [-60, 0], [120.0, 180], ["120", "180"], [True, 60], 120, {"s": 120}, [2**41, 2**41 + 60]],
)
def test_bad_interval(interval: Any) -> None:
    invalid({**GOOD, "time_delivery": interval})


@pytest.mark.parametrize("payload", [None, [], "bid", 5, b"{}"])
def test_payload_must_be_an_object(payload: Any) -> None:
    assert "payload must be an object" in invalid(payload)


def test_empty_message() -> None:
    assert decode(None, EmptyMsg) == EmptyMsg()
    assert decode({}, EmptyMsg) == EmptyMsg()
    invalid({"x": 1}, EmptyMsg)


def order(**over: Any) -> dict[str, Any]:
    return {"side": "bid", **GOOD, **over}


def test_orders_batch() -> None:
    msg = decode({"orders": [order(), order(side="ask", source="solar", id="a")]}, OrdersMsg)
    assert [o.side for o in msg.orders] == ["bid", "ask"]
    assert msg.orders[1].entry() == EntryMsg(100, 0.12, (120, 180), "a", "solar")


def test_orders_batch_limits() -> None:
    assert len(decode({"orders": [order()] * MAX_ORDERS}, OrdersMsg).orders) == 1000
    invalid({"orders": [order()] * (MAX_ORDERS + 1)}, OrdersMsg)
    invalid({"orders": []}, OrdersMsg)


def test_oversized_batch_is_too_large_before_decoding() -> None:
    # The server checks the size first, so a client learns to split rather than to fix its orders.
    with pytest.raises(MarketError) as info:
        OrdersMsg.check_size({"orders": [order()] * (MAX_ORDERS + 1)})
    assert info.value.code == "too_large"
    OrdersMsg.check_size({"orders": [order()] * MAX_ORDERS})
    OrdersMsg.check_size({"orders": "not a list"})  # left to decode: invalid
    OrdersMsg.check_size(None)


@pytest.mark.parametrize(
    "bad",
    [order(side="buy"), order(side=None), {**GOOD}, order(quantity=True), order(extra=1), "bid", None],
)
def test_orders_batch_refused_as_a_whole_on_a_malformed_order(bad: Any) -> None:
    invalid({"orders": [order(), bad]}, OrdersMsg)


def test_meter_decodes() -> None:
    msg = decode(
        {
            "time_interval": [0, 60],
            "generation": {"solar": 500},
            "consumption": {"bess": {"solar": 20}, "other": {"external": 300, "solar": 100}},
        },
        MeterMsg,
    )
    assert msg.generation == {"solar": 500}
    assert msg.consumption.bess == {"solar": 20}
    assert msg.consumption.other == {"external": 300, "solar": 100}
    bare = decode({"time_interval": [0, 60]}, MeterMsg)
    assert bare.generation == {} and bare.consumption.other == {} and bare.consumption.bess == {}


@pytest.mark.parametrize(
    "meter",
    [
        {"time_interval": [0, 60], "generation": {"solar": -1}},
        {"time_interval": [0, 60], "generation": {"solar": 1.0}},
        {"time_interval": [0, 60], "generation": {"solar": True}},
        {"time_interval": [0, 60], "generation": {"solar": MAX_QUANTITY + 1}},
        {"time_interval": [0, 60], "generation": {"Solar": 1}},
        {"time_interval": [0, 60], "generation": [["solar", 1]]},
        {"time_interval": [0, 60], "generation": {f"s{i}": 1 for i in range(17)}},
        {"time_interval": [0, 60], "consumption": {"other": {"external": "5"}}},
        {"time_interval": [0, 60], "consumption": {"other": []}},
        {"time_interval": [0, 60], "consumption": [1]},
        {"time_interval": [0, 60], "consumption": {"other": {}, "grid": {}}},
        {"time_interval": [0, 60], "consumption": {"bess": {"solar": None}}},
        {"time_interval": [0, 60], "participant_id": "P1"},
        {"generation": {"solar": 1}},
    ],
)
def test_meter_refused(meter: dict[str, Any]) -> None:
    invalid(meter, MeterMsg)


def test_step() -> None:
    assert decode({"time": 60}, StepMsg) == StepMsg(60, None)
    assert decode({"time": 60, "duration": 900}, StepMsg).duration == 900
    for bad in ({"time": -1}, {"time": 60, "duration": 0}, {"time": 60, "duration": 86401}, {"time": "60"}):
        invalid(bad, StepMsg)


def test_ok_reply() -> None:
    assert ok() == {"ok": True}
    assert ok(entry={"uuid": "u"}) == {"ok": True, "entry": {"uuid": "u"}}
