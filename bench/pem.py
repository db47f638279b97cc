"""Plain thermostats against PEM: 30 houses (`houses(30, 0)`) on the hottest July day of
Greensboro's TMY3 (2023-07-10, local standard time), 60 s steps, feeder capacity 65 kW as
the coordinator's target. Prints the docs/pem.md table, a few lower capacities (where PEM
stops holding), and the time of one simulated day.

    python bench/pem.py
"""

from __future__ import annotations

import calendar
import datetime as dt
import statistics
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from participants.pem import Summary, simulate, summarize
from participants.thermal import houses
from participants.weather import pvlib_tmy3

CAPACITY_W = 65_000.0
DAY = dt.date(2023, 7, 10)


def row(label: str, s: Summary) -> str:
    return (
        f"| {label} | {s.peak_w / 1000:.1f} | {s.steps_over} | {s.above_kh:.2f} | {s.below_kh:.2f} | "
        f"{s.max_excursion:.2f} | {s.hvac_kwh:.0f} | {s.requested} | {s.accepted} |"
    )


def main() -> None:
    weather = pvlib_tmy3(DAY.year)
    start = calendar.timegm(DAY.timetuple()) - round(weather.tz_hours * 3600)
    end = start + 86400
    h = houses(30, 0)
    hot = weather.at(start + 60 * np.arange(1440))
    print(
        f"{weather.name}, {DAY}: outdoor {hot.temperature.min():.1f}..{hot.temperature.max():.1f} C, "
        f"GHI peak {hot.ghi.max():.0f} W/m2; capacity {CAPACITY_W / 1000:.0f} kW\n"
    )
    print("| run | peak kW | steps over | K.h above | K.h below | max K out | HVAC kWh | requested | accepted |")
    print("|---|---|---|---|---|---|---|---|---|")
    plain = simulate(h, weather, start, end, 60, "thermostat", seed=1)
    print(row("thermostats", summarize(plain, h, CAPACITY_W)))
    for cap in (CAPACITY_W, 60_000.0, 55_000.0):
        tr = simulate(h, weather, start, end, 60, "pem", target_w=cap, seed=1)
        print(row(f"PEM, target {cap / 1000:.0f} kW", summarize(tr, h, cap)))
    print()
    modes: tuple[Literal["thermostat", "pem"], ...] = ("thermostat", "pem")
    for mode in modes:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            simulate(h, weather, start, end, 60, mode, target_w=CAPACITY_W, seed=1)
            times.append(time.perf_counter() - t)
        print(f"{mode}: one day, 30 houses, 1440 steps: {statistics.median(times) * 1000:.0f} ms (median of 5)")


if __name__ == "__main__":
    main()
