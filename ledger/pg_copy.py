"""PostgreSQL: a flush's rows by `COPY ... FROM STDIN (FORMAT BINARY)` in one transaction.

COPY streams the rows without a statement per row and, in binary, carries every value
exactly (float8 bits, -0.0 included; text as UTF-8; NULL as NULL). It has no
`ON CONFLICT`, so it is tried first straight into the tables: a unique violation (a
replayed round, another writer that stored the same records, one key twice in a flush)
rolls the whole transaction back, and the flush is written again through temporary
staging tables and `INSERT ... SELECT ... ON CONFLICT DO NOTHING`, which keeps the first
write of each key as the row-at-a-time inserts do. Any other error rolls back everything.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

from ledger.batch_rows import CONVERTERS, Groups, columns
from ledger.schema import KEYS, TABLE_MAP
from market.core.records import Record


def _pg_type(column: sa.Column[Any]) -> str:
    """The binary COPY type of a schema column (ledger/schema.py makes only these four)."""
    t = column.type
    if isinstance(t, sa.Boolean):
        return "bool"
    if isinstance(t, sa.BigInteger):
        return "int8"
    if isinstance(t, sa.Float):
        return "float8"
    if isinstance(t, sa.Text):
        return "text"
    raise TypeError(f"no COPY type for {column}: {t}")


TYPES: dict[str, list[str]] = {name: [_pg_type(c) for c in t.columns] for name, t in TABLE_MAP.items()}


def _copy(cur: psycopg.Cursor[Any], table: str, records: list[Record], into: str | None = None) -> None:
    """COPY `records` of `table` into `table` itself or into `into` (a table of its columns)."""
    cols = sql.SQL(", ").join(map(sql.Identifier, columns(table)))
    stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(sql.Identifier(into or table), cols)
    with cur.copy(stmt) as copy:
        copy.set_types(TYPES[table])
        write, convert = copy.write_row, CONVERTERS[table]
        for record in records:
            write(convert(record))


def _copy_idempotent(cur: psycopg.Cursor[Any], table: str, records: list[Record]) -> None:
    name = f"ledger_stage_{table}"
    stage = sql.Identifier(name)
    target = sql.Identifier(table)
    cols = sql.SQL(", ").join(map(sql.Identifier, columns(table)))
    # LIKE copies NOT NULL: a bad row fails here as it would in the table.
    cur.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(stage, target))
    _copy(cur, table, records, into=name)
    # A temporary table is scanned in the order its rows were copied (no synchronized scans
    # on local buffers), so of two rows with one key the first is kept, as row by row.
    cur.execute(
        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) DO NOTHING").format(
            target, cols, cols, stage, sql.Identifier(KEYS[table])
        )
    )


def write(conn: psycopg.Connection[Any], groups: Groups) -> None:
    """Commit `groups` on `conn` (not in autocommit), or roll back and raise."""
    try:
        try:
            with conn.cursor() as cur:
                for table, records in groups:
                    _copy(cur, table, records)
            conn.commit()
            return
        except psycopg.errors.UniqueViolation:
            conn.rollback()
        with conn.cursor() as cur:
            for table, records in groups:
                _copy_idempotent(cur, table, records)
        conn.commit()
    except BaseException:
        with contextlib.suppress(psycopg.Error):  # the error that matters is the write's
            conn.rollback()
        raise
