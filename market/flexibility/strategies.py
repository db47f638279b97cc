"""Energy Web flexibility: allocation strategies (`fair`, `reputation`, or any `Strategy`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from market.flexibility.messages import FlexConfig

# -- allocation strategies -------------------------------------------------------------------


class Candidate(msgspec.Struct, frozen=True):
    """A prosumer that accepted a request: what it can give in the request's direction.

    `capacity` is what the strategy may allocate: the contract's flexibility, or with the
    aggregator's forecast on, what it expects the prosumer to deliver (at most the contract:
    `market.flexibility.forecast`). The rest is information for strategies of one's own."""

    prosumer: str
    capacity: int  # W
    reputation: int
    price: float  # per kWh
    seq: int = 0  # contract order (older first on a full tie)
    contracted: int | None = None  # W the contract guarantees (None: `capacity`)
    source: str = ""
    trust: int = 1000  # permille, from the delivery history


class Share(msgspec.Struct, frozen=True):
    prosumer: str
    power: int  # W, > 0


class Allocation(msgspec.Struct, frozen=True):
    """Shares in the strategy's order; `displaced` accepted but got nothing; `shortfall` W
    of the need that could not be allocated, with the `reason` (None when it is 0)."""

    shares: tuple[Share, ...]
    displaced: tuple[str, ...]
    shortfall: int
    reason: str | None

    @property
    def allocated(self) -> int:
        return sum(s.power for s in self.shares)


class Strategy(Protocol):
    """An allocation strategy: split `need` W (> 0) among the candidates, never giving one
    more than its `capacity`. Deterministic: the same candidates give the same allocation."""

    name: str

    def allocate(self, need: int, candidates: Sequence[Candidate]) -> Allocation: ...


def _shares(candidates: Sequence[Candidate], powers: Sequence[int]) -> tuple[tuple[Share, ...], tuple[str, ...]]:
    shares = tuple(Share(c.prosumer, p) for c, p in zip(candidates, powers, strict=True) if p > 0)
    displaced = tuple(c.prosumer for c, p in zip(candidates, powers, strict=True) if p <= 0)
    return shares, displaced


class FairStrategy:
    """Every accepting prosumer contributes in proportion to its contracted flexibility.

    The seed's simplification: modulation stays within `max_modulation_pct` (25 %) of each
    contract, which everyone is assumed able to deliver. So prosumer i's limit is
    floor(capacity_i * pct / 100); if the need is at least the sum of the limits each gives
    its limit (and the rest is the shortfall), else the need is apportioned exactly by
    largest remainder: floor(need * capacity_i / total) each, then one W more to the largest
    remainders (ties: larger capacity, then candidate order) while below their limit.
    """

    name: str = "fair"

    def __init__(self, max_modulation_pct: int = 25) -> None:
        if not 0 < max_modulation_pct <= 100:
            raise ValueError("max_modulation_pct must be in 1..100")
        self.pct = max_modulation_pct

    def allocate(self, need: int, candidates: Sequence[Candidate]) -> Allocation:
        if need <= 0:
            raise ValueError("need must be > 0")
        total = sum(c.capacity for c in candidates)
        limits = [c.capacity * self.pct // 100 for c in candidates]
        room = sum(limits)
        if not candidates:
            return Allocation((), (), need, "no prosumer accepted")
        if room <= need:
            shares, displaced = _shares(candidates, limits)
            shortfall = need - room
            reason = None
            if shortfall:
                reason = (
                    f"fair: accepting prosumers modulate at most {self.pct} % of their contracted "
                    f"flexibility ({room} W of {total} W)"
                )
            return Allocation(shares, displaced, shortfall, reason)
        powers = [need * c.capacity // total for c in candidates]
        remainders = [need * c.capacity % total for c in candidates]
        order = sorted(range(len(candidates)), key=lambda i: (-remainders[i], -candidates[i].capacity, i))
        left = need - sum(powers)
        while left > 0:  # terminates: room > need, so some candidate is below its limit
            for i in order:
                if left and powers[i] < limits[i]:
                    powers[i] += 1
                    left -= 1
        shares, displaced = _shares(candidates, powers)
        return Allocation(shares, displaced, 0, None)


class ReputationStrategy:
    """Prosumers in order of reputation, ties by guaranteed flexibility; the price is
    considered so that everyone gets a chance: the rank score is
    `reputation - round(price_weight * price)` (a cheaper prosumer can pass a better reputed
    one), then capacity (larger first), price (cheaper first), contract order. Each in turn
    gets its full contracted flexibility until the need is met; the rest are displaced."""

    name: str = "reputation"

    def __init__(self, price_weight: int = 100) -> None:
        if price_weight < 0:
            raise ValueError("price_weight must be >= 0")
        self.price_weight = price_weight

    def score(self, c: Candidate) -> int:
        return c.reputation - round(self.price_weight * c.price)

    def order(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (-self.score(c), -c.capacity, c.price, c.seq, c.prosumer))

    def allocate(self, need: int, candidates: Sequence[Candidate]) -> Allocation:
        if need <= 0:
            raise ValueError("need must be > 0")
        if not candidates:
            return Allocation((), (), need, "no prosumer accepted")
        ranked = self.order(candidates)
        powers: list[int] = []
        left = need
        for c in ranked:
            take = min(c.capacity, left)
            powers.append(take)
            left -= take
        shares, displaced = _shares(ranked, powers)
        reason = None
        if left:
            total = sum(c.capacity for c in candidates)
            reason = f"reputation: accepting prosumers guarantee {total} W in all"
        return Allocation(shares, displaced, left, reason)


def default_strategies(config: FlexConfig) -> dict[str, Strategy]:
    return {
        "fair": FairStrategy(config.max_modulation_pct),
        "reputation": ReputationStrategy(config.price_weight),
    }
