"""Where the sun is (pure): NOAA's approximations, declination and equation of time from the
fractional year, refraction ignored. Used by the synthetic PV profiles (participants) and by
the aggregator's daylight forecast (market.flexibility.forecast)."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np

DAY = 86400
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def day_of_year(day: int) -> int:
    """Day of year (1..366) of the day number `day` since 1970-01-01."""
    return dt.date.fromordinal(_EPOCH_ORDINAL + day).timetuple().tm_yday


def cos_zenith(t: np.ndarray, latitude: float, longitude: float) -> np.ndarray:
    """Cosine of the sun's zenith angle at Unix times `t` (> 0: the sun is up), for a site
    at `latitude` and `longitude` degrees (east positive)."""
    day = np.floor_divide(t, DAY).astype(np.int64)
    minutes = (t - day * DAY) / 60.0
    uniq, inverse = np.unique(day, return_inverse=True)
    doy_of = np.array([day_of_year(int(d)) for d in uniq])[inverse]
    g = 2 * np.pi / 365 * (doy_of - 1 + (minutes / 60 - 12) / 24)
    eqtime = 229.18 * (
        0.000075 + 0.001868 * np.cos(g) - 0.032077 * np.sin(g)
        - 0.014615 * np.cos(2 * g) - 0.040849 * np.sin(2 * g)
    )  # fmt: skip
    decl = (
        0.006918 - 0.399912 * np.cos(g) + 0.070257 * np.sin(g)
        - 0.006758 * np.cos(2 * g) + 0.000907 * np.sin(2 * g)
        - 0.002697 * np.cos(3 * g) + 0.00148 * np.sin(3 * g)
    )  # fmt: skip
    hour_angle = np.radians((minutes + eqtime + 4 * longitude) / 4 - 180)
    lat = math.radians(latitude)
    cos_z: np.ndarray = np.sin(lat) * np.sin(decl) + np.cos(lat) * np.cos(decl) * np.cos(hour_angle)
    return cos_z
