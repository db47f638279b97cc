"""Energy profiles: `(generation_wh, consumption_wh)` of a site for any slot.

A profile is a pure function of (spec, seed, slot): synthetic ones (household load, PV,
wind) live in `participants.synthetic`; CSV profiles are resampled here with exact
integer arithmetic.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import itertools
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

import numpy as np

from participants.spec import CsvLoad, ParticipantSpec, SyntheticLoad
from participants.synthetic import DAY, LoadProfile, SolarProfile, WindProfile, _Synthetic, stable_key
from participants.weather import load_weather, year_of


class Profile(Protocol):
    def energy(self, start: int, end: int) -> tuple[int, int]:
        """(generation, consumption) in Wh during [start, end)."""
        ...


class _Day:
    """A synthetic profile's wrapper: its days of slots come from `_inner`."""

    _inner: _Synthetic


class _Consumption(_Day):
    def __init__(self, inner: LoadProfile) -> None:
        self._inner = inner

    def energy(self, start: int, end: int) -> tuple[int, int]:
        return 0, self._inner.wh(start, end)

    def day_of(self, start: int, d: int) -> tuple[list[int], int]:
        """The consumption of the day's block of slots holding `start` (`_Synthetic.day_of`)."""
        return self._inner.day_of(start, d)


class _WeatherPv:
    """PV output from a weather file's GHI (the houses' weather: participants/weather.py):
    kW x GHI/1000 x PERFORMANCE, the mean of per-minute values over the slot, in Wh.
    A horizontal array: GHI is what the file gives, and the houses' solar gain uses it too."""

    PERFORMANCE = SolarProfile.PERFORMANCE

    def __init__(self, kw: float, weather: str, base_dir: str | Path | None) -> None:
        self._w = kw * 1000 * self.PERFORMANCE
        self._name, self._base = weather, base_dir

    def energy(self, start: int, end: int) -> tuple[int, int]:
        if end <= start:
            return 0, 0
        w = load_weather(self._name, year_of(start), self._base)
        minutes = start + 30 + 60 * np.arange((end - start + 59) // 60)
        ghi = w.at(minutes).ghi
        return round(self._w * float(ghi.mean()) / 1000 * (end - start) / 3600), 0


class _WeatherWind:
    """Turbine output from a weather file's wind speed at 10 m, raised to hub height by the
    1/7 power law, through the spec's power curve (`WindProfile.curve`): the mean of
    per-minute values over the slot, in Wh."""

    def __init__(self, curve: WindProfile, weather: str, hub_m: float, base_dir: str | Path | None) -> None:
        self._curve, self._name, self._base = curve, weather, base_dir
        self._shear = (hub_m / 10.0) ** (1 / 7)

    def energy(self, start: int, end: int) -> tuple[int, int]:
        if end <= start:
            return 0, 0
        w = load_weather(self._name, year_of(start), self._base)
        wind = w.at(start + 30 + 60 * np.arange((end - start + 59) // 60)).wind * self._shear
        return round(float(self._curve.curve(wind).mean()) * (end - start) / 3600), 0


class _Generation(_Day):
    def __init__(self, inner: SolarProfile | WindProfile) -> None:
        self._inner = inner

    def energy(self, start: int, end: int) -> tuple[int, int]:
        return self._inner.wh(start, end), 0

    def day_of(self, start: int, d: int) -> tuple[list[int], int]:
        """The generation of the day's block of slots holding `start` (`_Synthetic.day_of`)."""
        return self._inner.day_of(start, d)


def parse_time(text: str, tz: ZoneInfo) -> int:
    """Unix seconds from an integer or an ISO 8601 time (naive times are local to `tz`)."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        stamp = dt.datetime.fromisoformat(text)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=tz)
        return int(stamp.timestamp())
    if not f.is_integer():
        raise ValueError(f"time {text!r} is not whole seconds")
    return int(f)


class CsvProfile:
    """Rows of energy per interval (`time` marks each row's start; a row lasts until the next
    one, the last as long as the one before). Resampled exactly: a slot's energy is the
    difference of the rounded-down cumulative energy at its ends, so consecutive slots
    always add up to the rows' totals, whatever the slot duration. Outside the file the
    profile repeats with the file's span as period."""

    def __init__(self, path: str | Path, tz: ZoneInfo) -> None:
        times: list[int] = []
        gen: list[int] = []
        con: list[int] = []
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = set(reader.fieldnames or ())
            if not {"time", "consumption"} <= fields and not {"time", "generation"} <= fields:
                raise ValueError(f"{path}: needs columns time and consumption and/or generation")
            for n, row in enumerate(reader, start=2):
                try:
                    times.append(parse_time(row["time"], tz))
                    gen.append(_wh(row.get("generation")))
                    con.append(_wh(row.get("consumption")))
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{path}:{n}: {exc}") from None
        if len(times) < 2:
            raise ValueError(f"{path}: needs at least two rows")
        if any(b <= a for a, b in itertools.pairwise(times)):
            raise ValueError(f"{path}: times must increase strictly")
        self._t = [*times, 2 * times[-1] - times[-2]]
        self._gen, self._con = gen, con
        self._cum_gen = _cumsum(gen)
        self._cum_con = _cumsum(con)

    @property
    def span(self) -> tuple[int, int]:
        return self._t[0], self._t[-1]

    def _cum(self, rows: list[int], cum: list[int], t: int) -> int:
        t0, t1 = self._t[0], self._t[-1]
        k, r = divmod(t - t0, t1 - t0)
        x = t0 + r
        i = bisect.bisect_right(self._t, x) - 1
        within = rows[i] * (x - self._t[i]) // (self._t[i + 1] - self._t[i])
        return k * cum[-1] + cum[i] + within

    def energy(self, start: int, end: int) -> tuple[int, int]:
        g = self._cum(self._gen, self._cum_gen, end) - self._cum(self._gen, self._cum_gen, start)
        c = self._cum(self._con, self._cum_con, end) - self._cum(self._con, self._cum_con, start)
        return g, c


def _wh(text: str | None) -> int:
    if text is None or not text.strip():
        return 0
    value = round(float(text))
    if value < 0:
        raise ValueError(f"negative energy {text!r}")
    return value


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


class SiteProfiles:
    """All profiles of one participant: its load and its generation per source."""

    def __init__(self, load: list[Profile], sources: dict[str, list[Profile]]) -> None:
        self.load = load
        self.sources = sources

    def slot(self, interval: tuple[int, int]) -> tuple[dict[str, int], int]:
        """(generation per source, load) in Wh for `interval`."""
        s, e = interval
        gen: dict[str, int] = {}
        for src, ps in sorted(self.sources.items()):
            total = 0
            for p in ps:
                total += p.energy(s, e)[0]
            gen[src] = total
        load = 0
        for p in self.load:
            load += p.energy(s, e)[1]
        return gen, load

    def synthetic(self) -> list[_Synthetic]:
        """The synthetic profiles among these (what `synthetic.fill_days` computes together)."""
        return [p._inner for p in (*self.load, *itertools.chain(*self.sources.values())) if isinstance(p, _Day)]

    def day(self, start: int, d: int) -> tuple[dict[str, list[int]], list[int], int] | None:
        """(generation per source, load) of every slot of the day's block of slots of duration
        `d` that holds the slot at `start`, and its index in them: what `slot` gives for each
        (the same cached values). None when a profile is not synthetic or `d` does not
        divide a day."""
        loads = [p for p in self.load if isinstance(p, _Consumption)]
        gens = {src: [p for p in ps if isinstance(p, _Generation)] for src, ps in self.sources.items()}
        if d <= 0 or DAY % d or len(loads) != len(self.load):
            return None
        if any(len(gens[src]) != len(ps) for src, ps in self.sources.items()):
            return None
        per_block = DAY // d
        k = (start - start % d) // d % per_block
        gen: dict[str, list[int]] = {}
        for src, ps in sorted(gens.items()):
            total = [0] * per_block
            for g in ps:
                total = [a + b for a, b in zip(total, g.day_of(start, d)[0], strict=True)]
            gen[src] = total
        load = [0] * per_block
        for c in loads:
            load = [a + b for a, b in zip(load, c.day_of(start, d)[0], strict=True)]
        return gen, load, k


def build_profiles(
    spec: ParticipantSpec,
    seed: int,
    timezone: str = "UTC",
    base_dir: str | Path | None = None,
) -> SiteProfiles:
    """The profiles of `spec`; randomness depends only on (seed, spec.id, profile kind)."""
    tz = ZoneInfo(timezone)
    key = stable_key(spec.id)
    load: list[Profile] = []
    sources: dict[str, list[Profile]] = {}
    if isinstance(spec.load, SyntheticLoad):
        load.append(_Consumption(LoadProfile(spec.load, seed, key, tz)))
    elif isinstance(spec.load, CsvLoad):
        path = Path(spec.load.path)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        table = CsvProfile(path, tz)
        load.append(table)
        sources.setdefault(spec.load.source, []).append(table)
    if spec.pv is not None and spec.pv.weather is not None:
        sources.setdefault("solar", []).append(_WeatherPv(spec.pv.kw, spec.pv.weather, base_dir))
    elif spec.pv is not None:
        sources.setdefault("solar", []).append(_Generation(SolarProfile(spec.pv, seed, key, tz)))
    if spec.wind is not None and spec.wind.weather is not None:
        turbine = WindProfile(spec.wind, seed, key, tz)
        sources.setdefault("wind", []).append(_WeatherWind(turbine, spec.wind.weather, spec.wind.hub_m, base_dir))
    elif spec.wind is not None:
        sources.setdefault("wind", []).append(_Generation(WindProfile(spec.wind, seed, key, tz)))
    return SiteProfiles(load, sources)
