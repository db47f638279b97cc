"""Ledger test setup: import path, and a ledger URL in tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The project is not necessarily installed in the venv: make `ledger` and `market`
# importable from the checkout (harmless when it is installed in editable mode).
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"
