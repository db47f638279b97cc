"""DatasetSink against a real PostgreSQL server (started by tests/pg.py): the same schema,
idempotency and results as SQLite, down to the ledger digest of a simulated run."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from ledger_samples import T0, every_kind, settlement, transaction
from sqlalchemy.exc import IntegrityError

from controller.sim import run_sim
from ledger import DatasetSink, ledger_digest, open_sink, read_rows
from ledger.schema import DIGEST_TABLES, KEYS, TABLE_MAP
from market.core.records import TABLES, Batch, MeterRecord, Record, Transaction
from tests.pg import PostgresServer, connect

SCENARIO = Path(__file__).parents[2] / "scenarios" / "community.toml"


@pytest.fixture
async def sink(pg_url: str) -> AsyncIterator[DatasetSink]:
    s = DatasetSink(pg_url)
    await s.start()
    yield s
    await s.close()


async def write_ledger(url: str, batches: list[Batch]) -> str:
    sink = DatasetSink(url)
    await sink.start()
    try:
        for batch in batches:
            await sink.write(batch)
    finally:
        await sink.close()
    return url


def count(url: str, table: str) -> int:
    """Row count through an independent connection: what another client would see."""
    with connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def tricky_records() -> list[Record]:
    """Every kind, plus keys whose byte order differs from a natural-language collation
    (case, punctuation, non-ASCII) and values at the edges of each column type."""
    odd_ids = ["tx-B", "tx-a", "TX-c", "tx_d", "tx-é", "tx-z", "tx-10", "tx-9", "tx- space", "tx-😀"]
    txs = [msgspec.structs.replace(transaction(i), id=tid) for i, tid in enumerate(odd_ids, start=100)]
    edge = [
        msgspec.structs.replace(transaction(200), id="tx-edge-1", price_buy=-0.0, price_sell=5e-324, quantity=2**62),
        msgspec.structs.replace(transaction(201), id="tx-edge-2", price_buy=1e308, amount_buy=-(2**63) + 1),
        msgspec.structs.replace(transaction(202), id="tx-edge-3", energy_source='it\'s "quoted" \\ %s'),
    ]
    commits = ["c-B", "c-a", "C-c", "c_d", "c-é"]
    sets = [msgspec.structs.replace(settlement(i), commit_id=c) for i, c in enumerate(commits, start=50)]
    meters = [
        MeterRecord(
            id=mid,
            participant_id=mid,
            time_interval_start=T0,
            time_interval_end=T0 + 900,
            generation='{"solar":1}',
            consumption='{"other":{}}',
            time_creation=T0,
        )
        for mid in ["m-B", "m-a", "M-c"]
    ]
    return [
        *every_kind().records,
        *(transaction(i) for i in range(10, 40)),
        *(settlement(i) for i in range(10, 20)),
        *txs,
        *edge,
        *sets,
        *meters,
    ]


# -- round trip and schema ------------------------------------------------------------


async def test_every_record_kind_round_trips_exactly(sink: DatasetSink, pg_url: str) -> None:
    batch = every_kind()
    await sink.write(batch)
    for cls in TABLES:
        expected = [r.row() for r in batch.records if type(r) is cls]
        assert expected, cls
        for rows in (read_rows(pg_url, cls.TABLE), await sink.read(cls.TABLE)):
            assert rows == expected
            for got, want in zip(rows, expected, strict=True):
                assert list(got) == list(want)  # columns in struct field order
                assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}
        # Each row converts back into the record it came from.
        assert [msgspec.convert(r, cls) for r in read_rows(pg_url, cls.TABLE)] == [
            r for r in batch.records if type(r) is cls
        ]


def _schema(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    try:
        insp = sa.inspect(engine)
        return {
            t: {
                "columns": [(c["name"], type(c["type"]).__name__, c["nullable"]) for c in insp.get_columns(t)],
                "pk": insp.get_pk_constraint(t)["constrained_columns"],
                "indexes": sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes(t)),
            }
            for t in sorted(insp.get_table_names())
        }
    finally:
        engine.dispose()


async def test_schema_is_the_same_as_sqlite(sink: DatasetSink, pg_url: str, url: str) -> None:
    await write_ledger(url, [])  # creates the SQLite tables
    pg, lite = _schema(pg_url), _schema(url)
    assert sorted(pg) == sorted(TABLE_MAP)
    for table in TABLE_MAP:
        assert pg[table]["pk"] == lite[table]["pk"] == [KEYS[table]]
        assert pg[table]["indexes"] == lite[table]["indexes"]
        # Same names, order and nullability; the types are the dialects' spellings of the same.
        assert [(n, nullable) for n, _, nullable in pg[table]["columns"]] == [
            (n, nullable) for n, _, nullable in lite[table]["columns"]
        ]
    with connect(pg_url) as conn:
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'settlements'"
            ).fetchall()
        )
        keys = conn.execute(
            "SELECT table_name, column_name, collation_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND data_type = 'text'"
        ).fetchall()
    # Keys in byte order (as SQLite's BINARY), whatever the database's locale; other text not.
    assert {(t, c) for t, c, coll in keys if coll == "C"} == {(t, KEYS[t]) for t in TABLE_MAP}
    assert types["commit_id"] == "text"
    assert types["quantity"] == "bigint"
    assert types["price_buy"] == "double precision"
    assert types["dispatch"] == "boolean"


# -- idempotency ----------------------------------------------------------------------


async def test_same_batch_twice_stores_each_row_once(sink: DatasetSink, pg_url: str) -> None:
    batch = every_kind()
    await sink.write(batch)
    await sink.write(batch)  # a retried round after a crash
    await asyncio.gather(sink.write(batch), sink.write(batch))  # twice in one flush
    for cls in TABLES:
        assert count(pg_url, cls.TABLE) == sum(type(r) is cls for r in batch.records)
    # A replay with other content does not overwrite: the first write wins.
    await sink.write(Batch((transaction(1, price=9.99),)))
    assert read_rows(pg_url, "transactions")[0]["price_buy"] == transaction(1).price_buy


async def test_reopening_an_existing_ledger(pg_url: str) -> None:
    for i in range(2):
        await write_ledger(pg_url, [Batch((transaction(i), transaction(0)))])  # tables created only if missing
    assert count(pg_url, "transactions") == 2


# -- concurrency and failures ---------------------------------------------------------


async def test_concurrent_writes_are_durable_and_group_committed(sink: DatasetSink, pg_url: str) -> None:
    n = 200
    with connect(pg_url, autocommit=True) as observer:

        async def writer(i: int) -> None:
            await sink.write(Batch((transaction(i), settlement(i))))
            # Durable once write() returns: committed, visible to another connection.
            hit = observer.execute("SELECT 1 FROM transactions WHERE id = %s", (transaction(i).id,))
            assert hit.fetchone() is not None

        await asyncio.gather(*(writer(i) for i in range(n)))
    assert count(pg_url, "transactions") == n
    assert count(pg_url, "settlements") == n
    assert 1 <= sink.commits < n


async def test_two_writers_racing_on_the_same_records(pg_url: str) -> None:
    """Two sinks (two connections, as two market processes would have) write the same
    records at once, batch after batch, in opposite orders: each row once, no write lost or
    failed (a deadlock between the two is retried)."""
    records = [transaction(i) for i in range(400)]
    batches = [Batch(tuple(records[i : i + 20])) for i in range(0, len(records), 20)]
    backwards = [Batch(tuple(reversed(b.records))) for b in reversed(batches)]
    sinks = [DatasetSink(pg_url, retry_wait_max=0.05, retry_attempts=20) for _ in range(2)]
    for s in sinks:
        await s.start()

    async def one_by_one(sink: DatasetSink, order: list[Batch]) -> None:
        for b in order:
            await sink.write(b)  # one transaction per batch: many chances to collide

    try:
        await asyncio.gather(one_by_one(sinks[0], batches), one_by_one(sinks[1], backwards))
        shuffled = [*batches, *backwards]
        random.Random(7).shuffle(shuffled)
        await asyncio.gather(*(sinks[i % 2].write(b) for i, b in enumerate(shuffled)))
    finally:
        for s in sinks:
            await s.close()
    assert read_rows(pg_url, "transactions") == [r.row() for r in records]
    assert sum(s.commits for s in sinks) >= 2 * len(batches)


async def test_a_bad_batch_fails_alone(sink: DatasetSink, pg_url: str) -> None:
    good = [Batch((transaction(i),)) for i in range(5)]
    bad = Batch((Transaction(**(transaction(99).row() | {"seller_id": None})),))  # NOT NULL
    results = await asyncio.gather(*(sink.write(b) for b in [*good, bad]), return_exceptions=True)
    assert all(r is None for r in results[:5])
    assert isinstance(results[5], IntegrityError)
    assert count(pg_url, "transactions") == 5
    await sink.write(Batch((transaction(6),)))  # the sink is still usable
    assert count(pg_url, "transactions") == 6


async def test_a_lost_connection_is_retried(postgres: PostgresServer, pg_url: str) -> None:
    sink = DatasetSink(pg_url, retry_wait_max=0.05)
    await sink.start()
    try:
        await sink.write(Batch((transaction(1),)))
        # The server drops every connection of the ledger (a restart, a failover, a proxy).
        with connect(postgres.admin_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                (sa.make_url(pg_url).database,),
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        await asyncio.wait_for(sink.write(Batch((transaction(2),))), timeout=30)
        assert sink.retries >= 1
        assert count(pg_url, "transactions") == 2
    finally:
        await sink.close()


# -- same results as SQLite -----------------------------------------------------------


async def test_digest_and_rows_equal_sqlite(postgres: PostgresServer, url: str) -> None:
    recs = tricky_records()
    await write_ledger(url, [Batch(tuple(recs))])
    # Another batch split and order, and the plain `postgresql://` URL (SQLAlchemy's
    # default PostgreSQL driver is psycopg 3 as well).
    pg_url = postgres.new_database().replace("postgresql+psycopg://", "postgresql://", 1)
    await write_ledger(pg_url, [Batch((r,)) for r in reversed(recs[:20])] + [Batch(tuple(recs[20:]))])
    assert ledger_digest(pg_url) == ledger_digest(url)
    for cls in TABLES:
        assert read_rows(pg_url, cls.TABLE) == read_rows(url, cls.TABLE), cls.TABLE
    # The digest still sees a difference in the last bits of one float.
    other = postgres.new_database()
    i = next(k for k, r in enumerate(recs) if r == transaction(10))
    changed = msgspec.structs.replace(transaction(10), price_buy=transaction(10).price_buy + 1e-12)
    await write_ledger(other, [Batch((*recs[:i], changed, *recs[i + 1 :]))])
    assert ledger_digest(other) != ledger_digest(url)


async def test_sink_reads_in_the_same_order_as_sqlite(pg_url: str, url: str) -> None:
    """What a restarted market reads back (`Sink.read`) comes in the same order on both."""
    recs = tricky_records()
    lite, pg = DatasetSink(url), DatasetSink(pg_url)
    for s in (lite, pg):
        await s.start()
    try:
        for s in (lite, pg):
            await s.write(Batch(tuple(reversed(recs))))
        for table in TABLE_MAP:
            assert await pg.read(table) == await lite.read(table), table
        after = ("time_delivery_start", T0)
        rows = await pg.read("transactions", after)
        assert rows == await lite.read("transactions", after)
        assert 0 < len(rows) < count(pg_url, "transactions")
    finally:
        for s in (lite, pg):
            await s.close()


async def test_open_sink_and_digest_of_an_empty_ledger(pg_url: str, url: str) -> None:
    for u in (pg_url, url):
        sink = open_sink(u)
        await sink.start()
        await sink.close()
    assert ledger_digest(pg_url) == ledger_digest(url)


async def test_sim_on_postgresql_matches_sqlite(pg_url: str, tmp_path: Path) -> None:
    """The headline: one scenario and seed through `microte sim` (a `microte market
    --ledger URL` subprocess, real clients) on SQLite and on PostgreSQL, same ledger."""
    lite = f"sqlite:///{tmp_path}/sim.db"
    results = [await run_sim(SCENARIO, ledger=u, participants=6, days=0.25, progress=False) for u in (lite, pg_url)]
    assert results[0].summary.trades > 0, "the scenario should trade"
    assert results[0].missing_total == results[1].missing_total == 0
    assert results[1].summary == msgspec.structs.replace(results[0].summary, seconds=results[1].summary.seconds)
    assert ledger_digest(pg_url) == ledger_digest(lite)
    for table in DIGEST_TABLES:
        assert read_rows(pg_url, table) == read_rows(lite, table), table
    for table in ("entries", "rounds", "runs"):  # journal and bookkeeping: same counts
        assert count(pg_url, table) == len(read_rows(lite, table)) > 0, table


async def test_an_inproc_run_written_by_the_child_process_matches_sqlite(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--transport inproc` hands a long run's ledger to `python -m ledger.pipe_writer`
    (ledger/pipe_writer.py), which writes PostgreSQL by COPY: the same ledger as SQLite."""
    from controller import inproc

    monkeypatch.setattr(inproc, "PIPE_FROM", 0)  # this short run through the child too
    monkeypatch.setattr(inproc, "PIPE_EVERY", 500)
    lite = f"sqlite:///{tmp_path}/inproc.db"
    for u in (lite, pg_url):
        await run_sim(SCENARIO, ledger=u, participants=8, days=0.5, progress=False, transport="inproc")
    assert ledger_digest(pg_url) == ledger_digest(lite)
    for table in (*DIGEST_TABLES, "entries", "rounds"):
        assert read_rows(pg_url, table) == read_rows(lite, table), table
