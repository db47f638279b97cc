"""`microte sim --ledger memory:`: in process, the summary comes from the rows kept in
memory; over sockets the rows would live in the server's process, so it is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.cli import main
from controller.sim import run_sim

SCENARIO = Path(__file__).parents[2] / "scenarios" / "community.toml"


async def test_an_inproc_run_on_a_memory_ledger_sums_up_like_one_on_sqlite(tmp_path: Path) -> None:
    kw = {"participants": 8, "days": 0.5, "progress": False, "transport": "inproc"}
    memory = await run_sim(SCENARIO, ledger="memory:", **kw)  # type: ignore[arg-type]
    sqlite = await run_sim(SCENARIO, ledger=f"sqlite:///{tmp_path}/run.db", **kw)  # type: ignore[arg-type]
    assert memory.summary.trades > 0 and memory.summary.rounds == 48
    fields = ("trades", "p2p_wh", "imported_wh", "load_wh", "grid_bought_wh", "grid_sold_wh", "bills")
    assert {f: getattr(memory.summary, f) for f in fields} == {f: getattr(sqlite.summary, f) for f in fields}


def test_the_cli_runs_memory_inproc_and_refuses_it_over_sockets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", str(SCENARIO), "--transport", "inproc", "--days", "0.25", "--ledger", "memory:"]) == 0
    out = capsys.readouterr().out
    assert "trades (fills)" in out and "readings missing: 0" in out and "Ledger: memory:" in out
    assert main(["sim", str(SCENARIO), "--days", "0.25", "--ledger", "memory:"]) == 2
    err = capsys.readouterr().err
    assert "memory:" in err and "--transport inproc" in err
