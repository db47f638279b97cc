"""Weather from a TMY3 file: outdoor temperature, global horizontal irradiance and wind.

The reader is our own (csv + numpy, strict like the scenario decoder): pvlib is used only
for the real sample file it ships, `723170TYA.CSV` (Greensboro NC, hot summers).

TMY3 layout (NREL, Wilcox & Marion 2008): line 1 is the station (id, name, state, time zone
offset in hours from UTC, latitude, longitude, elevation in m); line 2 the column names;
then 8760 hourly rows in local standard time (no daylight saving), labelled `MM/DD/YYYY`
and `HH:MM` from 01:00 to 24:00. A row labelled HH:00 describes the hour *ending* then:
its temperature and wind are the values observed at HH:00, its irradiance is the mean over
the hour before. The years differ by month (a typical year is stitched from real months),
so only month, day and hour are kept and mapped onto the calendar year asked for.
"""

from __future__ import annotations

import calendar
import csv
import datetime as dt
import functools
import math
import os
from dataclasses import dataclass
from importlib.resources import as_file, files

import numpy as np

GREENSBORO = "723170TYA.CSV"  # pvlib's sample TMY3 file
SHIPPED = "greensboro"  # the scenario name of that file
HOURS = 8760
TEMPERATURE = "Dry-bulb (C)"
GHI = "GHI (W/m^2)"
WIND = "Wspd (m/s)"
_DATE, _TIME = "Date (MM/DD/YYYY)", "Time (HH:MM)"
# Physical sanity bounds: a value outside them is a broken file, not weather.
_BOUNDS = {TEMPERATURE: (-90.0, 70.0), GHI: (0.0, 1500.0), WIND: (0.0, 120.0)}


@dataclass(frozen=True, eq=False)
class Conditions:
    """Weather at some times: outdoor dry-bulb (C), GHI (W/m2), wind speed (m/s)."""

    temperature: np.ndarray
    ghi: np.ndarray
    wind: np.ndarray


@dataclass(frozen=True, eq=False)
class Weather:
    """A TMY3 year mapped onto calendar `year`. `time` holds the Unix seconds (UTC) at which
    each hour ends; the arrays are read-only and aligned with it. In a leap year Feb 29
    repeats Feb 28 (TMY3 has no Feb 29), so there are 8784 hours instead of 8760."""

    station: str
    name: str
    tz_hours: float  # local standard time minus UTC
    latitude: float
    longitude: float
    elevation_m: float
    year: int
    time: np.ndarray  # int64, end of each hour
    temperature: np.ndarray
    ghi: np.ndarray
    wind: np.ndarray

    @property
    def start(self) -> int:
        """Unix time of Jan 1 00:00 local standard time of `year`."""
        return int(self.time[0]) - 3600

    @property
    def period(self) -> int:
        """Length of the year in seconds (the weather repeats with this period)."""
        return len(self.time) * 3600

    def at(self, t: float | np.ndarray) -> Conditions:
        """Values at Unix times `t` (any times: the year repeats), interpolated linearly.

        Temperature and wind are instantaneous at the end of their hour, so they are placed
        there; an hour's irradiance is a mean, so it is placed at the hour's midpoint (this
        keeps noon at noon instead of half an hour late)."""
        x = np.asarray(t, dtype=float) - self.start
        ends = (self.time - self.start).astype(float)
        p = float(self.period)
        return Conditions(
            temperature=np.interp(x, ends, self.temperature, period=p),
            ghi=np.interp(x, ends - 1800.0, self.ghi, period=p),
            wind=np.interp(x, ends, self.wind, period=p),
        )


def read_tmy3(path: str | os.PathLike[str], year: int) -> Weather:
    """Read a TMY3 CSV file and map it onto `year`. A malformed file raises ValueError
    naming the file and line."""
    where = os.fspath(path)
    with open(where, newline="", encoding="latin-1") as fh:
        rows = csv.reader(fh)
        head = next(rows, None)
        if head is None:
            raise ValueError(f"{where}:1: empty file")
        station, name, tz, lat, lon, elev = _station(where, head)
        names = next(rows, None)
        if names is None:
            raise ValueError(f"{where}:2: missing the column header line")
        cols = _columns(where, names)
        temp: list[float] = []
        ghi: list[float] = []
        wind: list[float] = []
        for lineno, row in enumerate(rows, start=3):
            if not row or all(not c.strip() for c in row):
                continue
            hour = len(temp)
            if hour >= HOURS:
                raise ValueError(f"{where}:{lineno}: more than {HOURS} hourly rows")
            if len(row) < len(names):
                raise ValueError(f"{where}:{lineno}: {len(row)} fields, the header has {len(names)}")
            _check_label(where, lineno, row[cols[_DATE]], row[cols[_TIME]], hour)
            temp.append(_value(where, lineno, row, cols, TEMPERATURE))
            ghi.append(_value(where, lineno, row, cols, GHI))
            wind.append(_value(where, lineno, row, cols, WIND))
    if len(temp) < HOURS:
        raise ValueError(f"{where}:{len(temp) + 3}: file ends after {len(temp)} hourly rows, expected {HOURS}")
    arrays = [np.array(v) for v in (temp, ghi, wind)]
    if calendar.isleap(year):
        feb28 = slice(58 * 24, 59 * 24)  # hours of Feb 28 (day 59 of the year)
        arrays = [np.concatenate([a[: feb28.stop], a[feb28], a[feb28.stop :]]) for a in arrays]
    start = calendar.timegm(dt.date(year, 1, 1).timetuple()) - round(tz * 3600)
    time = start + 3600 * np.arange(1, len(arrays[0]) + 1, dtype=np.int64)
    for a in (time, *arrays):
        a.setflags(write=False)
    return Weather(station, name, tz, lat, lon, elev, year, time, *arrays)


def pvlib_tmy3(year: int, name: str = GREENSBORO) -> Weather:
    """A TMY3 file that pvlib ships (its `data` directory), mapped onto `year`."""
    with as_file(files("pvlib") / "data" / name) as path:
        return read_tmy3(path, year)


@functools.lru_cache(maxsize=8)
def _cached(name: str, year: int) -> Weather:
    return pvlib_tmy3(year) if name == SHIPPED else read_tmy3(name, year)


def load_weather(name: str, year: int, base_dir: str | os.PathLike[str] | None = None) -> Weather:
    """The weather a scenario names (`SHIPPED`: pvlib's Greensboro file; else a TMY3 path,
    relative to `base_dir`) mapped onto `year`; read once per process and year."""
    if name != SHIPPED and base_dir is not None and not os.path.isabs(name):
        name = os.path.join(base_dir, name)
    return _cached(name, year)


def year_of(t: int, w_tz_hours: float = 0.0) -> int:
    """The calendar year of Unix time `t` (UTC shifted by `w_tz_hours`)."""
    return dt.datetime.fromtimestamp(t + w_tz_hours * 3600, dt.UTC).year


def _station(where: str, head: list[str]) -> tuple[str, str, float, float, float, float]:
    if len(head) < 7:
        raise ValueError(f"{where}:1: station line needs 7 fields (id, name, state, tz, lat, lon, elev)")
    try:
        tz, lat, lon, elev = (float(v) for v in head[3:7])
    except ValueError:
        raise ValueError(f"{where}:1: tz, latitude, longitude and elevation must be numbers: {head[3:7]}") from None
    if not (-12 <= tz <= 14 and -90 <= lat <= 90 and -180 <= lon <= 180 and math.isfinite(elev)):
        raise ValueError(f"{where}:1: tz {tz}, latitude {lat} or longitude {lon} out of range")
    return head[0].strip(), head[1].strip(), tz, lat, lon, elev


def _columns(where: str, names: list[str]) -> dict[str, int]:
    index = {n.strip(): i for i, n in enumerate(names)}
    needed = (_DATE, _TIME, TEMPERATURE, GHI, WIND)
    missing = [n for n in needed if n not in index]
    if missing:
        raise ValueError(f"{where}:2: missing column(s) {', '.join(missing)}")
    return {n: index[n] for n in needed}


def _expected(hour: int) -> tuple[int, int, int]:
    """(month, day, hour label 1..24) of the `hour`-th row of a 365-day year."""
    day, h = divmod(hour, 24)
    d = dt.date(2001, 1, 1) + dt.timedelta(days=day)  # 2001: any non-leap year
    return d.month, d.day, h + 1


def _check_label(where: str, lineno: int, date: str, time: str, hour: int) -> None:
    month, day, h = _expected(hour)
    try:
        mm, dd, _yyyy = (int(p) for p in date.strip().split("/"))
        hh, mi = (int(p) for p in time.strip().split(":"))
    except ValueError:
        raise ValueError(f"{where}:{lineno}: bad date/time {date!r} {time!r} (want MM/DD/YYYY and HH:MM)") from None
    if (mm, dd, hh, mi) != (month, day, h, 0):
        raise ValueError(
            f"{where}:{lineno}: expected hour {month:02d}/{day:02d} {h:02d}:00, found {date.strip()} {time.strip()}"
        )


def _value(where: str, lineno: int, row: list[str], cols: dict[str, int], name: str) -> float:
    text = row[cols[name]].strip()
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{where}:{lineno}: {name} is not a number: {text!r}") from None
    lo, hi = _BOUNDS[name]
    if not lo <= v <= hi:  # also refuses nan
        raise ValueError(f"{where}:{lineno}: {name} {text} outside [{lo:g}, {hi:g}]")
    return v
