"""Participant specifications: one `[[participants]]` table of a scenario TOML file.

Decoding is strict (unknown fields are refused) so that a typo in a scenario fails loudly
instead of silently producing a household without its PV array.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import numpy as np

NonNeg = Annotated[float, msgspec.Meta(ge=0, le=1e9)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
PriceValue = Annotated[float, msgspec.Meta(ge=-1e6, le=1e6)]
ParticipantId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
SourceName = Annotated[str, msgspec.Meta(max_length=32, pattern=r"^[a-z][a-z0-9_]*$")]


class Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of the spec tables."""


class SyntheticLoad(Spec, frozen=True, tag="synthetic", tag_field="kind"):
    annual_kwh: NonNeg = 3500.0


class CsvLoad(Spec, frozen=True, tag="csv", tag_field="kind"):
    """A CSV profile (columns `time`, `consumption`, optional `generation`); its generation
    is attributed to `source`. A relative `path` is resolved against the scenario directory."""

    path: str
    source: SourceName = "solar"


# Relative error of a source's generation forecast (what its trader sees of a slot): the
# slot's energy times 1 + error * z, z standard normal, seeded per participant, source and
# slot. 0: the forecast is exact. The meter always reads what the site produced.
ForecastError = Annotated[float, msgspec.Meta(ge=0, le=2)]


# A TMY3 weather file (participants/weather.py): "greensboro" (pvlib's shipped sample, no
# download) or a path (relative: to the scenario directory).
WeatherName = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class PvSpec(Spec, frozen=True):
    kw: NonNeg
    latitude: Annotated[float, msgspec.Meta(ge=-90, le=90)] = 50.0
    # None: the standard meridian of the market's timezone (solar noon near 12:00 standard time).
    longitude: Annotated[float, msgspec.Meta(ge=-180, le=180)] | None = None
    forecast_error: ForecastError = 0.0
    # Set: the array follows the file's measured irradiance (GHI) instead of the synthetic
    # clear-sky model, the same weather the thermal houses of a `pem` site see.
    weather: WeatherName | None = None


class WindSpec(Spec, frozen=True):
    kw: NonNeg
    mean_speed: Annotated[float, msgspec.Meta(gt=0, le=30)] = 6.5  # m/s at hub height
    cut_in: NonNeg = 3.0
    rated_speed: Annotated[float, msgspec.Meta(gt=0)] = 12.0
    cut_out: Annotated[float, msgspec.Meta(gt=0)] = 25.0
    forecast_error: ForecastError = 0.0
    # Set: the turbine follows the file's measured wind speed (10 m, raised to `hub_m` by the
    # 1/7 power law) instead of the synthetic wind process; `mean_speed` is then unused.
    weather: WeatherName | None = None
    hub_m: Annotated[float, msgspec.Meta(ge=10, le=200)] = 30.0


class BatterySpec(Spec, frozen=True):
    capacity_wh: Annotated[int, msgspec.Meta(gt=0, le=10**9)]
    power_w: Annotated[int, msgspec.Meta(gt=0, le=10**9)]
    efficiency: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.95  # round trip, applied on charge
    soc: Fraction = 0.5  # initial state of charge, fraction of capacity


class NoTrader(Spec, frozen=True, tag="none", tag_field="kind"):
    """Grid only: never places orders."""


class FixedPriceTrader(Spec, frozen=True, tag="fixed_price", tag_field="kind"):
    bid_price: PriceValue = 0.20
    ask_price: PriceValue = 0.08


class RandomPriceTrader(Spec, frozen=True, tag="random_price", tag_field="kind"):
    """Prices drawn uniformly between the grid sell and buy price of the slot."""


class BatteryTrader(Spec, frozen=True, tag="battery", tag_field="kind"):
    reserve: Fraction = 0.2  # never offer battery energy below this state of charge
    high: Fraction = 0.8  # above this, offer battery energy even in cheap slots


TraderSpec = NoTrader | FixedPriceTrader | RandomPriceTrader | BatteryTrader
LoadSpec = SyntheticLoad | CsvLoad


class PemSpec(Spec, frozen=True):
    """A PEM coordinator's site (docs/pem.md): `houses` cooled thermal houses whose HVAC
    units ask it for energy packets; the participant meters their HVAC energy and bids for
    it. `capacity_kw`: what the feeder head may carry; the coordinator's target in a slot is
    that minus the forecast import of the scenario's other participants (None: no limit)."""

    houses: Annotated[int, msgspec.Meta(ge=1, le=10_000)]
    mode: Literal["pem", "thermostat"] = "pem"  # thermostat: the same houses without PEM
    weather: WeatherName = "greensboro"
    capacity_kw: Annotated[float, msgspec.Meta(gt=0, le=1e6)] | None = None
    dt: Annotated[int, msgspec.Meta(ge=10, le=900)] = 60  # s per device step; divides the slot
    packet_seconds: Annotated[int, msgspec.Meta(ge=10, le=3600)] = 300
    request_minutes: Annotated[float, msgspec.Meta(gt=0, le=1440)] = 5.0  # mean time to ask at the setpoint


class ParticipantSpec(Spec, frozen=True):
    id: ParticipantId
    load: LoadSpec | None = None
    pv: PvSpec | None = None
    wind: WindSpec | None = None
    battery: BatterySpec | None = None
    trader: TraderSpec = NoTrader()
    pem: PemSpec | None = None

    def __post_init__(self) -> None:
        if self.pem is not None and (
            self.load or self.pv or self.wind or self.battery or not isinstance(self.trader, NoTrader)
        ):
            # The coordinator meters only its houses' HVAC and prices its own bids.
            raise ValueError("a pem site has no load, pv, wind, battery or trader of its own")


def decode_spec(table: Any) -> ParticipantSpec:
    """Decode one TOML table (a dict as returned by `tomllib`), or raise `ValueError`."""
    try:
        return msgspec.convert(table, ParticipantSpec)
    except msgspec.ValidationError as exc:
        name = table.get("id", "?") if isinstance(table, dict) else "?"
        raise ValueError(f"participant {name}: {exc}") from None


def decode_specs(tables: Any) -> list[ParticipantSpec]:
    """Decode a scenario's `participants` array; ids must be unique."""
    specs = [decode_spec(t) for t in tables]
    seen: set[str] = set()
    for s in specs:
        if s.id in seen:
            raise ValueError(f"participant {s.id}: duplicate id")
        seen.add(s.id)
    return specs


def to_table(spec: ParticipantSpec) -> dict[str, Any]:
    """The TOML-ready table of a spec (round-trips through `decode_spec`)."""
    table: dict[str, Any] = _drop_none(msgspec.to_builtins(spec))
    return table


def _drop_none(value: Any) -> Any:
    # TOML has no null: an absent key means the default.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def synthetic_spec(index: int, rng: np.random.Generator) -> ParticipantSpec:
    """A seeded, plausible community member; `index` 0 gives id `S0001`.

    Mix: ~92% households with load, ~50% with PV, ~8% with a small turbine, ~20% with a
    battery (mostly PV owners); the rest are generators only. Traders vary.
    """
    has_load = rng.random() < 0.92
    has_pv = rng.random() < 0.5
    has_wind = rng.random() < 0.08
    if not (has_load or has_pv or has_wind):
        has_pv = True  # a site without load must generate something
    has_battery = rng.random() < (0.35 if has_pv else 0.05)

    load = None
    if has_load:
        kwh = float(np.clip(rng.lognormal(np.log(3500), 0.35), 1200, 9000))
        load = SyntheticLoad(annual_kwh=round(kwh, -1))
    pv = PvSpec(kw=round(float(rng.uniform(3.0, 10.0)), 1)) if has_pv else None
    wind = WindSpec(kw=round(float(rng.uniform(2.0, 10.0)), 1)) if has_wind else None
    battery = None
    if has_battery:
        cap = int(rng.choice([5000, 7500, 10000, 13500]))
        battery = BatterySpec(
            capacity_wh=cap,
            power_w=int(rng.choice([3000, 3680, 5000])),
            efficiency=round(float(rng.uniform(0.88, 0.96)), 2),
            soc=0.5,
        )

    trader: TraderSpec
    u = rng.random()
    if battery is not None and u < 0.8:
        trader = BatteryTrader()
    elif u < 0.45:
        trader = FixedPriceTrader(
            bid_price=round(float(rng.uniform(0.18, 0.28)), 3),
            ask_price=round(float(rng.uniform(0.06, 0.12)), 3),
        )
    elif u < 0.8:
        trader = RandomPriceTrader()
    else:
        trader = NoTrader()
    return ParticipantSpec(id=f"S{index + 1:04d}", load=load, pv=pv, wind=wind, battery=battery, trader=trader)
