"""The Parity market: the wire messages of `/grid`, their value types, and the settings."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Literal

import msgspec

from market.core.protocol import GridState, Interval, Message, Time, Wh
from market.core.registry import ParticipantId

Cents = Annotated[float, msgspec.Meta(ge=0, le=1e5)]  # cents per kWh; NaN and inf fail the bounds
Beta = Annotated[float, msgspec.Meta(ge=0, le=1e3)]  # currency per kWh (at a one-sided community flow)
Finite = Annotated[float, msgspec.Meta(ge=-1e15, le=1e15)]
Micro = Annotated[int, msgspec.Meta(gt=0, le=10**15)]  # tokens, integer micro-currency
Resolution = Annotated[int, msgspec.Meta(gt=0, le=366 * 86400)]
Name = ParticipantId  # SLA and KPI ids: 1-64 of A-Z a-z 0-9 _ . : - (never "/", the id separator)
Signal = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Players = Annotated[list[ParticipantId], msgspec.Meta(min_length=1, max_length=10_000)]
Rule = Literal["gt", "lt"]
Measured = Literal["prosumer", "meter", "none"]
RoleOf = Callable[[str], str | Iterable[str] | None]  # a player's role, or all its roles

SEVERITY: dict[GridState, int] = {"GREEN": 0, "YELLOW": 1, "RED": 2}
LEM_PLAYER_ROLES = frozenset({"prosumer"})
KPI_PLAYER_ROLES = frozenset({"prosumer", "oracle"})


# -- wire messages ---------------------------------------------------------------------------


class LemParams(Message, frozen=True):
    """LEM parameters: prices in cents per kWh, `beta` in currency per kWh (the flow
    term's price when the community's flow is all one way: `solver.lem_amount`)."""

    pb_bau: Cents = msgspec.field(name="pbBAU")
    ps_bau: Cents = msgspec.field(name="psBAU")
    pb_p2p: Cents = msgspec.field(name="pbP2P")
    ps_p2p: Cents = msgspec.field(name="psP2P")
    beta: Beta

    def wire(self) -> dict[str, float]:
        return {
            "pbBAU": self.pb_bau,
            "psBAU": self.ps_bau,
            "pbP2P": self.pb_p2p,
            "psP2P": self.ps_p2p,
            "beta": self.beta,
        }


class GridStateSetMsg(Message, frozen=True):
    """`grid_state.set` (dso)."""

    time_delivery: Interval
    state: GridState


class GridFlowsSetMsg(Message, frozen=True):
    """`grid_flows.set` (dso): the feeder's branch flows before trading in one auction slot,
    W per branch in the feeder's order (capacity-aware clearing, docs/grid.md)."""

    time_delivery: Interval
    flows_w: Annotated[list[Finite], msgspec.Meta(max_length=100_000)]


class LemDefaultsSetMsg(Message, frozen=True):
    """`lem.defaults.set` (operator)."""

    grid_state: GridState
    pb_bau: Cents = msgspec.field(name="pbBAU")
    ps_bau: Cents = msgspec.field(name="psBAU")
    pb_p2p: Cents = msgspec.field(name="pbP2P")
    ps_p2p: Cents = msgspec.field(name="psP2P")
    beta: Beta

    def params(self) -> LemParams:
        return LemParams(self.pb_bau, self.ps_bau, self.pb_p2p, self.ps_p2p, self.beta)


class LemSetMsg(Message, frozen=True):
    """`lem.set` (aggregator)."""

    time_delivery: Interval
    players: Players
    params: LemParams | None = None


class LemMeasureMsg(Message, frozen=True):
    """`lem.measure` (prosumer): its energies in the LEM slot, Wh."""

    time_delivery: Interval
    consumption: Wh
    production: Wh


class LemSolveMsg(Message, frozen=True):
    """`lem.solve` (aggregator, operator): every unsolved LEM inside [start, end]."""

    start: Time
    end: Time


class KpiMsg(Message, frozen=True):
    id: Name
    signal: Signal
    rule: Rule
    limit: Finite
    penalty: Micro
    players: Players
    resolution: Resolution


class SlaSetMsg(Message, frozen=True):
    """`sla.set` (aggregator)."""

    id: Name
    start: Time
    end: Time
    kpis: Annotated[list[KpiMsg], msgspec.Meta(min_length=1, max_length=100)]


class KpiMeasureMsg(Message, frozen=True):
    """`kpi.measure` (oracle, prosumer)."""

    sla: Name
    kpi: Name
    time_interval: Interval
    value: Finite


class SlaSolveMsg(Message, frozen=True):
    """`sla.solve` (aggregator, operator)."""

    sla: Name


# -- configuration ---------------------------------------------------------------------------

# The seed's conf_sidechain_initializer_example.json.
SEED_DEFAULTS: dict[GridState, LemParams] = {
    "GREEN": LemParams(pb_bau=20.0, ps_bau=6.5, pb_p2p=14.0, ps_p2p=8.0, beta=0.0),
    "YELLOW": LemParams(pb_bau=24.0, ps_bau=6.3, pb_p2p=14.0, ps_p2p=8.0, beta=0.025),
}


class PseudonymConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What `/grid` writes and sends in place of registry ids (`[parity.pseudonyms]`;
    `market.community.pseudonyms`). Keyed HMAC under `key_file` (default: `pseudonym.key`
    beside the registry file, made with mode 0600 on first use), or, when `service` is set
    and `enabled` (the seed's `pseudonymization` settings), the external service at that
    URL, each request answered within `timeout` seconds."""

    key_file: str | None = None
    service: str | None = None
    enabled: bool = True
    timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    # The auction too: `/market` knows each participant by its pseudonym (its sessions, the
    # book, every auction ledger row), so no table names a registry id (docs/parity.md).
    market: bool = False

    def __post_init__(self) -> None:
        if self.service is not None and not self.service.startswith(("http://", "https://")):
            raise ValueError(f"service must be an http:// or https:// URL, not {self.service!r}")

    @property
    def uses_service(self) -> bool:
        return self.service is not None and self.enabled


class ParityConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`lem_duration`: LEM slot length (s), slots aligned to it. The periodic solver runs at
    every `solve_every` boundary of the market clock plus `solve_delay` (3600 and 60: at
    13:01 it solves the LEMs that ended by 13:00; 86400: daily; 0: no periodic solver). The
    market clock is `step` in sim mode, the wall clock in rt mode. Set from the scenario's
    `[parity]` table and the `--lem-duration`, `--lem-solve-every`, `--lem-solve-delay` flags."""

    lem_duration: Annotated[int, msgspec.Meta(gt=0, le=86400)] = 900
    solve_every: Annotated[int, msgspec.Meta(ge=0, le=366 * 86400)] = 3600
    solve_delay: Annotated[int, msgspec.Meta(ge=0, le=86400)] = 60
    # The periodic SLA checker: an SLA that ended at `e` is checked at the first solver
    # boundary `b >= e + sla_grace` (due at `b + solve_delay`), leaving its players that long
    # to save their last values (the seed: the SLA of 12:00-14:00 is checked at 15:00).
    sla_grace: Annotated[int, msgspec.Meta(ge=0, le=366 * 86400)] = 3600
    defaults: dict[GridState, LemParams] = msgspec.field(default_factory=lambda: dict(SEED_DEFAULTS))
    max_lems: Annotated[int, msgspec.Meta(gt=0)] = 1_000_000
    max_slas: Annotated[int, msgspec.Meta(gt=0)] = 100_000
    max_kpi_values: Annotated[int, msgspec.Meta(gt=0)] = 10_000_000
    pseudonyms: PseudonymConfig = PseudonymConfig()
