"""Columnar /fleet batches decode to exactly the messages of the v1 batches."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.core.errors import MarketError
from market.core.fleet_columns import MeterColumns, OrderColumns, decode_meters, decode_orders
from market.core.protocol import FleetMetersMsg, FleetOrdersMsg, decode

SLOT = [900, 1800]
wh = st.integers(0, 10**6)
sources = st.sampled_from(["solar", "wind", "bess"])
order = st.fixed_dictionaries(
    {
        "participant": st.sampled_from(["P1", "P2", "S0001"]),
        "side": st.sampled_from(["bid", "ask"]),
        "quantity": st.integers(1, 10**6),
        "price": st.floats(-1.0, 1.0),
        "time_delivery": st.just(SLOT),
    },
    optional={"id": st.sampled_from(["900-0", "900-1"]), "source": sources},
)
reading = st.fixed_dictionaries(
    {"participant": st.sampled_from(["P1", "P2"]), "time_interval": st.just(SLOT)},
    optional={
        "generation": st.dictionaries(sources, wh, max_size=3),
        "consumption": st.fixed_dictionaries(
            {},
            optional={
                "bess": st.dictionaries(sources, wh, max_size=2),
                "other": st.dictionaries(st.sampled_from(["solar", "external"]), wh, max_size=2),
            },
        ),
    },
)


def order_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    fields = ("participant", "side", "quantity", "price", "time_delivery", "id", "source")
    return {f: [r.get(f) for r in rows] for f in fields}


def meter_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"participant": [r["participant"] for r in rows], "time_interval": [SLOT] * len(rows)}
    for name in ("generation", "bess", "other"):
        maps = [
            r.get("generation", {}) if name == "generation" else r.get("consumption", {}).get(name, {}) for r in rows
        ]
        keys = sorted({k for m in maps for k in m})
        if keys:
            out[name] = {k: [m.get(k) for m in maps] for k in keys}
    return out


@given(st.lists(order, min_size=1, max_size=20))
def test_order_columns_give_the_entries_of_the_v1_batch(rows: list[dict[str, Any]]) -> None:
    v1 = [(o.participant, o.side, o.entry()) for o in decode({"orders": rows}, FleetOrdersMsg).orders]
    assert decode(order_columns(rows), OrderColumns).items() == v1


@given(st.lists(reading, min_size=1, max_size=20))
def test_meter_columns_give_the_readings_of_the_v1_batch(rows: list[dict[str, Any]]) -> None:
    v1 = [(r.participant, r.meter()) for r in decode({"readings": rows}, FleetMetersMsg).readings]
    assert decode(meter_columns(rows), MeterColumns).items() == v1


def test_a_bad_value_is_named_by_column_and_index() -> None:
    cols = order_columns([{"participant": "P1", "side": "bid", "quantity": q, "price": 0.1, "time_delivery": SLOT}
                          for q in (5, 0)])  # fmt: skip
    with pytest.raises(MarketError) as err:
        decode(cols, OrderColumns)
    assert err.value.code == "invalid" and "$.quantity[1]" in err.value.message


def test_columns_of_other_lengths_are_invalid() -> None:
    cols = {"participant": ["P1", "P2"], "time_interval": [SLOT, SLOT], "generation": {"solar": [1]}}
    with pytest.raises(MarketError) as err:
        decode(cols, MeterColumns).items()
    assert err.value.code == "invalid" and "generation.solar" in err.value.message


def test_null_is_no_entry_and_zero_an_entry_of_zero() -> None:
    cols = {"participant": ["P1", "P2"], "time_interval": [SLOT, SLOT], "generation": {"solar": [None, 0]}}
    (_, first), (_, second) = decode(cols, MeterColumns).items()
    assert first.generation == {} and second.generation == {"solar": 0}


# Strings valid and not: the patterns' edges (a trailing newline, control characters, too
# long, letters outside the class, the separators the column checks join with). Valid
# values are drawn most often, so that whole tables are valid but for one item now and then.
refs = st.sampled_from(["P1", "S0001", "a.b:c-d_e", "x" * 64] * 8 + ["", "x" * 65, "P 1", "P1\n", "P\x00", "Pé", "\n"])
ids = st.none() | st.sampled_from(
    ["900-0", "id with spaces", "ü", "y" * 64] * 8 + ["", "y" * 65, "a\nb", "a\x00", "a\x7f", "a\n"]
)
names = st.none() | st.sampled_from(
    ["solar", "bess", "wind_2", "s" * 32] * 8 + ["Solar", "2pv", "", "s" * 33, "solar\n"]
)
loose_orders = st.integers(1, 6).flatmap(
    lambda n: st.fixed_dictionaries(
        {
            "participant": st.lists(refs, min_size=n, max_size=n),
            "side": st.lists(st.sampled_from(["bid", "ask"] * 8 + ["buy"]), min_size=n, max_size=n),
            "quantity": st.lists(st.integers(0, 10**6), min_size=n, max_size=n),
            "price": st.lists(st.floats(-2.0, 2.0), min_size=n, max_size=n),
            "time_delivery": st.lists(st.sampled_from([SLOT] * 16 + [[900, -1], [900]]), min_size=n, max_size=n),
        },
        optional={
            "id": st.lists(ids, min_size=n, max_size=n) | st.none(),
            "source": st.lists(names, min_size=n, max_size=n) | st.lists(names, min_size=n - 1, max_size=n - 1),
        },
    )
)
loose_meters = st.integers(1, 6).flatmap(
    lambda n: st.fixed_dictionaries(
        {
            "participant": st.lists(refs, min_size=n, max_size=n),
            "time_interval": st.lists(st.sampled_from([SLOT, [900, -1]]), min_size=n, max_size=n),
        },
        optional={
            k: st.dictionaries(names.filter(lambda s: s is not None), st.lists(st.none() | wh, min_size=n, max_size=n))
            for k in ("generation", "bess", "other")
        },
    )
)


def _outcome(decoder: Any, data: Any) -> Any:
    try:
        return decoder(data)
    except MarketError as err:
        return err.code, err.message


@settings(max_examples=400)
@given(loose_orders)
def test_decode_orders_gives_the_table_or_the_error_of_the_strict_conversion(data: dict[str, Any]) -> None:
    assert _outcome(decode_orders, data) == _outcome(lambda d: decode(d, OrderColumns), data)


@settings(max_examples=400)
@given(loose_meters)
def test_decode_meters_gives_the_table_or_the_error_of_the_strict_conversion(data: dict[str, Any]) -> None:
    assert _outcome(decode_meters, data) == _outcome(lambda d: decode(d, MeterColumns), data)


def test_decode_orders_names_a_bad_participant_as_the_strict_conversion() -> None:
    data = {"participant": ["P1", "P 2"], "side": ["bid"] * 2, "quantity": [1, 1], "price": [0.1] * 2}
    data["time_delivery"] = [SLOT, SLOT]
    assert _outcome(decode_orders, data) == (
        "invalid",
        "Expected `str` matching regex '^[A-Za-z0-9_.:-]+$' - at `$.participant[1]`",
    )
    assert _outcome(decode_orders, "nope") == ("invalid", "payload must be an object, got str")


EDGES = {
    "participant": ["", "x" * 64, "x" * 65, "P 1", "P1\n", "P\x00", "Pé", "\n", "a.b:c-d_e"],
    "id": ["", "y" * 64, "y" * 65, "a\nb", "a\x00", "a\x7f", "a\x1f", "ü", "with spaces", None],
    "source": ["Solar", "2pv", "", "s" * 32, "s" * 33, "solar\n", "wind_2", None],
}


@pytest.mark.parametrize(("column", "value"), [(c, v) for c, vs in EDGES.items() for v in vs])
def test_decode_orders_with_each_edge_string_in_one_item(column: str, value: Any) -> None:
    """Each edge of the strings' types, alone in an otherwise valid table."""
    data: dict[str, Any] = {
        "participant": ["P1", "P2", "P3"],
        "side": ["bid", "ask", "bid"],
        "quantity": [1, 2, 3],
        "price": [0.1, 0.2, 0.3],
        "time_delivery": [SLOT] * 3,
        "id": ["900-0", "900-1", None],
        "source": [None, "solar", "bess"],
    }
    data[column][1] = value
    assert _outcome(decode_orders, data) == _outcome(lambda d: decode(d, OrderColumns), data)


@pytest.mark.parametrize("value", [*EDGES["participant"], *(v for v in EDGES["source"] if v is not None)])
def test_decode_meters_with_each_edge_string(value: str) -> None:
    """A participant edge in one reading, or a source edge as a column's name."""
    base = {"participant": ["P1", "P2"], "time_interval": [SLOT, SLOT], "other": {"external": [1, 2]}}
    as_participant = {**base, "participant": ["P1", value]}
    as_source = {**base, "generation": {value: [1, None]}}
    for data in (as_participant, as_source):
        assert _outcome(decode_meters, data) == _outcome(lambda d: decode(d, MeterColumns), data)
