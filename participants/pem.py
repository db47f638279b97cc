"""Packetized energy management (PEM) of thermostatic loads: the device side, one feeder
step, and a day simulation of houses under PEM or under plain thermostats.

Request rule (M. Almassalkhi, J. Frolik, P. Hines, "Packetized energy management:
asynchronous and anonymous coordination of thermostatically controlled loads", American
Control Conference 2017, pp. 1431-1437). A device inside its comfort band [z_min, z_max]
with no packet running asks for one with probability P = 1 - exp(-mu(z) dt) per step of
dt seconds, a Poisson request process whose rate grows towards the band's edge:

    heating (the paper, water heaters):
        mu(z) = m_R (z_max - z)/(z - z_min) * (z_set - z_min)/(z_max - z_set)
        0 at or above z_max, infinite at or below z_min
    cooling (the same rule mirrored, z -> -z; as PEMT-CoSim's PEM controller has it):
        mu(z) = m_R (z - z_min)/(z_max - z) * (z_max - z_set)/(z_set - z_min)
        0 at or below z_min, infinite at or above z_max

The second factor normalises the rate to mu(z_set) = m_R, the rate at the setpoint
(1/m_R is the mean time to request there). For cooling it is the reciprocal of the
heating factor: writing the heating factor (z_set - z_min)/(z_max - z_set) next to the
cooling first factor would give mu(z_set) = m_R r^2 with r = (z_set - z_min)/(z_max - z_set),
so it is mirrored too. With the band centred on the setpoint (our defaults) both read the same.

Outside the band a device opts out: a cooler above z_max runs unasked, below z_min it
stays off (a heater the other way round), its packet is cancelled, and it rejoins once
back inside. A granted packet runs the HVAC at rated power for `packet_seconds`, in whole
steps: ceil(packet_seconds / dt) of them.

Randomness: the uniform of house `key` at the step starting at t (Unix s) is draw number
`key` of a PCG64 stream seeded by SeedSequence(seed, spawn_key=(tag, t)), so it depends on
(seed, key, t) only: not on which other houses are simulated, nor on how the day is cut
into calls. (One stream per step rather than one generator per house and step: the same
guarantee at 1/30 the cost; keys are house numbers, small.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from participants.pem_coordinator import Decision, coordinate
from participants.thermal import Houses, Propagator, ThermalState, thermostat
from participants.weather import Conditions

_DRAW_TAG = 2  # seed-sequence tags: houses' parameters use 1 (thermal), draws 2, start state 3
_INIT_TAG = 3

Target = float | np.ndarray | Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PemConfig:
    """`m_r`: request rate at the setpoint (1/s); `packet_seconds`: length of a packet."""

    m_r: float = 1 / 300  # mean time to request at the setpoint = one packet length, as in PEMT-CoSim
    packet_seconds: int = 300

    def __post_init__(self) -> None:
        if not (self.m_r > 0 and math.isfinite(self.m_r)):
            raise ValueError("m_r must be > 0 and finite")
        if self.packet_seconds <= 0:
            raise ValueError("packet_seconds must be > 0")


def _mirror(
    z: np.ndarray, z_min: np.ndarray, z_max: np.ndarray, z_set: np.ndarray, cooling: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Heating as cooling seen through z -> -z: (z, low edge, high edge, setpoint)."""
    s = np.where(cooling, 1.0, -1.0)
    lo = np.where(cooling, z_min, -z_max)
    hi = np.where(cooling, z_max, -z_min)
    return s * z, lo, hi, s * z_set


def request_rate(
    z: np.ndarray | float,
    z_min: np.ndarray | float,
    z_max: np.ndarray | float,
    z_set: np.ndarray | float,
    m_r: float,
    cooling: np.ndarray | bool = True,
) -> np.ndarray:
    """mu(z) in 1/s (module docstring): 0 at the satisfied edge and beyond, infinite at the
    needy edge and beyond. Requires z_min < z_set < z_max."""
    zz, lo, hi, ss = _mirror(
        np.asarray(z, dtype=float),
        np.asarray(z_min, dtype=float),
        np.asarray(z_max, dtype=float),
        np.asarray(z_set, dtype=float),
        np.asarray(cooling, dtype=bool),
    )
    if not ((lo < ss) & (ss < hi)).all():
        raise ValueError("need z_min < z_set < z_max")
    inside = (zz > lo) & (zz < hi)
    safe = np.where(inside, zz, (lo + hi) / 2)  # keeps the masked-out branch finite
    mu = m_r * (safe - lo) / (hi - safe) * (hi - ss) / (ss - lo)
    out: np.ndarray = np.where(inside, mu, np.where(zz >= hi, np.inf, 0.0))
    return out


def request_probability(
    z: np.ndarray | float,
    z_min: np.ndarray | float,
    z_max: np.ndarray | float,
    z_set: np.ndarray | float,
    m_r: float,
    dt: float,
    cooling: np.ndarray | bool = True,
) -> np.ndarray:
    """P = 1 - exp(-mu(z) dt): the chance of asking during a step of `dt` seconds."""
    out: np.ndarray = -np.expm1(-request_rate(z, z_min, z_max, z_set, m_r, cooling) * dt)
    return out


def urgency(h: Houses, air: np.ndarray) -> np.ndarray:
    """How close a device is to opting out and running unasked: 0 at the setpoint, 1 at
    the needy edge ((z - z_set)/(z_max - z_set) for cooling, mirrored for heating)."""
    zz, _lo, hi, ss = _mirror(air, h.z_min, h.z_max, h.setpoint, h.cooling)
    out: np.ndarray = (zz - ss) / (hi - ss)
    return out


def uniforms(seed: int, t: int, keys: np.ndarray) -> np.ndarray:
    """The step's uniform in [0, 1) of each house key (module docstring)."""
    keys = np.asarray(keys, dtype=np.int64)
    if len(keys) == 0:
        return np.zeros(0)
    ss = np.random.SeedSequence(seed % 2**64, spawn_key=(_DRAW_TAG, int(t) % 2**64))
    out: np.ndarray = np.random.Generator(np.random.PCG64(ss)).random(int(keys.max()) + 1)[keys]
    return out


@dataclass(frozen=True, eq=False)
class Devices:
    """What each device does at the start of a step, before the coordinator answers."""

    forced_on: np.ndarray  # opted out on the needy side: runs unasked
    forced_off: np.ndarray  # opted out on the satisfied side: held off
    running: np.ndarray  # inside the band, a granted packet continues
    requesting: np.ndarray  # inside the band, idle, and asks for a packet
    probability: np.ndarray  # of asking, for every device (0 outside the band)

    @property
    def opted_out(self) -> np.ndarray:
        out: np.ndarray = self.forced_on | self.forced_off
        return out


def devices(h: Houses, air: np.ndarray, packet_left: np.ndarray, u: np.ndarray, cfg: PemConfig, dt: float) -> Devices:
    """The device rule: opt out outside [z_min, z_max], otherwise keep a running packet or
    ask for one when the step's uniform `u` falls below P(z)."""
    inside = (air >= h.z_min) & (air <= h.z_max)
    needy = np.where(h.cooling, air > h.z_max, air < h.z_min)
    running = inside & (packet_left > 0)
    p = np.where(inside, request_probability(air, h.z_min, h.z_max, h.setpoint, cfg.m_r, dt, h.cooling), 0.0)
    return Devices(needy, ~inside & ~needy, running, inside & ~running & (u < p), p)


@dataclass(frozen=True, eq=False)
class PemStep:
    """One feeder step under PEM: the devices' states, the coordinator's decision, which
    HVACs run during the step and the packet time left after it."""

    devices: Devices
    decision: Decision
    on: np.ndarray
    power_w: np.ndarray  # int64 electrical W of each HVAC during the step
    packet_left: np.ndarray  # s, after the step


def pem_step(
    h: Houses,
    air: np.ndarray,
    packet_left: np.ndarray,
    target_w: float,
    *,
    seed: int,
    t: int,
    dt: float,
    cfg: PemConfig,
) -> PemStep:
    """Devices decide, the coordinator grants up to `target_w` (W, the feeder capacity left
    for these loads) after what runs anyway (opted-out and running packets), packets start."""
    dev = devices(h, air, packet_left, uniforms(seed, t, h.keys), cfg, dt)
    committed = int(h.rated_w[dev.forced_on | dev.running].sum())
    decision = coordinate(dev.requesting, h.rated_w, urgency(h, air), h.keys, committed, target_w)
    on = dev.forced_on | dev.running | decision.accepted
    left = np.where(decision.accepted, float(cfg.packet_seconds), np.where(dev.running, packet_left, 0.0))
    return PemStep(dev, decision, on, np.where(on, h.rated_w, 0), np.maximum(left - dt, 0.0))


class WeatherSource(Protocol):
    def at(self, t: float | np.ndarray) -> Conditions: ...


@dataclass(frozen=True, eq=False)
class SimState:
    """Where a simulation stands: temperatures (C), thermostat on-state, packet time left (s)."""

    air: np.ndarray
    mass: np.ndarray
    on: np.ndarray
    packet_left: np.ndarray


def initial_state(h: Houses, seed: int) -> SimState:
    """Air uniform in each house's band (mass at the air temperature), HVAC off, no packet;
    drawn per house key, like everything else."""
    u = np.array([np.random.default_rng([seed % 2**64, int(k), _INIT_TAG]).random() for k in h.keys])
    air = h.z_min + u * (h.z_max - h.z_min)
    return SimState(air, air.copy(), np.zeros(h.n, dtype=bool), np.zeros(h.n))


@dataclass(frozen=True, eq=False)
class Trajectory:
    """Per-step records of a simulation (S steps of `dt` s, N houses). Temperatures are at
    the start of each step; powers, counts and weather hold during it."""

    dt: int
    time: np.ndarray  # (S,) Unix s at each step's start
    outdoor: np.ndarray  # (S,) C, at mid-step (the value held during the step)
    ghi: np.ndarray  # (S,) W/m2, at mid-step
    target_w: np.ndarray  # (S,) the coordinator's target (inf: none)
    air: np.ndarray  # (N, S) C
    hvac_w: np.ndarray  # (N, S) int64 electrical W
    load_w: np.ndarray  # (S,) int64 total HVAC load
    requested: np.ndarray  # (S,) packets asked for (PEM; 0 under thermostats)
    accepted: np.ndarray  # (S,) packets granted (PEM)
    opted_out: np.ndarray  # (S,) devices outside their band, out of the packet scheme (PEM)
    final: SimState  # after the last step (continue from here)
    # (N,) per house over all steps: packets asked for and granted, steps opted out (PEM)
    house_requested: np.ndarray
    house_accepted: np.ndarray
    house_opted_out: np.ndarray


def _targets(target_w: Target, times: np.ndarray) -> np.ndarray:
    raw = target_w(times) if callable(target_w) else target_w
    out = np.broadcast_to(np.asarray(raw, dtype=float), times.shape).copy()
    if np.isnan(out).any():
        raise ValueError("target_w has nan")
    return out


def simulate(
    h: Houses,
    weather: WeatherSource,
    start: int,
    end: int,
    dt: int = 60,
    mode: Literal["thermostat", "pem"] = "thermostat",
    target_w: Target = math.inf,
    seed: int = 0,
    config: PemConfig | None = None,
    initial: SimState | None = None,
) -> Trajectory:
    """Step houses from `start` to `end` (Unix s, a whole number of `dt` steps) under plain
    thermostats or under PEM with a coordinator target (W: a number, one per step, or a
    function of the steps' start times). Weather is held at its mid-step value during each
    step, and the house model is exact for that input."""
    if dt <= 0 or end <= start or (end - start) % dt:
        raise ValueError("need dt > 0 and end - start a positive multiple of dt")
    if mode not in ("thermostat", "pem"):
        raise ValueError(f"unknown mode {mode!r}")
    cfg = config or PemConfig()
    s = initial or initial_state(h, seed)
    steps = (end - start) // dt
    times = start + dt * np.arange(steps, dtype=np.int64)
    cond = weather.at(times + dt / 2)
    targets = _targets(target_w, times)
    prop = Propagator(h, dt)
    air = np.empty((h.n, steps))
    hvac = np.empty((h.n, steps), dtype=np.int64)
    requested = np.zeros(steps, dtype=np.int64)
    accepted = np.zeros(steps, dtype=np.int64)
    opted = np.zeros(steps, dtype=np.int64)
    per_house = np.zeros((3, h.n), dtype=np.int64)  # requested, accepted, opted out
    state = ThermalState(s.air, s.mass)
    on, left = s.on, s.packet_left
    for k in range(steps):
        air[:, k] = state.air
        if mode == "thermostat":
            on = thermostat(h, state.air, on)
        else:
            st = pem_step(h, state.air, left, float(targets[k]), seed=seed, t=int(times[k]), dt=dt, cfg=cfg)
            on, left = st.on, st.packet_left
            requested[k] = int(st.devices.requesting.sum())
            accepted[k] = int(st.decision.accepted.sum())
            opted[k] = int(st.devices.opted_out.sum())
            per_house += (st.devices.requesting, st.decision.accepted, st.devices.opted_out)
        power = np.where(on, h.rated_w, 0)
        hvac[:, k] = power
        state = prop.advance(h, state, cond.temperature[k], cond.ghi[k], power)
    return Trajectory(
        dt,
        times,
        cond.temperature,
        cond.ghi,
        targets,
        air,
        hvac,
        hvac.sum(axis=0),
        requested,
        accepted,
        opted,
        SimState(state.air, state.mass, on, left),
        *per_house,
    )


@dataclass(frozen=True)
class Summary:
    """Feeder and comfort figures of a trajectory against a capacity (W)."""

    peak_w: int
    steps_over: int  # steps with load above the capacity
    # K.h outside the band, summed over houses, from the temperatures at step starts:
    above_kh: float  # above z_max (too warm)
    below_kh: float  # below z_min (too cold)
    max_excursion: float  # K, the farthest any house got outside its band
    hvac_kwh: float  # electrical
    requested: int
    accepted: int

    @property
    def degree_hours(self) -> float:
        return self.above_kh + self.below_kh


def summarize(traj: Trajectory, h: Houses, capacity_w: float) -> Summary:
    above = np.maximum(traj.air - h.z_max[:, None], 0)
    below = np.maximum(h.z_min[:, None] - traj.air, 0)
    hours = traj.dt / 3600
    return Summary(
        peak_w=int(traj.load_w.max()),
        steps_over=int((traj.load_w > capacity_w).sum()),
        above_kh=float(above.sum() * hours),
        below_kh=float(below.sum() * hours),
        max_excursion=float(np.maximum(above, below).max()),
        hvac_kwh=float(traj.hvac_w.sum() * traj.dt / 3.6e6),
        requested=int(traj.requested.sum()),
        accepted=int(traj.accepted.sum()),
    )
