"""SQLite: a table's rows as multi-row `INSERT ... VALUES (...), (...) ON CONFLICT DO NOTHING`.

One statement step per row costs SQLite a full statement run (VDBE start, halt, reset) and
the driver a call per row; many rows per statement share them. The rows still go in in
order, each checked against the key on its own, so the result is that of a row-at-a-time
`executemany`: the same rows, the same rowids, the first of two equal keys kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import cache
from typing import Any

from ledger.batch_rows import CONVERTERS, columns
from ledger.schema import KEYS
from market.core.records import Record

# Rows per statement: past ~64 the gain flattens (bench/ledger.py); SQLite's default limit
# of 32,766 bound variables allows 1,800 rows of the widest table.
ROWS_PER_STATEMENT = 128
# A batch's tail goes in statements of these sizes, so only a few statements are ever
# prepared per table (the driver caches them by their text).
_TAIL_SIZES = (32, 8, 1)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@cache
def statement(table: str, rows: int) -> str:
    """The idempotent insert of `rows` rows into `table`, qmark parameters in column order."""
    cols = columns(table)
    one = "(" + ", ".join("?" * len(cols)) + ")"
    return (
        f"INSERT INTO {_quote(table)} ({', '.join(map(_quote, cols))}) "
        f"VALUES {', '.join([one] * rows)} ON CONFLICT ({_quote(KEYS[table])}) DO NOTHING"
    )


def insert(cursor: Any, table: str, records: Sequence[Record], per_statement: int = ROWS_PER_STATEMENT) -> None:
    """Insert `records` of `table` through a sqlite3 cursor, inside the caller's transaction."""
    convert = CONVERTERS[table]
    flat = itertools.chain.from_iterable
    start = 0
    for size in (per_statement, *(s for s in _TAIL_SIZES if s < per_statement)):
        end = start + (len(records) - start) // size * size
        if end == start:
            continue
        sql = statement(table, size)
        if size == 1:
            cursor.executemany(sql, map(convert, records[start:end]))
        else:
            chunks = (tuple(flat(map(convert, records[i : i + size]))) for i in range(start, end, size))
            cursor.executemany(sql, chunks)
        start = end
