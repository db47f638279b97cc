"""Houses as GridLAB-D models them: the equivalent thermal parameters (ETP) two-node model.

Per house, air temperature Ta and mass temperature Tm (C) follow

    Ca dTa/dt = UA (To - Ta) + Hm (Tm - Ta) + Qa
    Cm dTm/dt = Hm (Ta - Tm)               + Qm

with To the outdoor temperature, UA the envelope conductance (W/K), Hm the air-mass
conductance (W/K), Ca and Cm the heat capacities (J/K). The gains split as GridLAB-D
splits them: the HVAC heat goes to the air; solar (aperture m2 times GHI) and internal
gains go to the mass by the fractions `mass_solar` and `mass_internal`, the rest to the air.
HVAC heat is Q_hvac = -COP * P for cooling and +COP * P for heating (P electrical, W).

With inputs held constant over a step the system is linear, x' = A x + b, and is solved
exactly: x(t) = x* + exp(A t) (x0 - x*), the steady state x* in closed form and exp(A t)
from A's two real eigenvalues (no series, no ODE solver): stepping 600 s at once or 600
times 1 s gives the same temperatures to rounding. Everything is vectorised over houses.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

AIR_J_PER_M3K = 1.2 * 1006  # density times specific heat of air
CEILING_M = 2.44  # 8 ft
_HOUSE_TAG = 1  # seed-sequence tag of the parameter draws (other draws use other tags)
_FLOAT_FIELDS = (
    "ua", "ca", "cm", "hm", "solar_m2", "internal_w", "mass_solar", "mass_internal", "cop", "setpoint", "band",
)  # fmt: skip


@dataclass(frozen=True, eq=False)
class Houses:
    """Parameters of N houses, one array entry per house (scalars broadcast to N = len(keys)).

    `keys` are the houses' stable numbers (their index in the scenario): random draws are
    keyed by them, so a house behaves the same whichever subset it is simulated with.
    The comfort band is [setpoint - band, setpoint + band]."""

    keys: np.ndarray  # int64
    ua: np.ndarray  # W/K envelope conductance
    ca: np.ndarray  # J/K air (and furnishings) heat capacity
    cm: np.ndarray  # J/K mass heat capacity
    hm: np.ndarray  # W/K air-mass conductance
    solar_m2: np.ndarray  # m2 effective aperture: solar gain = solar_m2 * GHI
    internal_w: np.ndarray  # W internal gains (people, appliances)
    mass_solar: np.ndarray  # fraction of the solar gain that heats the mass
    mass_internal: np.ndarray  # fraction of the internal gain that heats the mass
    cop: np.ndarray  # heat moved per electrical W
    rated_w: np.ndarray  # int64 W electrical, when running
    setpoint: np.ndarray  # C
    band: np.ndarray  # C half-width of the comfort band
    cooling: np.ndarray  # bool: cooling (else heating)

    def __post_init__(self) -> None:
        keys = np.array(self.keys, dtype=np.int64).reshape(-1)
        n = len(keys)
        if n != len(np.unique(keys)) or (n and keys.min() < 0):
            raise ValueError("house keys must be distinct and >= 0")
        self._set("keys", keys)
        for name in _FLOAT_FIELDS:
            arr = self._broadcast(name, np.asarray(getattr(self, name), dtype=float), n)
            if not np.isfinite(arr).all():
                raise ValueError(f"{name} must be finite")
            self._set(name, arr)
        rated = self._broadcast("rated_w", np.asarray(self.rated_w), n)
        if not np.array_equal(rated, np.round(rated)) or (rated < 0).any():
            raise ValueError("rated_w must be whole watts >= 0")
        self._set("rated_w", rated.astype(np.int64))
        self._set("cooling", self._broadcast("cooling", np.asarray(self.cooling, dtype=bool), n))
        for name in ("ua", "ca", "cm", "hm", "cop", "band"):
            if (getattr(self, name) <= 0).any():
                raise ValueError(f"{name} must be > 0")
        for name in ("solar_m2", "internal_w"):
            if (getattr(self, name) < 0).any():
                raise ValueError(f"{name} must be >= 0")
        for name in ("mass_solar", "mass_internal"):
            a = getattr(self, name)
            if ((a < 0) | (a > 1)).any():
                raise ValueError(f"{name} must be in [0, 1]")

    def _broadcast(self, name: str, a: np.ndarray, n: int) -> np.ndarray:
        if a.ndim == 0:
            return np.full(n, a)
        if a.shape != (n,):
            raise ValueError(f"{name} has shape {a.shape}, expected ({n},)")
        return a.copy()

    def _set(self, name: str, a: np.ndarray) -> None:
        a.setflags(write=False)
        object.__setattr__(self, name, a)  # frozen: only __post_init__ normalises

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def z_min(self) -> np.ndarray:
        out: np.ndarray = self.setpoint - self.band
        return out

    @property
    def z_max(self) -> np.ndarray:
        out: np.ndarray = self.setpoint + self.band
        return out

    def take(self, index: np.ndarray | list[int] | slice) -> Houses:
        """The houses at positions `index` (keys kept, so their draws stay the same)."""
        return Houses(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def houses(n: int, seed: int) -> Houses:
    """N cooled houses of 150-200 m2 (a typical US single-family house), drawn reproducibly:
    house i depends only on (seed, i), so `houses(10, s)` is a prefix of `houses(30, s)`.

    Per m2 of floor: UA 1.2-1.8 W/K (GridLAB-D's typical ~500 BTU/h.F for 2000 ft2 is
    1.4), mass 35-45 kJ/K (GridLAB-D's 2 BTU/F.ft2 is 41), air-mass 18-24 W/K, solar
    aperture 0.012-0.02 m2 (windows times SHGC times the share reaching them). Air: the
    volume's heat capacity times 3 for furnishings (an assumption). Internal gains
    600-1000 W, setpoint 22.5-23.5 C with a +-1 C band, HVAC 3-4.5 kW electric, COP 2.8-3.4.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    cols: dict[str, list[float]] = {k: [] for k in (*_FLOAT_FIELDS, "rated_w")}
    for i in range(n):
        g = np.random.default_rng([seed % 2**64, i, _HOUSE_TAG])
        floor = g.uniform(150, 200)
        row = {
            "ua": floor * g.uniform(1.2, 1.8),
            "ca": 3 * AIR_J_PER_M3K * floor * CEILING_M,
            "cm": floor * g.uniform(35e3, 45e3),
            "hm": floor * g.uniform(18, 24),
            "solar_m2": floor * g.uniform(0.012, 0.02),
            "internal_w": g.uniform(600, 1000),
            "mass_solar": 0.5,
            "mass_internal": 0.5,
            "cop": g.uniform(2.8, 3.4),
            "setpoint": g.uniform(22.5, 23.5),
            "band": 1.0,
            "rated_w": float(round(g.uniform(3000, 4500))),
        }
        for k, v in row.items():
            cols[k].append(v)
    arrays = {k: np.array(v, dtype=float) for k, v in cols.items()}
    return Houses(keys=np.arange(n, dtype=np.int64), cooling=np.ones(n, dtype=bool), **arrays)


@dataclass(frozen=True, eq=False)
class ThermalState:
    """Air and mass temperatures (C) of N houses."""

    air: np.ndarray
    mass: np.ndarray


def hvac_heat(h: Houses, power_w: np.ndarray) -> np.ndarray:
    """Heat the HVAC puts into the air (W): -COP * P cooling, +COP * P heating."""
    out: np.ndarray = np.where(h.cooling, -1.0, 1.0) * h.cop * power_w
    return out


def gains(h: Houses, ghi: float | np.ndarray, power_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Qa, Qm): heat into the air and into the mass (W)."""
    solar = h.solar_m2 * ghi
    qm = h.mass_solar * solar + h.mass_internal * h.internal_w
    qa = (1 - h.mass_solar) * solar + (1 - h.mass_internal) * h.internal_w + hvac_heat(h, power_w)
    return qa, qm


def steady_state(h: Houses, outdoor: float | np.ndarray, ghi: float | np.ndarray, power_w: np.ndarray) -> ThermalState:
    """Where the temperatures settle under constant inputs: all heat leaves through UA,
    and the mass sits above the air by what it receives over Hm."""
    qa, qm = gains(h, ghi, power_w)
    air = outdoor + (qa + qm) / h.ua
    return ThermalState(air, air + qm / h.hm)


class Propagator:
    """exp(A dt) of every house for a fixed step `dt` (s), computed once.

    A = [[-(UA+Hm)/Ca, Hm/Ca], [Hm/Cm, -Hm/Cm]] has two real negative eigenvalues (the
    fast air-mass exchange and the slow envelope decay); exp(A dt) = alpha I + beta A with
    beta = (e^(ls dt) - e^(lf dt)) / (ls - lf), alpha = e^(ls dt) - ls beta. The slow one
    is taken as det / fast (no cancellation when Hm is huge) and beta through expm1 (no
    overflow when the fast mode is stiff)."""

    def __init__(self, h: Houses, dt: float) -> None:
        if not dt > 0:
            raise ValueError("dt must be > 0")
        self.dt = float(dt)
        a11 = -(h.ua + h.hm) / h.ca
        a12 = h.hm / h.ca
        a21 = h.hm / h.cm
        a22 = -h.hm / h.cm
        half_gap = np.sqrt(((a11 - a22) / 2) ** 2 + a12 * a21)  # sum of squares: real, > 0
        fast = (a11 + a22) / 2 - half_gap
        slow = (h.ua * h.hm / (h.ca * h.cm)) / fast  # det A / fast
        gap = slow - fast
        e_slow = np.exp(slow * dt)
        beta = e_slow * -np.expm1(-gap * dt) / gap
        alpha = e_slow - slow * beta
        self.m11 = alpha + beta * a11
        self.m12 = beta * a12
        self.m21 = beta * a21
        self.m22 = alpha + beta * a22

    def advance(
        self,
        h: Houses,
        state: ThermalState,
        outdoor: float | np.ndarray,
        ghi: float | np.ndarray,
        power_w: np.ndarray,
    ) -> ThermalState:
        """The state after `dt` with outdoor temperature, GHI and HVAC power held constant."""
        star = steady_state(h, outdoor, ghi, power_w)
        da = state.air - star.air
        dm = state.mass - star.mass
        return ThermalState(star.air + self.m11 * da + self.m12 * dm, star.mass + self.m21 * da + self.m22 * dm)


def step(
    h: Houses,
    state: ThermalState,
    dt: float,
    outdoor: float | np.ndarray,
    ghi: float | np.ndarray,
    power_w: np.ndarray,
) -> ThermalState:
    """One exact step of `dt` seconds (see `Propagator` to reuse exp(A dt) across steps)."""
    return Propagator(h, dt).advance(h, state, outdoor, ghi, power_w)


def thermostat(h: Houses, air: np.ndarray, on: np.ndarray) -> np.ndarray:
    """Plain hysteresis, the no-PEM baseline: a cooler turns on above the band's top and
    off below its bottom (a heater the other way round); inside the band it keeps its state."""
    need = np.where(h.cooling, air > h.z_max, air < h.z_min)
    done = np.where(h.cooling, air < h.z_min, air > h.z_max)
    out: np.ndarray = need | (on & ~done)
    return out
