"""Ledger backends for the market's `Sink` protocol, chosen by URL."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa

from ledger import digest as _digest
from ledger.dataset_sink import DatasetSink
from market.core.sink import MemorySink, Sink

__all__ = [
    "CHAIN_PREFIX",
    "DatasetSink",
    "connect",
    "count_rows",
    "db_url",
    "is_chain_url",
    "is_memory",
    "ledger_digest",
    "open_sink",
    "read_rows",
]

_SCHEMES = "sqlite:///PATH, postgresql://..., evm+sqlite:///PATH, evm+postgresql://..., memory:"


CHAIN_PREFIX = "evm+"  # a chain ledger's URL: this, then its database's (ledger/dual.py)


def is_chain_url(url: str) -> bool:
    return url.lower().startswith(CHAIN_PREFIX)


def db_url(url: str) -> str:
    """The database URL of a ledger URL: a chain ledger's (`evm+...`) without its chain part.
    The chain code is imported for chain ledgers only: its libraries take a second to import,
    which every `microte sim` would pay to read its SQLite ledger back."""
    if not is_chain_url(url):
        return url
    from ledger.dual import db_url as dual_db_url

    return dual_db_url(url)


def is_memory(url: str) -> bool:
    """True for `memory:`: a ledger whose rows live in the process that wrote them."""
    return url.partition(":")[0].lower() == "memory"


def _database(url: str) -> str:
    if is_memory(url):
        raise ValueError(
            f"ledger URL {url!r}: a memory: ledger can only be read by the process that holds it "
            "(through its sink's read); use a sqlite:/// or postgresql:// ledger to read it from here"
        )
    return db_url(url)


def read_rows(url: str, table: str) -> list[dict[str, Any]]:
    """All rows of `table`, ordered by its key, as plain dicts (any database ledger URL)."""
    return _digest.read_rows(_database(url), table)


def count_rows(url: str, table: str) -> int:
    """How many rows `table` holds (any database ledger URL)."""
    return _digest.count_rows(_database(url), table)


def connect(url: str) -> AbstractContextManager[sa.Connection]:
    """A connection to a ledger's database, for queries of one's own (any database ledger URL,
    a chain ledger's `evm+...` included: its database). A SQLite file that does not exist is
    refused (FileNotFoundError), never created; a `memory:` URL is refused (ValueError)."""
    return _digest.connect(_database(url))


def ledger_digest(url: str) -> str:
    """sha256 hex of the outcome tables (any database ledger URL: a chain ledger's database)."""
    return _digest.ledger_digest(_database(url))


def open_sink(url: str) -> Sink:
    """The sink for a ledger URL (not started: the caller owns start() and close())."""
    scheme, sep, rest = url.partition(":")
    backend = scheme.split("+", 1)[0].lower()
    if not sep:
        raise ValueError(f"ledger URL {url!r} has no scheme; expected one of {_SCHEMES}")
    if backend == "memory":
        return MemorySink()
    if backend == "evm":
        # The database first, then each round's Merkle root on an EVM chain (docs/chain.md).
        from ledger.dual import DualSink

        return DualSink.from_url(url)
    if backend == "sqlite":
        path = rest.removeprefix("///")
        if not rest.startswith("///") or path in ("", ":memory:"):
            # An in-memory SQLite database would vanish with its connection.
            raise ValueError(
                f"ledger URL {url!r}: SQLite needs a file, e.g. sqlite:///microte.db "
                "(use memory: for a ledger kept in memory)"
            )
        return DatasetSink(url)
    if backend == "postgresql":
        return DatasetSink(url)
    raise ValueError(f"unknown ledger URL scheme {scheme!r} in {url!r}; expected {_SCHEMES}")
