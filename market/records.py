"""Ledger records produced by the core (PROTOCOL.md section Ledger).

Records are plain frozen structs; the server hands them to a sink, and the sink stores
each as one row of the table named by its `TABLE`. Energy is integer Wh, money integer
micro-currency (`amount = round(quantity * price * 1000)` for a price per kWh).
Ids are deterministic (derived from the slot and an index within it), so re-processing a
slot after a crash yields the same ids and a retried write is a no-op.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec

TransactionKind = Literal["p2p", "bess_compensation", "financial", "self", "grid_sell", "grid_buy"]
GRID_ID = "grid"


def amount(quantity: int, price: float) -> int:
    """Integer micro-currency for `quantity` Wh at `price` per kWh."""
    return round(quantity * price * 1000)


class Record(msgspec.Struct, frozen=True):
    TABLE: ClassVar[str]

    def row(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


class Transaction(Record, frozen=True):
    TABLE: ClassVar[str] = "transactions"
    id: str
    kind: TransactionKind
    time_delivery_start: int
    time_delivery_end: int
    seller_id: str
    buyer_id: str
    energy_source: str
    quantity: int
    price_buy: float
    price_sell: float
    amount_buy: int
    amount_sell: int
    commit_id: str | None
    time_creation: int


class Settlement(Record, frozen=True):
    """One fill of the clearing: `quantity` Wh from seller to buyer for a delivery slot."""

    TABLE: ClassVar[str] = "settlements"
    commit_id: str
    time_delivery_start: int
    time_delivery_end: int
    seller_id: str
    buyer_id: str
    bid_uuid: str
    ask_uuid: str
    bid_id: str | None
    ask_id: str | None
    energy_source: str
    quantity: int
    price_buy: float
    price_sell: float
    amount_buy: int
    amount_sell: int
    dispatch: bool
    seq: int  # commit order within the slot
    time_creation: int


class MeterRecord(Record, frozen=True):
    """One meter reading; the source maps are stored as canonical JSON text."""

    TABLE: ClassVar[str] = "meters"
    id: str
    participant_id: str
    time_interval_start: int
    time_interval_end: int
    generation: str
    consumption: str
    time_creation: int


class RoundRecord(Record, frozen=True):
    TABLE: ClassVar[str] = "rounds"
    id: str
    time: int
    duration: int
    current_round_start: int
    matched_slot_start: int
    trades: int
    metered: int
    missing: str  # JSON list of participant ids
    records: int


class RunRecord(Record, frozen=True):
    TABLE: ClassVar[str] = "runs"
    id: str
    scenario: str
    seed: int
    started: int
    config: str  # canonical JSON of the market settings


class EntryRecord(Record, frozen=True):
    """An accepted bid or ask, durable before it is acknowledged (so a restart keeps the book)."""

    TABLE: ClassVar[str] = "entries"
    id: str  # the entry's uuid
    client_id: str | None
    participant_id: str
    side: str
    quantity: int
    price: float
    time_delivery_start: int
    time_delivery_end: int
    source: str | None
    time_submission: int
    seq: int  # the participant's n-th accepted entry


class CancelRecord(Record, frozen=True):
    TABLE: ClassVar[str] = "cancels"
    id: str  # the cancelled entry's uuid
    participant_id: str
    time_delivery_start: int
    time_creation: int


TABLES: tuple[type[Record], ...] = (
    Transaction,
    Settlement,
    MeterRecord,
    RoundRecord,
    RunRecord,
    EntryRecord,
    CancelRecord,
)


class Batch(msgspec.Struct, frozen=True):
    """Records to be made durable together (one round, or one slot's processing)."""

    records: tuple[Record, ...]

    def __len__(self) -> int:
        return len(self.records)


class BalanceTransaction(Record, frozen=True):
    """One transaction of a sealed balance (PROTOCOL.md namespace /balancing): `energy` Wh
    from `from_id` to `to_id`; `seq` is its place in the balance, `seal` the balance's seal."""

    TABLE: ClassVar[str] = "balance_transactions"
    id: str  # f"b{epoch}-{asset_id}-{seq}"
    asset_id: str
    epoch: int
    epoch_start: int
    epoch_end: int
    seq: int
    from_id: str
    to_id: str
    energy: int
    seal: str


class BalanceSeal(Record, frozen=True):
    """A sealed balance: one row even when it has no transactions."""

    TABLE: ClassVar[str] = "balance_seals"
    id: str  # f"s{epoch}-{asset_id}"
    asset_id: str
    epoch: int
    epoch_start: int
    epoch_end: int
    transactions: int
    energy: int  # Wh, sum over its transactions
    seal: str


TABLES = (*TABLES, BalanceTransaction, BalanceSeal)
