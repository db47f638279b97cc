"""Fixtures of every test package: a throwaway PostgreSQL server (tests/pg.py) and a new
database on it per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.pg import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (tests/pg.py); fails, never skips,
    when no server can be started: CI installs PostgreSQL (.ci/run)."""
    from tests.pg import PostgresUnavailable, start_server

    try:
        server = start_server()
    except PostgresUnavailable as exc:
        problem = str(exc)
    else:
        yield server
        server.stop()
        return
    pytest.fail(problem, pytrace=False)  # outside `except`: the message once, no traceback


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A new, empty database on the session's server: `postgresql+psycopg://...`."""
    return postgres.new_database()
