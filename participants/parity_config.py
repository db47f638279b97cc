"""The scenario's `[parity.agents]` table (docs/parity.md, *Agents*): configuration only, so
that loading a scenario does not import the agents' socket.io client (participants/parity_agents.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Signal = Literal["import_wh", "export_wh", "community_import_wh", "community_export_wh"]
COMMUNITY: frozenset[str] = frozenset({"community_import_wh", "community_export_wh"})


class AgentKpi(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A KPI of the aggregator's SLAs. `import_wh`/`export_wh`: a player's own Wh imported or
    exported in each `resolution` period, saved by the player; `community_*`: the community's
    total, saved by the oracle. `players`: registry ids (default: every LEM player, or the oracle)."""

    id: str
    signal: Signal
    rule: Literal["gt", "lt"]
    limit: float
    penalty: Annotated[int, msgspec.Meta(gt=0)]  # micro-currency per breaking value
    resolution: Annotated[int, msgspec.Meta(gt=0)] = 3600
    players: list[str] | None = None


class AgentsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The scenario's `[parity.agents]` table."""

    aggregator: str = "AGG"
    players: list[str] | None = None  # the aggregator's prosumers (default: every prosumer)
    params: dict[str, float] | None = None  # its own LEM parameters (pbBAU, psBAU, pbP2P, psP2P, beta)
    measure: bool = True  # prosumers save their measurements (else the LEM takes the meters)
    oracle: str | None = None
    sla_length: Annotated[int, msgspec.Meta(ge=0)] = 7200  # one SLA per period (0: none)
    kpis: list[AgentKpi] = []

    def ids(self) -> dict[str, str]:
        """The accounts the agents log in as, beside the prosumers: id -> role."""
        out = {self.aggregator: "aggregator"}
        if self.oracle is not None:
            out[self.oracle] = "oracle"
        return out


def decode_agents(table: Any) -> AgentsConfig:
    try:
        return msgspec.convert(table, AgentsConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"[parity.agents]: {exc}") from None
