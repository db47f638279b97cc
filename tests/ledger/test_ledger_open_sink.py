"""open_sink picks the backend by URL; the PostgreSQL statements compile without a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.dialects import postgresql, sqlite
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
    assert 'commit_id TEXT COLLATE "C" NOT NULL' in ddl  # keys in byte order, whatever the database's locale
    assert "seller_id TEXT NOT NULL" in ddl  # other text in the database's collation
    sqlite_ddl = str(CreateTable(TABLE_MAP["settlements"]).compile(dialect=sqlite.dialect()))
    assert "commit_id TEXT NOT NULL" in sqlite_ddl and "COLLATE" not in sqlite_ddl  # BINARY already
    assert "dispatch BOOLEAN NOT NULL" in ddl
    assert "quantity BIGINT NOT NULL" in ddl
    assert "PRIMARY KEY (commit_id)" in ddl
    insert = postgresql.insert(TABLE_MAP["transactions"]).on_conflict_do_nothing(index_elements=["id"])
    assert "ON CONFLICT (id) DO NOTHING" in str(insert.compile(dialect=dialect))


def test_reading_a_database_ledger_back_never_imports_the_chain_code(tmp_path: Path) -> None:
    """The chain libraries take about a second to import; a run that reads its SQLite ledger
    back (every `microte sim` summary) must not pay for them. A chain URL still resolves."""
    import subprocess
    import sys

    code = (
        "import asyncio, sys\n"
        "from ledger import db_url, ledger_digest, open_sink, read_rows\n"
        f"url = 'sqlite:///{tmp_path / 'l.db'}'\n"
        "async def create():\n"
        "    sink = open_sink(url)\n"
        "    await sink.start()\n"
        "    await sink.close()\n"
        "asyncio.run(create())\n"
        "read_rows(url, 'transactions')\n"
        "ledger_digest(url)\n"
        "chain = lambda: sorted(m for m in sys.modules if m.split('.')[0] in ('eth_account', 'py_ecc'))\n"
        "print(chain())\n"
        "assert db_url('evm+' + url) == url\n"
        "print(bool(chain()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"]
