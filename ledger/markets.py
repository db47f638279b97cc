"""Many markets, one PostgreSQL database (docs/hierarchy.md): each market's tables live in a
schema of its own, named by the market's id, so their rows never meet and the same ledger
code, digest and report work per market; `market_url` makes a market's ledger URL.

A market's URL is the database's URL with libpq's `options=-csearch_path=<schema>`: every
connection, the sink's bulk COPY included, then reads and writes that schema only. SQLite
has no schemas: there a market gets a file of its own (`{market}` in the URL)."""

from __future__ import annotations

import re
from urllib.parse import quote

import sqlalchemy as sa

_ID = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
SCHEMA = re.compile(r"^m_[a-z][a-z0-9_]{0,31}$")
_SEARCH_PATH = re.compile(r"-csearch_path=([a-z][a-z0-9_]*)")


def schema_of(market: str) -> str:
    """The schema of a market id: `m_` + the id, one to one (so two markets never share one)."""
    if not _ID.match(market):
        raise ValueError(f"market id {market!r}: a lower-case letter, then up to 31 lower-case letters, digits or _")
    return "m_" + market


def market_url(url: str, market: str) -> str:
    """The ledger URL of `market`: `{market}` replaced (any backend), else a PostgreSQL URL
    with the market's schema as its search path."""
    if "{market}" in url:
        return url.replace("{market}", market)
    parsed = sa.make_url(url.removeprefix("evm+"))
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"ledger URL {url!r}: several markets need {{market}} in it, or a PostgreSQL database")
    if "options" in parsed.query:
        raise ValueError(f"ledger URL {url!r}: already has libpq options; give the database's plain URL")
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema_of(market)}')}"


def ensure_schema(url: str) -> None:
    """Create the schema a PostgreSQL URL's search path names, if it does not exist yet."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return
    found = _SEARCH_PATH.search(str(parsed.query.get("options", "")))
    if found is None:
        return
    engine = sa.create_engine(parsed.difference_update_query(["options"]))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{found.group(1)}"'))
    finally:
        engine.dispose()


def markets_in(url: str) -> list[str]:
    """The market schemas (`m_...`) of a PostgreSQL database, by schema name."""
    engine = sa.create_engine(sa.make_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE 'm\\_%' ORDER BY 1")
            )
            return [r[0] for r in rows if SCHEMA.match(r[0])]  # a name of any other shape is nobody's market
    finally:
        engine.dispose()


def digest_of_all(digests: dict[str, str]) -> str:
    """One digest over several markets' digests: sha256 of `market digest` lines, sorted."""
    import hashlib

    text = "".join(f"{m} {d}\n" for m, d in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()
