"""Ledger test setup: import path, a SQLite ledger URL in tmp_path, a chain run (the PostgreSQL
server fixtures, `postgres` and `pg_url`, are tests/conftest.py's)."""

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


@pytest.fixture(scope="session")
def chain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SQLite file of a real run on a chain ledger, made once per session: `microte sim`
    (a market subprocess, real socket.io clients) of 6 prosumers over half a day, which has
    p2p trades and settlements, anchored on the in-process chain kept next to it (`.evm`).
    Tests change a copy of it (`run_copy`), never it."""
    import subprocess

    path = tmp_path_factory.mktemp("chain-run") / "run.db"
    scenario = ROOT / "scenarios" / "community.toml"
    argv = [sys.executable, "-m", "controller", "sim", str(scenario), "--participants", "6", "--days", "0.5"]
    subprocess.run([*argv, "--ledger", f"evm+sqlite:///{path}"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return path


@pytest.fixture
def run_copy(chain_run: Path, tmp_path: Path) -> Path:
    """A copy of `chain_run`'s database and chain file (with their WAL files) in tmp_path."""
    import shutil

    for src in (chain_run, chain_run.with_name(chain_run.name + ".evm")):
        for suffix in ("", "-wal", "-shm"):
            f = src.with_name(src.name + suffix)
            if f.exists():
                shutil.copy2(f, tmp_path / f.name)
    return tmp_path / chain_run.name
