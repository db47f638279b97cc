"""Traders: pure functions from an observation of one delivery slot to PROTOCOL.md orders.

A trader never sees a socket or a clock; randomness comes only from the generator it is
handed, so the same observation and seed give the same orders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from participants.devices import Battery, Commitment, split_own_use
from participants.spec import (
    BatteryTrader,
    FixedPriceTrader,
    NoTrader,
    TraderSpec,
)

Order = dict[str, Any]


class Observation(msgspec.Struct, frozen=True):
    """What a trader knows when it trades `next_settle`."""

    next_settle: tuple[int, int]
    generation: dict[str, int]  # forecast per source, Wh
    load: int  # forecast, Wh
    grid_buy: float | None = None  # grid price the participant would pay for this slot
    grid_sell: float | None = None  # grid price it would receive
    grid_buy_mean: float | None = None  # mean grid buy price over the announced slots
    grid_state: str = "GREEN"
    battery: Battery | None = None  # state now (the best forecast for the slot)
    committed: Commitment = msgspec.field(default_factory=Commitment)
    trader: TraderSpec = NoTrader()

    @property
    def duration(self) -> int:
        return self.next_settle[1] - self.next_settle[0]


Trader = Callable[[Observation, np.random.Generator], list[Order]]


def inside(price: float, low: float | None, high: float | None) -> float:
    """`price` moved strictly inside (low, high), so a P2P trade beats the grid for both
    sides; unchanged when the grid band is unknown or empty."""
    if low is None or high is None or high <= low:
        return float(price)
    margin = min(1e-4, (high - low) / 4)
    return float(min(max(price, low + margin), high - margin))


class _Book:
    """Collects orders with deterministic client ids `<slot start>-<n>`."""

    def __init__(self, slot: tuple[int, int]) -> None:
        self.slot = slot
        self.orders: list[Order] = []

    def add(self, side: str, quantity: int, price: float, source: str | None = None) -> None:
        if quantity <= 0:
            return
        order: Order = {
            "side": side,
            "quantity": int(quantity),
            "price": float(price),
            "time_delivery": [self.slot[0], self.slot[1]],
            "id": f"{self.slot[0]}-{len(self.orders)}",
        }
        if source is not None:
            order["source"] = source
        self.orders.append(order)


def _residuals(obs: Observation) -> tuple[int, dict[str, int]]:
    """Load still to buy and surplus still to sell per source, net of commitments."""
    _, surplus, deficit = split_own_use(obs.load, obs.generation)
    bid = max(0, deficit - obs.committed.bought)
    asks = {s: max(0, q - obs.committed.sold.get(s, 0)) for s, q in surplus.items()}
    return bid, asks


def none_trader(obs: Observation, rng: np.random.Generator) -> list[Order]:
    """Grid only."""
    return []


def fixed_price(obs: Observation, rng: np.random.Generator) -> list[Order]:
    """TREX basic trader: bid the residual load at `bid_price`, ask each source's residual
    generation at `ask_price` (both kept strictly inside the grid band)."""
    spec = obs.trader if isinstance(obs.trader, FixedPriceTrader) else FixedPriceTrader()
    bid, asks = _residuals(obs)
    book = _Book(obs.next_settle)
    book.add("bid", bid, inside(spec.bid_price, obs.grid_sell, obs.grid_buy))
    for src, q in sorted(asks.items()):
        book.add("ask", q, inside(spec.ask_price, obs.grid_sell, obs.grid_buy), src)
    return book.orders


def random_price(obs: Observation, rng: np.random.Generator) -> list[Order]:
    """Residuals at prices drawn uniformly inside the grid band; nothing if it is unknown."""
    low, high = obs.grid_sell, obs.grid_buy
    if low is None or high is None or high <= low:
        return []
    bid, asks = _residuals(obs)
    book = _Book(obs.next_settle)
    # One draw per potential order, in a fixed order, so the stream never depends on sizes.
    prices = rng.uniform(low, high, size=1 + len(asks))
    book.add("bid", bid, inside(prices[0], low, high))
    for (src, q), p in zip(sorted(asks.items()), prices[1:], strict=True):
        book.add("ask", q, inside(p, low, high), src)
    return book.orders


def battery_trader(obs: Observation, rng: np.random.Generator) -> list[Order]:
    """Battery-aware: the battery (down to its reserve) covers load before buying; in cheap
    slots (grid buy price at or below the announced mean) surplus is kept to charge it; in
    dear slots, or when nearly full, energy above the reserve is offered as `bess`."""
    spec = obs.trader if isinstance(obs.trader, BatteryTrader) else BatteryTrader()
    low, high = obs.grid_sell, obs.grid_buy
    if low is None or high is None or high <= low:
        return []
    spread = high - low
    bid, asks = _residuals(obs)
    book = _Book(obs.next_settle)
    b = obs.battery
    bess = 0
    if b is not None:
        budget = b.limit(obs.duration)
        usable = max(0, b.soc_wh - b.reserve_wh(spec.reserve))
        cover = min(bid, usable, budget)
        bid -= cover
        cheap = obs.grid_buy_mean is None or high <= obs.grid_buy_mean
        hold = min(sum(asks.values()), b.max_input(), budget - cover) if cheap else 0
        left = hold
        for src in sorted(asks):
            kept = min(left, asks[src])
            asks[src] -= kept
            left -= kept
        if not cheap or b.soc_wh >= spec.high * b.capacity_wh:
            # The meter exports `bess` sales before charging, so keep the held charge's power.
            free = budget - cover - hold
            bess = min(usable - cover, free) - obs.committed.sold.get("bess", 0)
    book.add("bid", bid, inside(low + 0.7 * spread, low, high))
    for src, q in sorted(asks.items()):
        book.add("ask", q, inside(low + 0.35 * spread, low, high), src)
    book.add("ask", bess, inside(low + 0.55 * spread, low, high), "bess")
    return book.orders


TRADERS: dict[str, Trader] = {
    "none": none_trader,
    "fixed_price": fixed_price,
    "random_price": random_price,
    "battery": battery_trader,
}


# The traders that draw from their generator. The others never touch it, so a caller may
# hand them a shared generator instead of seeding one per call (`Prosumer._trade` does).
DRAWING: frozenset[Trader] = frozenset({random_price})


def trader_for(spec: TraderSpec) -> Trader:
    """The trading function of a spec (its kind is the msgspec tag)."""
    return TRADERS[type(spec).__struct_config__.tag]  # type: ignore[index]


def draws(trader: Trader) -> bool:
    """Whether `trader` uses its generator (unknown traders are assumed to)."""
    return trader in DRAWING or trader not in TRADERS.values()
