"""SQL tables derived from the record structs of `market.core.records`.

The schema follows the structs, so a new field in a record is a new column here without
a second list to keep in sync. Tables are declared explicitly (not left to `dataset`'s
guessing) so string keys stay strings and NOT NULL holds from the first row.
"""

from __future__ import annotations

from typing import Any

import msgspec.inspect as mi
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import TypeEngine

from market.core.records import TABLES, Record

# Every table is keyed by `id` except settlements, whose natural key is the fill itself.
KEYS: dict[str, str] = {cls.TABLE: "id" for cls in TABLES} | {"settlements": "commit_id"}

# Tables that define the outcome of a run (compared by `ledger_digest`).
DIGEST_TABLES: tuple[str, ...] = ("transactions", "settlements", "meters")
# Outcome tables that only some runs fill (a PEM site's houses, docs/pem.md): in the digest
# when they hold rows, so the digest of every ledger without them stays what it was.
DIGEST_TABLES_IF_FILLED: tuple[str, ...] = ("house_slots", "pem_slots")

metadata = sa.MetaData()


def _column_type(tp: mi.Type) -> tuple[TypeEngine[Any], bool]:
    """SQL type and nullability of one struct field type."""
    nullable = False
    if isinstance(tp, mi.UnionType):
        members = [m for m in tp.types if not isinstance(m, mi.NoneType)]
        nullable = len(members) < len(tp.types)
        if len(members) != 1:
            raise TypeError(f"unsupported union field type: {tp}")
        tp = members[0]
    # bool before int: msgspec keeps them apart, but the order documents the intent.
    if isinstance(tp, mi.BoolType):
        return sa.Boolean(), nullable
    if isinstance(tp, mi.IntType):
        return sa.BigInteger(), nullable
    if isinstance(tp, mi.FloatType):
        return sa.Float(), nullable  # double precision on SQLite and PostgreSQL
    if isinstance(tp, mi.StrType) or (isinstance(tp, mi.LiteralType) and all(isinstance(v, str) for v in tp.values)):
        # TEXT, no length: SQLite and PostgreSQL index unbounded strings alike.
        return sa.Text(), nullable
    raise TypeError(f"unsupported field type: {tp}")


def _table(cls: type[Record]) -> sa.Table:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    key = KEYS[cls.TABLE]
    columns = []
    for field in info.fields:
        sql_type, nullable = _column_type(field.type)
        is_key = field.name == key
        if is_key and isinstance(sql_type, sa.Text):
            # Byte order on PostgreSQL too, as SQLite's BINARY: a key is an identifier, and a
            # locale's collation (ICU en-US in the tests) made each key index insert ~30 %
            # dearer and kept `ledger_digest`'s byte-order read off the index.
            sql_type = sql_type.with_variant(postgresql.TEXT(collation="C"), "postgresql")
        columns.append(
            sa.Column(
                field.name,
                sql_type,
                primary_key=is_key,
                nullable=nullable and not is_key,
                autoincrement=False,
            )
        )
    if not any(c.name == key for c in columns):
        raise TypeError(f"{cls.__name__} has no key field {key!r}")
    return sa.Table(cls.TABLE, metadata, *columns)


TABLE_MAP: dict[str, sa.Table] = {cls.TABLE: _table(cls) for cls in TABLES}

# Deliveries of a slot are read back by start time (the `delivery` event, reports).
sa.Index(
    "ix_transactions_time_delivery_start",
    TABLE_MAP["transactions"].c.time_delivery_start,
)


def key_column(table: str) -> sa.Column[Any]:
    return TABLE_MAP[table].c[KEYS[table]]


def columns_markdown() -> str:
    """Every record table with its key and its columns' SQL types, as docs/chain.md lists
    them for a verifier (`?`: nullable). The docs' copy is checked against this."""
    lines = ["| table | key | columns (SQL type as created; `?`: may be NULL) |", "|---|---|---|"]
    for name in sorted(TABLE_MAP):
        table = TABLE_MAP[name]
        cols = ", ".join(
            f"`{c.name}` {c.type.compile(dialect=sqlite.dialect())}{'?' if c.nullable else ''}" for c in table.columns
        )
        lines.append(f"| `{name}` | `{KEYS[name]}` | {cols} |")
    return "\n".join(lines)
