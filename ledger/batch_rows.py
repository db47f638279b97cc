"""The rows of a flush: records grouped by table, and their value tuples in column order (pure).

Both database writers take these tuples as they are (SQLite binds them, PostgreSQL's COPY
encodes them), so a record's values reach the database without a dict per row. Records
are converted as they are written, not before: on PostgreSQL the conversion then overlaps
the server's work on the rows already sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import Any

import msgspec

from ledger.schema import TABLE_MAP
from market.core.records import TABLES, Batch, Record

Row = tuple[Any, ...]
Groups = list[tuple[str, list[Record]]]  # records per table, tables in first-seen order


def columns(table: str) -> list[str]:
    """Column names of `table` in the order of its row tuples (the struct's field order)."""
    return [c.name for c in TABLE_MAP[table].columns]


def _converter(cls: type[Record]) -> Callable[[Record], Row]:
    """Record -> column values in table order (the schema follows the struct fields)."""
    if cls.row is Record.row:
        # Same values as `row()`, without building a dict per record: 5x faster.
        return msgspec.structs.astuple
    getter = itemgetter(*columns(cls.TABLE))
    return lambda record: tuple(getter(record.row()))


CONVERTERS: dict[str, Callable[[Record], Row]] = {cls.TABLE: _converter(cls) for cls in TABLES}


def rows(table: str, records: Iterable[Record]) -> list[Row]:
    """The value tuples of `records`, all of `table`."""
    return list(map(CONVERTERS[table], records))


def group(batches: Iterable[Batch]) -> Groups:
    """Records per table, keeping batch order inside each table."""
    groups: dict[str, list[Record]] = {}
    for batch in batches:
        for record in batch.records:
            table = record.TABLE
            if (same := groups.get(table)) is None:
                same = groups[table] = []
            same.append(record)
    return list(groups.items())
