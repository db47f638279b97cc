"""Ledger backends for the market's `Sink` protocol, chosen by URL."""

from __future__ import annotations

from ledger.dataset_sink import DatasetSink
from ledger.digest import ledger_digest, read_rows
from market.sink import MemorySink, Sink

__all__ = ["DatasetSink", "ledger_digest", "open_sink", "read_rows"]

_SCHEMES = "sqlite:///PATH, postgresql://..., memory:"


def open_sink(url: str) -> Sink:
    """The sink for a ledger URL (not started: the caller owns start() and close())."""
    scheme, sep, rest = url.partition(":")
    backend = scheme.split("+", 1)[0].lower()
    if not sep:
        raise ValueError(f"ledger URL {url!r} has no scheme; expected one of {_SCHEMES}")
    if backend == "memory":
        return MemorySink()
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
