"""DatasetSink against real SQLite files: round trip, idempotency, group commit, retries."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ledger_samples import every_kind, settlement, transaction
from sqlalchemy.exc import IntegrityError, OperationalError

from ledger import DatasetSink, read_rows
from market.core.records import TABLES, Batch, Transaction


@pytest.fixture
async def sink(url: str) -> AsyncIterator[DatasetSink]:
    s = DatasetSink(url)
    await s.start()
    yield s
    await s.close()


def count(db_path: Path, table: str) -> int:
    """Row count through an independent connection: what another process would see."""
    with sqlite3.connect(db_path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def test_every_record_kind_round_trips_exactly(sink: DatasetSink, url: str) -> None:
    batch = every_kind()
    await sink.write(batch)
    for cls in TABLES:
        expected = [r.row() for r in batch.records if type(r) is cls]
        assert expected, cls
        rows = read_rows(url, cls.TABLE)
        assert rows == expected
        for got, want in zip(rows, expected, strict=True):
            assert list(got) == list(want)  # columns in struct field order
            assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}


async def test_schema_is_explicit(sink: DatasetSink, db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        info = {r[1]: r for r in conn.execute("PRAGMA table_info(transactions)")}
        # (cid, name, type, notnull, default, pk)
        assert info["id"][2:] == ("TEXT", 1, None, 1)
        assert info["quantity"][2:4] == ("BIGINT", 1)
        assert info["price_buy"][2:4] == ("FLOAT", 1)
        assert info["commit_id"][2:4] == ("TEXT", 0)  # str | None
        assert "id" not in {r[1] for r in conn.execute("PRAGMA table_info(settlements)")}
        pk = [r[1] for r in conn.execute("PRAGMA table_info(settlements)") if r[5]]
        assert pk == ["commit_id"]
        dispatch = [r for r in conn.execute("PRAGMA table_info(settlements)") if r[1] == "dispatch"]
        assert dispatch[0][2:4] == ("BOOLEAN", 1)
        indexes = [r[1] for r in conn.execute("PRAGMA index_list(transactions)")]
        assert "ix_transactions_time_delivery_start" in indexes


async def test_same_batch_twice_stores_each_row_once(sink: DatasetSink, url: str, db_path: Path) -> None:
    batch = every_kind()
    await sink.write(batch)
    await sink.write(batch)  # a retried round after a crash
    await asyncio.gather(sink.write(batch), sink.write(batch))  # twice in one flush
    for cls in TABLES:
        assert count(db_path, cls.TABLE) == sum(type(r) is cls for r in batch.records)
    # A replay with other content does not overwrite: the first write wins.
    changed = Batch((transaction(1, price=9.99),))
    await sink.write(changed)
    assert read_rows(url, "transactions")[0]["price_buy"] == transaction(1).price_buy


async def test_concurrent_writes_are_durable_and_group_committed(sink: DatasetSink, db_path: Path) -> None:
    n = 200

    async def writer(i: int) -> None:
        await sink.write(Batch((transaction(i), settlement(i))))
        # Durable once write() returns: visible to an independent connection.
        with sqlite3.connect(db_path) as conn:
            hit = conn.execute("SELECT 1 FROM transactions WHERE id = ?", (transaction(i).id,))
            assert hit.fetchone() is not None

    await asyncio.gather(*(writer(i) for i in range(n)))
    assert count(db_path, "transactions") == n
    assert count(db_path, "settlements") == n
    assert 1 <= sink.commits < n


async def test_rows_keep_batch_order_within_a_table(sink: DatasetSink, db_path: Path) -> None:
    ids = [7, 3, 9, 1, 5, 2]
    await asyncio.gather(
        sink.write(Batch(tuple(transaction(i) for i in ids[:3]))),
        sink.write(Batch(tuple(transaction(i) for i in ids[3:]))),
    )
    with sqlite3.connect(db_path) as conn:
        stored = [r[0] for r in conn.execute("SELECT id FROM transactions ORDER BY rowid")]
    assert stored == [transaction(i).id for i in ids]


async def test_database_locked_is_retried(url: str, db_path: Path) -> None:
    sink = DatasetSink(url, busy_timeout=0.02, retry_attempts=50, retry_wait_max=0.05)
    await sink.start()
    try:
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        task = asyncio.create_task(sink.write(Batch((transaction(1),))))
        await asyncio.sleep(0.3)
        assert not task.done()
        blocker.execute("ROLLBACK")
        blocker.close()
        await asyncio.wait_for(task, timeout=10)
        assert sink.retries >= 1
        assert count(db_path, "transactions") == 1
    finally:
        await sink.close()


async def test_permanent_failure_reaches_the_writer(url: str, db_path: Path) -> None:
    sink = DatasetSink(url, busy_timeout=0.01, retry_attempts=2, retry_wait_max=0.01)
    await sink.start()
    try:
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError, match="locked"):
            await sink.write(Batch((transaction(1),)))
        blocker.execute("ROLLBACK")
        blocker.close()
        assert sink.retries == 1
        await sink.write(Batch((transaction(2),)))  # the sink is still usable
        assert count(db_path, "transactions") == 1
    finally:
        await sink.close()


async def test_a_bad_batch_fails_alone(sink: DatasetSink, db_path: Path) -> None:
    good = [Batch((transaction(i),)) for i in range(5)]
    # Structs are not validated on construction: a NULL seller violates NOT NULL.
    bad = Batch((Transaction(**(transaction(99).row() | {"seller_id": None})),))
    results = await asyncio.gather(*(sink.write(b) for b in [*good, bad]), return_exceptions=True)
    assert all(r is None for r in results[:5])
    assert isinstance(results[5], IntegrityError)
    assert count(db_path, "transactions") == 5


async def test_close_flushes_queued_batches(url: str, db_path: Path) -> None:
    sink = DatasetSink(url, max_queue=4)  # small: some writers wait for room
    await sink.start()
    tasks = [asyncio.create_task(sink.write(Batch((transaction(i),)))) for i in range(50)]
    await asyncio.sleep(0)  # let the writers enqueue (or block on the full queue)
    await sink.close()
    await sink.close()  # idempotent
    assert all(t.done() and t.exception() is None for t in tasks)
    assert count(db_path, "transactions") == 50
    with pytest.raises(RuntimeError):
        await sink.write(Batch((transaction(99),)))


async def test_wal_and_synchronous_full(sink: DatasetSink, db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def synchronous() -> int:
        assert sink._engine is not None
        with sink._engine.connect() as conn:
            return int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one())

    assert await asyncio.get_running_loop().run_in_executor(sink._executor, synchronous) == 2


async def test_misuse_is_refused(url: str) -> None:
    sink = DatasetSink(url)
    with pytest.raises(RuntimeError):
        await sink.write(Batch((transaction(1),)))
    await sink.start()
    try:
        with pytest.raises(ValueError, match="no ledger table"):
            await sink.write(Batch((object(),)))  # type: ignore[arg-type]
        await sink.write(Batch(()))  # nothing to do
        assert sink.commits == 0
    finally:
        await sink.close()
    with pytest.raises(RuntimeError):
        await sink.start()


async def test_reopening_an_existing_ledger(url: str, db_path: Path) -> None:
    for i in range(2):
        sink = DatasetSink(url)
        await sink.start()  # tables exist the second time: created only if missing
        await sink.write(Batch((transaction(i),)))
        await sink.close()
    assert count(db_path, "transactions") == 2


CRASHING_WRITER = """
import asyncio, os, sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from ledger import DatasetSink
from ledger_samples import every_kind

async def main():
    sink = DatasetSink(sys.argv[1])
    await sink.start()
    await sink.write(every_kind())
    print("acked", flush=True)
    await asyncio.sleep(60)  # killed here, without close()

asyncio.run(main())
"""


def test_acknowledged_write_survives_kill_9(url: str, db_path: Path) -> None:
    here = Path(__file__).resolve().parent
    with subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, url, str(here.parents[1]), str(here)],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "acked"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    assert read_rows(url, "transactions") == [r.row() for r in every_kind().records if isinstance(r, Transaction)]


async def wal_after_writes(tmp_path: Path, name: str, checkpoint_every: float) -> int:
    """Bytes of WAL after 400 commits of 100 rows (~8 MB written), with a pause now and then."""
    db = tmp_path / f"{name}.db"
    sink = DatasetSink(f"sqlite:///{db}", checkpoint_every=checkpoint_every)
    await sink.start()
    try:
        for k in range(400):
            await sink.write(Batch(tuple(transaction(k * 100 + i) for i in range(100))))
            if k % 20 == 0:
                await asyncio.sleep(0.03)  # a checkpoint's turn
        assert count(db, "transactions") == 40_000
        return db.with_name(db.name + "-wal").stat().st_size
    finally:
        await sink.close()


async def test_the_wal_is_checkpointed_off_the_write_path(tmp_path: Path) -> None:
    """The writer never checkpoints (a commit is never a checkpoint, which would put its
    fsync of the database file into every pending acknowledgement): without the sink's own
    checkpoints the WAL holds everything written; with them it stays a fraction of that."""
    unchecked = await wal_after_writes(tmp_path, "never", checkpoint_every=3600)
    checked = await wal_after_writes(tmp_path, "often", checkpoint_every=0.02)
    assert unchecked > 6_000_000, unchecked  # no checkpoint happened inside a commit
    assert checked < unchecked / 3, (checked, unchecked)
