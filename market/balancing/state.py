"""EAF balancing: assets, contracts (PPAs), flows and balances."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from market.balancing.messages import Direction, Status

# -- state -----------------------------------------------------------------------------------


class BalancingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`epoch_duration` (s): epoch n is `[n * d, (n + 1) * d]`; equal to the market's slot
    `duration`, epoch n is the market slot starting at `n * duration`."""

    epoch_duration: Annotated[int, msgspec.Meta(gt=0, le=86400 * 366)] = 900
    max_assets: Annotated[int, msgspec.Meta(gt=0)] = 10_000
    max_contracts: Annotated[int, msgspec.Meta(gt=0)] = 10_000
    max_settlements: Annotated[int, msgspec.Meta(gt=0)] = 1_000_000


class Asset(msgspec.Struct, frozen=True):
    id: str
    from_: str | None = None
    to: str | None = None

    def wire(self) -> dict[str, Any]:
        rule = {k: v for k, v in (("from", self.from_), ("to", self.to)) if v is not None}
        return {"assetId": self.id, "type": "balance", "balancerule": rule}


class Contract(msgspec.Struct, frozen=True):
    id: str
    asset: str
    partner: str
    direction: Direction
    status: Status
    energy: int
    load_min: int
    load_max: int
    balanced: int
    priority: int
    seq: int  # age: order of addition

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "assetId": self.asset,
            "partnerId": self.partner,
            "direction": self.direction,
            "status": self.status,
            "energy": self.energy,
            "load_min": self.load_min,
            "load_max": self.load_max,
            "balanced": self.balanced,
            "priority": self.priority,
        }


class Flow(msgspec.Struct, frozen=True):
    """One transaction of a balance: `energy` Wh from `from_` to `to`."""

    from_: str
    to: str
    energy: int

    def wire(self) -> dict[str, Any]:
        return {"from": self.from_, "to": self.to, "energy": self.energy}


class LateEntry(msgspec.Struct, frozen=True):
    """Energy that reached a sealed epoch: a meter settlement, or a transfer into or out of
    the asset in the balance of an asset sealed after it (one that became its input after
    the seal). Kept apart; never part of the sealed balance."""

    source: Literal["settlement", "transfer"]
    from_: str
    to: str
    energy: int
    label: str | None = None

    def wire(self) -> dict[str, Any]:
        return {"source": self.source, "from": self.from_, "to": self.to, "energy": self.energy, "label": self.label}


class Balance(msgspec.Struct, frozen=True):
    asset: str
    epoch: int
    interval: tuple[int, int]
    transactions: tuple[Flow, ...]
    seal: str | None = None  # None: not sealed (a preview of what sealing now would give)
    late: tuple[LateEntry, ...] = ()
    # The merit order (contract ids) the balance applied; None for a seal restored from a
    # ledger written before it was recorded.
    meritorder: tuple[str, ...] | None = None
    # Energy a balancing point would be left holding (> 0) or short of (< 0): a seal with
    # one is refused, so it is 0 for every sealed balance; an endpoint has none.
    imbalance: int = 0

    @property
    def sealed(self) -> bool:
        return self.seal is not None

    def wire(self) -> dict[str, Any]:
        return {
            "assetId": self.asset,
            "epoch": self.epoch,
            "interval": list(self.interval),
            "transactions": [t.wire() for t in self.transactions],
            "seal": self.seal,
            "sealed": self.sealed,
            "late": [e.wire() for e in self.late],
            "meritorder": None if self.meritorder is None else list(self.meritorder),
            "imbalance": self.imbalance,
        }


class _Reading(msgspec.Struct, frozen=True):
    consumption: int
    late: bool
