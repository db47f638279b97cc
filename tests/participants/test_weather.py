import calendar
import csv
import datetime as dt
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from participants.weather import GHI, GREENSBORO, TEMPERATURE, WIND, pvlib_tmy3, read_tmy3

SOURCE = files("pvlib") / "data" / GREENSBORO
LINES = SOURCE.read_text(encoding="latin-1").splitlines()
COLUMNS = next(csv.reader([LINES[1]]))


def row(line: int) -> dict[str, str]:
    """The file's own fields of (1-based) `line`, parsed independently of the reader."""
    return dict(zip(COLUMNS, next(csv.reader([LINES[line - 1]])), strict=True))


@pytest.fixture(scope="module")
def weather():
    return pvlib_tmy3(2023)


def test_reads_the_station_and_the_first_row(weather):
    assert (weather.station, weather.name, weather.tz_hours) == ("723170", "GREENSBORO PIEDMONT TRIAD INT", -5.0)
    assert (weather.latitude, weather.longitude) == (36.1, -79.95)
    assert len(weather.time) == 8760
    first = row(3)
    assert (first["Date (MM/DD/YYYY)"][:5], first["Time (HH:MM)"]) == ("01/01", "01:00")
    assert weather.temperature[0] == float(first[TEMPERATURE])
    assert weather.ghi[0] == float(first[GHI])
    assert weather.wind[0] == float(first[WIND])
    # 01:00 local standard time (UTC-5) on Jan 1 2023 is 06:00 UTC.
    assert weather.time[0] == calendar.timegm(dt.datetime(2023, 1, 1, 6).timetuple())


def test_a_summer_afternoon_row(weather):
    hour = (dt.date(2023, 7, 10) - dt.date(2023, 1, 1)).days * 24 + 14  # the row labelled 07/10 15:00
    fields = row(3 + hour)
    assert (fields["Date (MM/DD/YYYY)"][:5], fields["Time (HH:MM)"]) == ("07/10", "15:00")
    assert weather.temperature[hour] == float(fields[TEMPERATURE])
    assert weather.ghi[hour] == float(fields[GHI]) > 0
    assert weather.wind[hour] == float(fields[WIND])
    assert weather.time[hour] == calendar.timegm(dt.datetime(2023, 7, 10, 20).timetuple())


def test_arrays_are_read_only(weather):
    with pytest.raises(ValueError):
        weather.temperature[0] = 99.0


def test_at_returns_the_hourly_values_at_their_times(weather):
    i = np.arange(100, 200)
    c = weather.at(weather.time[i])
    assert np.array_equal(c.temperature, weather.temperature[i])
    assert np.array_equal(c.wind, weather.wind[i])
    # An hour's irradiance is its mean: it stands at the middle of the hour it ends.
    assert np.array_equal(weather.at(weather.time[i] - 1800).ghi, weather.ghi[i])


def test_at_interpolates_linearly(weather):
    i = 4000
    t = weather.time[i] + 900  # a quarter into the next hour
    expected = 0.75 * weather.temperature[i] + 0.25 * weather.temperature[i + 1]
    assert weather.at(t).temperature == pytest.approx(expected, abs=1e-12)


def test_the_year_repeats(weather):
    t = weather.time[::97].astype(float) + 123.0
    a, b = weather.at(t), weather.at(t + weather.period)
    assert np.allclose(a.temperature, b.temperature) and np.allclose(a.ghi, b.ghi)
    # Between the last row (Dec 31 24:00) and the first (Jan 1 01:00) the year wraps.
    mid = weather.at(weather.start + 1800).temperature
    assert mid == pytest.approx((weather.temperature[-1] + weather.temperature[0]) / 2)


def test_a_leap_year_repeats_feb_28():
    leap = pvlib_tmy3(2024)
    assert len(leap.time) == 8784
    feb28 = slice(58 * 24, 59 * 24)
    feb29 = slice(59 * 24, 60 * 24)
    assert np.array_equal(leap.temperature[feb28], leap.temperature[feb29])
    assert leap.time[feb29][0] == calendar.timegm(dt.datetime(2024, 2, 29, 6).timetuple())
    assert np.all(np.diff(leap.time) == 3600)


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text("".join(line + "\n" for line in lines), encoding="latin-1")
    return path


def replace_field(line: str, column: str, value: str) -> str:
    fields = next(csv.reader([line]))
    fields[COLUMNS.index(column)] = value
    return ",".join(fields)


@pytest.mark.parametrize(
    ("mutate", "line", "message"),
    [
        (lambda ls: [], 1, "empty file"),
        (lambda ls: ["723170,GREENSBORO,NC,abc,36.1,-79.9,273", *ls[1:]], 1, "must be numbers"),
        (lambda ls: ["723170,GREENSBORO,NC", *ls[1:]], 1, "7 fields"),
        (lambda ls: ls[:1], 2, "column header"),
        (lambda ls: [ls[0], ls[1].replace("Dry-bulb (C)", "Temp"), *ls[2:]], 2, "Dry-bulb (C)"),
        (lambda ls: [*ls[:9], replace_field(ls[9], GHI, "n/a"), *ls[10:]], 10, "GHI (W/m^2) is not a number"),
        (lambda ls: [*ls[:9], replace_field(ls[9], TEMPERATURE, "nan"), *ls[10:]], 10, "outside"),
        (lambda ls: [*ls[:9], replace_field(ls[9], WIND, "-3"), *ls[10:]], 10, "Wspd (m/s) -3 outside"),
        (lambda ls: [*ls[:4], *ls[5:]], 5, "expected hour 01/01 03:00, found 01/01/1988 04:00"),
        (lambda ls: [*ls[:6], replace_field(ls[6], "Time (HH:MM)", "4pm"), *ls[7:]], 7, "bad date/time"),
        (lambda ls: [*ls[:6], ls[6][:40], *ls[7:]], 7, "fields, the header has"),
        (lambda ls: ls[:-10], 8753, "ends after 8750 hourly rows"),
        (lambda ls: [*ls, ls[-1]], 8763, "more than 8760"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, mutate, line, message):
    path = write(tmp_path, mutate(LINES))
    with pytest.raises(ValueError) as info:
        read_tmy3(path, 2023)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert message in str(info.value)


def test_pv_and_wind_follow_the_weather_file() -> None:
    """`weather = "greensboro"` on a PV array or a turbine: its output follows the file (the
    houses' weather), not the synthetic models, and a night slot gives no PV."""
    from participants.profiles import build_profiles
    from participants.spec import decode_spec
    from participants.weather import pvlib_tmy3

    site = decode_spec(
        {"id": "W1", "pv": {"kw": 10.0, "weather": "greensboro"}, "wind": {"kw": 5.0, "weather": "greensboro"}}
    )
    profiles = build_profiles(site, 0, "America/New_York")
    w = pvlib_tmy3(2023)
    noon = 1_689_051_600 + 12 * 3600  # 2023-07-10 12:00 local standard time
    for start in (noon, noon - 12 * 3600):
        gen, _ = profiles.slot((start, start + 900))
        minutes = start + 30 + 60 * np.arange(15)
        ghi = w.at(minutes).ghi.mean()
        assert gen["solar"] == round(10_000 * 0.85 * ghi / 1000 * 0.25)
        assert (gen["solar"] > 1000) == (start == noon)
        wind = w.at(minutes).wind * 3 ** (1 / 7)
        expected = np.where(
            (wind < 3) | (wind >= 25), 0, np.where(wind < 12, 5000 * np.clip((wind**3 - 27) / (12**3 - 27), 0, 1), 5000)
        )
        assert gen["wind"] == round(float(expected.mean()) * 0.25)
    day = sum(
        profiles.slot((noon - 12 * 3600 + k * 900, noon - 12 * 3600 + (k + 1) * 900))[0]["wind"] for k in range(96)
    )
    assert day > 1000  # the file's winds turn it on that day (a check of the curve, not of zeros)
    synthetic = build_profiles(decode_spec({"id": "W1", "pv": {"kw": 10.0}}), 0, "America/New_York")
    assert synthetic.slot((noon, noon + 900))[0]["solar"] != profiles.slot((noon, noon + 900))[0]["solar"]
