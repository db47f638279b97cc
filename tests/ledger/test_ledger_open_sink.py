"""open_sink picks the backend by URL; the PostgreSQL statements compile without a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateTable

from ledger import DatasetSink, open_sink
from ledger.schema import TABLE_MAP
from market.core.sink import MemorySink


def test_backend_by_url(tmp_path: Path) -> None:
    assert isinstance(open_sink("memory:"), MemorySink)
    sqlite = open_sink(f"sqlite:///{tmp_path / 'l.db'}")
    assert isinstance(sqlite, DatasetSink)
    assert isinstance(open_sink("sqlite:///relative.db"), DatasetSink)
    # Constructing does not connect: no PostgreSQL server or driver needed here.
    assert isinstance(open_sink("postgresql://microte@localhost/ledger"), DatasetSink)
    assert isinstance(open_sink("postgresql+psycopg://microte@localhost/ledger"), DatasetSink)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u@h/db", "unknown ledger URL scheme"),
        ("evm+http://127.0.0.1:8545", "unknown ledger URL scheme"),
        ("microte.db", "no scheme"),
        ("sqlite://", "needs a file"),
        ("sqlite:///:memory:", "needs a file"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_sink(url)


def test_postgresql_schema_and_insert_compile() -> None:
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    ddl = str(CreateTable(TABLE_MAP["settlements"]).compile(dialect=dialect))
    assert "commit_id TEXT NOT NULL" in ddl
    assert "dispatch BOOLEAN NOT NULL" in ddl
    assert "quantity BIGINT NOT NULL" in ddl
    assert "PRIMARY KEY (commit_id)" in ddl
    insert = postgresql.insert(TABLE_MAP["transactions"]).on_conflict_do_nothing(index_elements=["id"])
    assert "ON CONFLICT (id) DO NOTHING" in str(insert.compile(dialect=dialect))
