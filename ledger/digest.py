"""Reading a ledger back: canonical rows and a digest to compare runs byte for byte.

Same scenario + same seed must give the same ledger (DESIGN.md, principle 7). The
digest covers the tables that define the outcome (transactions, settlements, meters),
not `rounds`/`runs`, which carry wall-clock and configuration details.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import sqlalchemy as sa

from ledger.schema import DIGEST_TABLES, DIGEST_TABLES_IF_FILLED, TABLE_MAP, key_column


@contextmanager
def connect(url: str) -> Iterator[sa.Connection]:
    """A connection to the database at `url` (a SQLAlchemy URL); a SQLite file that does not
    exist is refused with FileNotFoundError, never created."""
    parsed = sa.make_url(url)
    # Reading must not create an empty SQLite file at a mistyped path.
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database or "")
        if not path.exists():
            raise FileNotFoundError(f"no ledger database at {path}")
    engine = sa.create_engine(parsed)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def _ordered(conn: sa.Connection, table: str) -> sa.Select[Any]:
    if table not in TABLE_MAP:
        raise ValueError(f"unknown ledger table {table!r}; known: {sorted(TABLE_MAP)}")
    key: sa.ColumnElement[Any] = key_column(table)
    if conn.dialect.name == "postgresql":
        # Byte order, as SQLite's BINARY collation: locale collations differ by host.
        key = key.collate("C")
    # Columns in struct field order, whatever order the database stores them in.
    return sa.select(*TABLE_MAP[table].columns).order_by(key)


def read_rows(url: str, table: str) -> list[dict[str, Any]]:
    """All rows of `table`, ordered by its key, as plain dicts."""
    with connect(url) as conn:
        result = conn.execute(_ordered(conn, table))
        keys = list(map(str, result.keys()))
        # Zipped with the keys, not through `row._mapping`: a mapping view per row was 2/3
        # of reading a long run's tables back (its summary, reports, tests).
        return [dict(zip(keys, row, strict=True)) for row in result]


def count_rows(url: str, table: str) -> int:
    """How many rows `table` holds."""
    with connect(url) as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(TABLE_MAP[table])).scalar_one())


def _filled(conn: sa.Connection, tables: tuple[str, ...]) -> list[str]:
    """Those of `tables` that exist and hold a row (an older ledger lacks them)."""
    names = set(sa.inspect(conn).get_table_names())
    return [t for t in tables if t in names and conn.execute(sa.select(TABLE_MAP[t]).limit(1)).first() is not None]


def ledger_digest(url: str) -> str:
    """sha256 hex of the outcome tables, independent of batch splits and backend."""
    digest = hashlib.sha256()
    encode = msgspec.json.Encoder().encode
    with connect(url) as conn:
        for table in (*DIGEST_TABLES, *_filled(conn, DIGEST_TABLES_IF_FILLED)):
            columns = [str(c.name) for c in TABLE_MAP[table].columns]
            digest.update(encode([table, columns]) + b"\n")
            # Streamed: a long run's ledger need not fit in memory.
            result = conn.execution_options(yield_per=10_000).execute(_ordered(conn, table))
            for row in result:
                # -0.0 + 0.0 == 0.0: SQLite drops the sign of zero, PostgreSQL keeps it.
                values = [v + 0.0 if type(v) is float else v for v in row]
                digest.update(encode(values) + b"\n")
    return digest.hexdigest()
