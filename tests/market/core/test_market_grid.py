"""Grid tariff (buy = sell * (1 + fee), time of use in a named zone) and grid states."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from market.core.grid import GridStates, GridTariff, TouRule


def ts(y: int, mo: int, d: int, h: int, mi: int = 0) -> int:
    """Unix seconds of a UTC time."""
    return int(datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp())


def test_flat_tariff() -> None:
    t = GridTariff(price=0.1, fee=0.5)
    assert t.sell_price(0) == 0.1
    assert t.buy_price(0) == pytest.approx(0.15)
    assert t.prices(0) == (t.buy_price(0), t.sell_price(0))


@pytest.mark.parametrize("fee", [0.0, 0.25, 1.0, 3.0])
def test_buy_is_sell_times_one_plus_fee(fee: float) -> None:
    t = GridTariff(price=0.08, fee=fee, tou=[TouRule(price=0.3, hours=[18])])
    for start in (ts(2024, 1, 10, 12), ts(2024, 1, 10, 18)):
        buy, sell = t.prices(start)
        assert buy == sell * (1 + fee) == t.buy_price(start)
        assert sell == t.sell_price(start)


def test_defaults() -> None:
    t = GridTariff()
    assert t.prices(0) == (0.2, 0.1)


BERLIN = GridTariff(
    price=0.10,
    fee=1.0,
    timezone="Europe/Berlin",
    tou=[
        TouRule(price=0.05, days="weekend"),
        TouRule(price=0.30, days="weekday", hours=[18, 19]),
        TouRule(price=0.07, months=[6, 7, 8], hours=[12, 13]),
        TouRule(price=0.99, hours=[2]),
    ],
)


@pytest.mark.parametrize(
    ("start", "sell"),
    [
        # Winter (CET = UTC+1): 17:00 UTC is 18:00 local on a Friday.
        (ts(2024, 3, 29, 17), 0.30),
        (ts(2024, 3, 29, 16, 45), 0.10),
        (ts(2024, 3, 29, 18, 45), 0.30),  # 19:45 local
        (ts(2024, 3, 29, 19), 0.10),  # 20:00 local
        # Friday 23:30 UTC is Saturday 00:30 local: weekend, judged in the local zone.
        (ts(2024, 3, 29, 23, 30), 0.05),
        (ts(2024, 3, 29, 22, 45), 0.10),  # Friday 23:45 local
        # Summer (CEST = UTC+2): 16:00 UTC is 18:00 local on a Tuesday; 17:00 UTC is 19:00.
        (ts(2024, 4, 2, 16), 0.30),
        (ts(2024, 4, 2, 17), 0.30),
        (ts(2024, 4, 2, 18), 0.10),
        # Months in local time: 31 May 22:30 UTC is 1 June 00:30 local (Saturday -> weekend first).
        (ts(2024, 6, 3, 10), 0.07),  # Monday 12:00 CEST
        (ts(2024, 5, 31, 10), 0.10),  # Friday 12:00 CEST in May
        (ts(2024, 9, 2, 10), 0.10),  # September
        # First match wins: a summer weekend noon is the weekend price.
        (ts(2024, 6, 1, 10), 0.05),
    ],
)
def test_time_of_use_in_named_zone(start: int, sell: float) -> None:
    assert BERLIN.sell_price(start) == sell
    assert BERLIN.buy_price(start) == pytest.approx(2 * sell)


def test_spring_forward_day() -> None:
    # 2024-03-31 (a Sunday): 02:00 CET jumps to 03:00 CEST; use a weekday rule table.
    t = GridTariff(
        price=0.1, timezone="Europe/Berlin", tou=[TouRule(price=0.5, hours=[2]), TouRule(price=0.4, hours=[3])]
    )
    quarter_hours = [ts(2024, 3, 31, 0) + 900 * k for k in range(8)]  # 00:00..01:45 UTC
    # 00:00-00:45 UTC is 01:xx CET; 01:00-01:45 UTC is 03:xx CEST: local hour 2 never occurs.
    assert [t.sell_price(s) for s in quarter_hours] == [0.1] * 4 + [0.4] * 4


def test_fall_back_day() -> None:
    # 2024-10-27: 03:00 CEST falls back to 02:00 CET, so local hour 2 lasts two UTC hours.
    t = GridTariff(price=0.1, timezone="Europe/Berlin", tou=[TouRule(price=0.5, hours=[2])])
    prices = [t.sell_price(ts(2024, 10, 26, 23) + 900 * k) for k in range(12)]  # 23:00..01:45 UTC
    assert prices == [0.1] * 4 + [0.5] * 8


def test_same_utc_hour_differs_across_dst() -> None:
    t = GridTariff(price=0.1, timezone="America/New_York", tou=[TouRule(price=0.2, hours=[12])])
    assert t.sell_price(ts(2024, 1, 10, 17)) == 0.2  # EST: 12:00 local
    assert t.sell_price(ts(2024, 7, 10, 16)) == 0.2  # EDT: 12:00 local
    assert t.sell_price(ts(2024, 7, 10, 17)) == 0.1


def test_tariff_decodes_from_config() -> None:
    t = msgspec.convert(
        {"price": 0.1, "fee": 0.2, "timezone": "Europe/Berlin", "tou": [{"price": 0.2, "days": "weekend"}]},
        GridTariff,
    )
    assert t.tou == [TouRule(price=0.2, days="weekend")]


@pytest.mark.parametrize(
    "bad",
    [
        {"timezone": "Mars/Olympus"},
        {"timezone": "../etc"},
        {"price": -0.1},
        {"fee": -1},
        {"tou": [{"price": 0.1, "months": [13]}]},
        {"tou": [{"price": 0.1, "hours": [24]}]},
        {"tou": [{"price": 0.1, "days": "sunday"}]},
        {"tou": [{"price": 0.1, "minutes": [0]}]},
        {"surprise": 1},
    ],
)
def test_bad_tariff_is_a_validation_error(bad: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(bad, GridTariff)


def test_grid_states() -> None:
    g = GridStates()
    assert g.get(0) == "GREEN"
    g.set(60, "RED")
    g.set(120, "YELLOW")
    assert (g.get(0), g.get(60), g.get(120)) == ("GREEN", "RED", "YELLOW")
    g.forget_before(120)
    assert (g.get(60), g.get(120)) == ("GREEN", "YELLOW")
