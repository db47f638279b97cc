"""Columnar /fleet batches decode to exactly the messages of the v1 batches."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from market.core.errors import MarketError
from market.core.fleet_columns import MeterColumns, OrderColumns
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
