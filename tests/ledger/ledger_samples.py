"""Sample records of every kind for the ledger tests."""

from __future__ import annotations

from market.records import (
    BalanceSeal,
    BalanceTransaction,
    Batch,
    CancelRecord,
    EntryRecord,
    MeterRecord,
    Record,
    RoundRecord,
    RunRecord,
    Settlement,
    Transaction,
    amount,
)

T0 = 1_700_000_100


def transaction(i: int, *, price: float = 0.1 + 0.2, commit_id: str | None = "c-1") -> Transaction:
    quantity = 1_250 + i
    return Transaction(
        id=f"tx-{i:06d}",
        kind="p2p",
        time_delivery_start=T0 + 900 * (i % 4),
        time_delivery_end=T0 + 900 * (i % 4 + 1),
        seller_id="P1",
        buyer_id="Pé-2",  # non-ASCII survives the round trip
        energy_source="solar",
        quantity=quantity,
        price_buy=price,
        price_sell=price,
        amount_buy=amount(quantity, price),
        amount_sell=amount(quantity, price),
        commit_id=commit_id,
        time_creation=T0,
    )


def settlement(i: int, *, dispatch: bool = False) -> Settlement:
    return Settlement(
        commit_id=f"c-{i}",
        time_delivery_start=T0,
        time_delivery_end=T0 + 900,
        seller_id="P1",
        buyer_id="P2",
        bid_uuid=f"b-{i}",
        ask_uuid=f"a-{i}",
        bid_id=None,
        ask_id=f"client-ask-{i}",
        energy_source="bess",
        quantity=2**40 + i,  # beyond 32 bits: BigInteger
        price_buy=1e-9,
        price_sell=-0.0725,
        amount_buy=-(2**45),
        amount_sell=0,
        dispatch=dispatch,
        seq=i,
        time_creation=T0,
    )


def every_kind() -> Batch:
    records: tuple[Record, ...] = (
        transaction(1),
        transaction(2, commit_id=None, price=-0.0321),
        settlement(1, dispatch=True),
        settlement(2, dispatch=False),
        MeterRecord(
            id="m-P1",
            participant_id="P1",
            time_interval_start=T0,
            time_interval_end=T0 + 900,
            generation='{"solar":1200}',
            consumption='{"bess":{},"other":{"external":30}}',
            time_creation=T0,
        ),
        RoundRecord(
            id="r-1",
            time=T0,
            duration=900,
            current_round_start=T0,
            matched_slot_start=T0 + 1800,
            trades=2,
            metered=1,
            missing='["P3"]',
            records=5,
        ),
        RunRecord(id="run-1", scenario="community", seed=42, started=T0, config="{}"),
        EntryRecord(
            id="P1.1700000100.0",
            client_id=None,
            participant_id="P1",
            side="ask",
            quantity=500,
            price=0.125,
            time_delivery_start=T0,
            time_delivery_end=T0 + 900,
            source="solar",
            time_submission=T0 - 1800,
            seq=0,
        ),
        CancelRecord(id="P1.1700000100.0", participant_id="P1", time_delivery_start=T0, time_creation=T0 - 900),
        BalanceTransaction(
            id="b1337-seller1-0",
            asset_id="seller1",
            epoch=1337,
            epoch_start=1337 * 900,
            epoch_end=1338 * 900,
            seq=0,
            from_id="seller1",
            to_id="bigbalancer",
            energy=500,
            seal="ab" * 32,
        ),
        BalanceSeal(
            id="s1337-seller1",
            asset_id="seller1",
            epoch=1337,
            epoch_start=1337 * 900,
            epoch_end=1338 * 900,
            transactions=1,
            energy=500,
            seal="ab" * 32,
        ),
    )
    return Batch(records)
