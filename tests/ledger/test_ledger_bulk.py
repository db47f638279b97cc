"""The bulk write paths (multi-row inserts on SQLite, COPY on PostgreSQL) store exactly what
the row-at-a-time statements they replaced store (`DatasetSink(bulk=False)`): the same rows,
values bit for bit, the same digest; and a batch they cannot store leaves nothing behind."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest
from ledger_samples import T0, every_kind, settlement, transaction
from sqlalchemy.exc import IntegrityError

from ledger import DatasetSink, ledger_digest, read_rows, sqlite_insert
from ledger.batch_rows import columns, rows
from ledger.schema import KEYS, TABLE_MAP
from market.core.records import Batch, MeterRecord, Record, Transaction
from tests.pg import PostgresServer, connect

FLOATS = [-0.0, 0.0, 1e-300, -1e-300, 5e-324, 1e308, -1e308, 0.1 + 0.2, 1 / 3, 2.0**-1074 * 3, 123456789.125]
TEXTS = ["", "é", "😀 emoji", "中文", "e\u0301 combining", 'it\'s "quoted" \\ %s', "tab\there\nnew line", "\x7f\x01"]


def tricky() -> list[Record]:
    """Values at the edges of each column type, NULLs among them, in more rows than one
    statement takes (every tail size of the SQLite path)."""
    recs: list[Record] = list(every_kind().records)
    for i in range(1_003):
        f = FLOATS[i % len(FLOATS)]
        recs.append(
            msgspec.structs.replace(
                transaction(1_000 + i),
                price_buy=f,
                price_sell=FLOATS[(i + 3) % len(FLOATS)],
                seller_id=TEXTS[i % len(TEXTS)] + str(i),
                energy_source=TEXTS[(i + 1) % len(TEXTS)],
                commit_id=None if i % 3 else f"c-{i}",
                amount_buy=(2**63 - 1) if i % 5 == 0 else -(2**63) + i,
                quantity=i,
            )
        )
    for i in range(77):
        s = settlement(100 + i, dispatch=bool(i % 2))
        recs.append(msgspec.structs.replace(s, bid_id=None if i % 2 else f"b-é-{i}", price_buy=FLOATS[i % len(FLOATS)]))
    long_json = msgspec.json.encode({f"src-{k}-é": k for k in range(20_000)}).decode()  # ~400 kB
    for i in range(40):
        recs.append(
            MeterRecord(
                id=f"m-{i:03d}",
                participant_id=TEXTS[i % len(TEXTS)] + "P",
                time_interval_start=T0,
                time_interval_end=T0 + 900,
                generation=long_json if i % 10 == 0 else '{"solar":1}',
                consumption=f'{{"bess":{{}},"other":{{"external":{i}}}}}',
                time_creation=T0,
            )
        )
    return recs


def bits(value: Any) -> Any:
    """A float as its IEEE bits (so -0.0 != 0.0 and nothing is rounded); bools apart from ints."""
    if type(value) is float:
        return ("float", struct.pack("<d", value))
    return (type(value).__name__, value)


async def write(url: str, batches: list[Batch], *, bulk: bool) -> None:
    sink = DatasetSink(url, bulk=bulk)
    await sink.start()
    try:
        for batch in batches:
            await sink.write(batch)
    finally:
        await sink.close()


def tables_of(recs: list[Record]) -> list[str]:
    return sorted({type(r).TABLE for r in recs})


def sqlite_stored(path: Path, table: str) -> list[tuple[Any, ...]]:
    """Every stored value with its SQLite storage class, in rowid (insertion) order."""
    cols = columns(table)
    sel = ", ".join(f'"{c}", typeof("{c}")' for c in cols)
    with sqlite3.connect(path) as conn:
        return [tuple(map(bits, r)) for r in conn.execute(f'SELECT rowid, {sel} FROM "{table}" ORDER BY rowid')]


def pg_stored(url: str, table: str) -> list[tuple[Any, ...]]:
    """Every stored value (binary transfer: exact floats), ordered by key in byte order."""
    cols = ", ".join(f'"{c}"' for c in columns(table))
    with connect(url) as conn, conn.cursor(binary=True) as cur:
        cur.execute(f'SELECT {cols} FROM "{table}" ORDER BY "{KEYS[table]}" COLLATE "C"')
        return [tuple(map(bits, r)) for r in cur.fetchall()]


def split(recs: list[Record]) -> list[Batch]:
    return [Batch(tuple(recs[:500])), Batch(tuple(recs[500:])), Batch(tuple(recs[::7]))]  # the last: a replay


# -- SQLite ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_statement", [1, 2, 5, 33, 128, 300])
def test_multi_row_inserts_equal_row_at_a_time(per_statement: int) -> None:
    txs: list[Record] = [r for r in tricky() if isinstance(r, Transaction)]
    txs += [msgspec.structs.replace(t, quantity=-1) for t in txs[:10]]  # keys again: the first of each is kept
    txs.append(msgspec.structs.replace(txs[-1], id="tx-new"))
    stored = []
    for bulk in (False, True):
        conn = sqlite3.connect(":memory:")
        cols = ", ".join(f'"{c}"' for c in columns("transactions"))
        conn.execute(f'CREATE TABLE transactions ({cols}, PRIMARY KEY ("id"))')
        cur = conn.cursor()
        for n in (0, 1, len(txs) // 3, len(txs)):  # several calls, of every length class
            chunk = txs[:n]
            if bulk:
                sqlite_insert.insert(cur, "transactions", chunk, per_statement=per_statement)
            else:
                cur.executemany(sqlite_insert.statement("transactions", 1), rows("transactions", chunk))
        stored.append([tuple(map(bits, r)) for r in conn.execute("SELECT rowid, * FROM transactions ORDER BY rowid")])
    assert stored[0] == stored[1]
    assert len(stored[1]) == len(txs) - 10


def test_a_key_twice_in_one_statement_keeps_the_first() -> None:
    a, b = transaction(1), transaction(2)
    recs: list[Record] = [a, transaction(1, price=9.0), b, transaction(2, commit_id=None), transaction(3)]
    conn = sqlite3.connect(":memory:")
    conn.execute(f'CREATE TABLE transactions ({", ".join(columns("transactions"))}, PRIMARY KEY ("id"))')
    sqlite_insert.insert(conn.cursor(), "transactions", recs, per_statement=5)  # one statement
    assert conn.execute("SELECT * FROM transactions ORDER BY rowid").fetchall() == rows(
        "transactions", [a, b, transaction(3)]
    )


async def test_sqlite_bulk_stores_what_row_at_a_time_stores(tmp_path: Path) -> None:
    recs = tricky()
    urls = {bulk: f"sqlite:///{tmp_path / f'{bulk}.db'}" for bulk in (False, True)}
    for bulk, url in urls.items():
        await write(url, split(recs), bulk=bulk)
    assert ledger_digest(urls[True]) == ledger_digest(urls[False])
    for table in tables_of(recs):
        assert sqlite_stored(tmp_path / "True.db", table) == sqlite_stored(tmp_path / "False.db", table), table
        assert read_rows(urls[True], table) == read_rows(urls[False], table), table
    # And what was written is what the records hold (first write of each key).
    want = [r.row() for r in {t.id: t for t in reversed(recs) if isinstance(t, Transaction)}.values()]
    assert read_rows(urls[True], "transactions") == sorted(want, key=lambda r: r["id"])


def bad_mid_batch() -> Batch:
    """Good rows of several tables around one that violates NOT NULL, late in its table."""
    good = tricky()
    bad = Transaction(**(transaction(5_000).row() | {"seller_id": None}))
    i = next(k for k, r in enumerate(good) if isinstance(r, Transaction) and r.quantity == 900)
    return Batch((*good[:i], bad, *good[i:]))


async def test_sqlite_a_refused_batch_leaves_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    sink = DatasetSink(url)
    await sink.start()
    try:
        await sink.write(Batch((transaction(1),)))
        before = {t: read_rows(url, t) for t in TABLE_MAP}
        with pytest.raises(IntegrityError):
            await sink.write(bad_mid_batch())
        assert {t: read_rows(url, t) for t in TABLE_MAP} == before
        await sink.write(Batch((transaction(2),)))  # still usable
        assert len(read_rows(url, "transactions")) == 2
    finally:
        await sink.close()


# -- PostgreSQL -----------------------------------------------------------------------


async def test_postgres_copy_stores_what_row_at_a_time_stores(postgres: PostgresServer, tmp_path: Path) -> None:
    recs = tricky()
    urls = {bulk: postgres.new_database() for bulk in (False, True)}
    for bulk, url in urls.items():
        await write(url, split(recs), bulk=bulk)
    lite = f"sqlite:///{tmp_path / 'lite.db'}"
    await write(lite, split(recs), bulk=True)
    assert ledger_digest(urls[True]) == ledger_digest(urls[False]) == ledger_digest(lite)
    for table in tables_of(recs):
        assert pg_stored(urls[True], table) == pg_stored(urls[False], table), table
        assert read_rows(urls[True], table) == read_rows(urls[False], table), table
    negative_zero = [r for r in pg_stored(urls[True], "transactions") if ("float", struct.pack("<d", -0.0)) in r]
    assert negative_zero  # kept as written, as the row-at-a-time inserts keep it


async def test_postgres_copy_keeps_the_first_write_of_a_key(pg_url: str) -> None:
    """A key already stored, or twice in one flush, takes COPY's idempotent fallback."""
    first, changed = transaction(1), transaction(1, price=9.99)
    await write(
        pg_url, [Batch((first, transaction(2))), Batch((changed, transaction(3), transaction(3, price=7.0)))], bulk=True
    )
    rows = read_rows(pg_url, "transactions")
    assert [r["id"] for r in rows] == [transaction(i).id for i in (1, 2, 3)]
    assert rows[0] == first.row() and rows[2] == transaction(3).row()


@pytest.mark.parametrize("replay", [False, True], ids=["copy", "idempotent-fallback"])
async def test_postgres_a_refused_batch_leaves_nothing(pg_url: str, replay: bool) -> None:
    sink = DatasetSink(pg_url)
    await sink.start()
    try:
        await sink.write(Batch((transaction(1),)))
        before = {t: read_rows(pg_url, t) for t in TABLE_MAP}
        bad = bad_mid_batch()
        if replay:  # a key already stored: the fallback path meets the bad row
            bad = Batch((transaction(1), *bad.records))
        with pytest.raises(IntegrityError):
            await sink.write(bad)
        assert {t: read_rows(pg_url, t) for t in TABLE_MAP} == before
        await sink.write(Batch((transaction(2),)))  # still usable
        assert len(read_rows(pg_url, "transactions")) == 2
    finally:
        await sink.close()
