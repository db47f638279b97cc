"""Energy exchange of a delivered slot (PROTOCOL.md section Energy exchange), pure.

Settlements are taken dispatch sources first, then in commit order; each is covered by
what its seller metered and its buyer imported. What remains afterwards is
self-consumption, sold to the grid or bought from it. Every metered Wh ends in exactly
one energy record: generation in p2p, bess_compensation, an `extra` financial record,
self or grid_sell; imports in p2p, bess_compensation or grid_buy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from market.core.protocol import MeterMsg
from market.core.records import GRID_ID, Settlement, Transaction, TransactionKind, amount
from market.core.timing import Slot

EXTERNAL = "external"
BESS = "bess"


class _Remainders:
    """What each participant still has to account for in the slot."""

    def __init__(self, meters: Mapping[str, MeterMsg]) -> None:
        self.generation: dict[str, dict[str, int]] = {p: dict(m.generation) for p, m in meters.items()}
        self.external: dict[str, int] = {p: m.consumption.other.get(EXTERNAL, 0) for p, m in meters.items()}

    def gen(self, participant: str) -> dict[str, int]:
        return self.generation.setdefault(participant, {})


class _Writer:
    def __init__(self, slot: Slot, now: int) -> None:
        self.slot = slot
        self.now = now
        self.rows: list[Transaction] = []

    def add(
        self,
        kind: TransactionKind,
        seller: str,
        buyer: str,
        source: str,
        quantity: int,
        price_buy: float,
        price_sell: float,
        commit_id: str | None = None,
    ) -> None:
        start, end = self.slot
        # Positional, in field order (id, kind, time_delivery_start, time_delivery_end, seller_id,
        # buyer_id, energy_source, quantity, price_buy, price_sell, amount_buy, amount_sell,
        # commit_id, time_creation): a slot makes a row per transaction.
        self.rows.append(
            Transaction(
                f"t{start}-{len(self.rows)}",
                kind,
                start,
                end,
                seller,
                buyer,
                source,
                quantity,
                price_buy,
                price_sell,
                amount(quantity, price_buy),
                amount(quantity, price_sell),
                commit_id,
                self.now,
            )
        )


def exchange(
    slot: Slot,
    settlements: Sequence[Settlement],
    meters: Mapping[str, MeterMsg],
    grid_buy: float,
    grid_sell: float,
    now: int,
    non_dispatch: Iterable[str] = ("solar", "wind"),
) -> list[Transaction]:
    """Ledger transactions of `slot`. Participants without a meter reading count as zero."""
    rest = _Remainders(meters)
    out = _Writer(slot, now)
    nd = frozenset(non_dispatch)
    for s in sorted(settlements, key=lambda s: (not s.dispatch, s.seq)):
        _settle(s, rest, out, grid_buy, s.energy_source in nd)
    # The rows of what remains, per participant (most of a slot's rows): built here as
    # `_Writer.add` builds them, with what is constant per slot computed once (a self row
    # moves no money; a grid row has one price for both sides).
    rows, start, end = out.rows, slot[0], slot[1]
    generation, external = rest.generation, rest.external
    for p in sorted(meters):
        cons = meters[p].consumption
        if cons.bess:  # most batteries charged nothing from their own generation
            for src, q in _in_order(cons.bess):
                if q:
                    rows.append(
                        Transaction(
                            f"t{start}-{len(rows)}", "self", start, end, p, p, src, q, 0.0, 0.0, 0, 0, None, now
                        )
                    )
        for src, q in _in_order(cons.other):
            if q and src != EXTERNAL:
                rows.append(
                    Transaction(f"t{start}-{len(rows)}", "self", start, end, p, p, src, q, 0.0, 0.0, 0, 0, None, now)
                )
        left = generation.get(p)
        if left:  # nothing left at night, or all of it sold
            for src, q in _in_order(left):
                if q:
                    rows.append(_grid_row(slot, len(rows), "grid_sell", p, GRID_ID, src, q, grid_sell, now))
        q = external.get(p, 0)
        if q:
            rows.append(_grid_row(slot, len(rows), "grid_buy", GRID_ID, p, GRID_ID, q, grid_buy, now))
    return rows


def _grid_row(
    slot: Slot, n: int, kind: TransactionKind, seller: str, buyer: str, source: str, q: int, price: float, now: int
) -> Transaction:
    """The slot's `n`-th row, a sale to or purchase from the grid: one price for both sides."""
    money = amount(q, price)
    return Transaction(
        f"t{slot[0]}-{n}", kind, slot[0], slot[1], seller, buyer, source, q, price, price, money, money, None, now
    )


def _in_order(sources: Mapping[str, int]) -> Iterable[tuple[str, int]]:
    """A reading's map by source name (most hold one source or none: nothing to sort)."""
    return sorted(sources.items()) if len(sources) > 1 else sources.items()


def _settle(s: Settlement, rest: _Remainders, out: _Writer, grid_buy: float, non_dispatch: bool) -> None:
    seller_gen = rest.gen(s.seller_id)
    g = seller_gen.get(s.energy_source, 0)
    c = rest.external.get(s.buyer_id, 0)
    q = s.quantity
    physical = min(q, g, c)
    short = max(0, min(q, c) - g)
    extra = max(0, min(q, g) - c)
    if physical:
        out.add(
            "p2p",
            s.seller_id,
            s.buyer_id,
            s.energy_source,
            physical,
            s.price_buy,
            s.price_sell,
            s.commit_id,
        )
        seller_gen[s.energy_source] = g - physical
        rest.external[s.buyer_id] = c - physical
    if short:
        if non_dispatch:
            bess = seller_gen.get(BESS, 0)
            comp = min(short, bess)
            if comp:
                out.add(
                    "bess_compensation",
                    s.seller_id,
                    s.buyer_id,
                    BESS,
                    comp,
                    s.price_buy,
                    s.price_sell,
                    s.commit_id,
                )
                seller_gen[BESS] = bess - comp
                rest.external[s.buyer_id] -= comp
                short -= comp
        if short:
            # The seller pays the buyer for energy the buyer had to take from the grid.
            out.add(
                "financial",
                s.seller_id,
                s.buyer_id,
                GRID_ID,
                short,
                -grid_buy,
                -grid_buy,
                s.commit_id,
            )
    if extra:
        # The buyer pays for energy it bought and did not take; the seller may not sell it again.
        out.add(
            "financial",
            s.seller_id,
            s.buyer_id,
            s.energy_source,
            extra,
            s.price_buy,
            s.price_sell,
            s.commit_id,
        )
        seller_gen[s.energy_source] -= extra
