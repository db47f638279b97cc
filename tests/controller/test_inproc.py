"""In-process runs (controller/inproc.py): the socket run's ledger, byte for byte, without sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import inproc
from controller.cli import main
from controller.inproc import InprocMarket
from controller.scenario import community, load_scenario
from controller.sim import run_sim
from ledger import ledger_digest, read_rows

SCENARIOS = Path(__file__).parents[2] / "scenarios"
SCENARIO = SCENARIOS / "community.toml"


@pytest.mark.parametrize(
    ("participants", "days", "overrides"), [(30, 1.0, {}), (12, 0.5, {"market.pricing": "uniform", "seed": 5})]
)
async def test_inproc_writes_the_socket_ledger_byte_for_byte(
    tmp_path: Path, participants: int, days: float, overrides: dict[str, object]
) -> None:
    """Batteries steered by their fills, random-price traders (seeded per slot) and synthetic
    prosumers included (a whole day: the batteries' fills come with the sun)."""
    socket, inproc = f"sqlite:///{tmp_path}/socket.db", f"sqlite:///{tmp_path}/inproc.db"
    kw = {"participants": participants, "days": days, "progress": False, "overrides": overrides}
    a = await run_sim(SCENARIO, ledger=socket, **kw)  # type: ignore[arg-type]
    b = await run_sim(SCENARIO, ledger=inproc, transport="inproc", **kw)  # type: ignore[arg-type]
    assert a.summary.trades > 0 and a.missing_total == b.missing_total == 0
    assert ledger_digest(socket) == ledger_digest(inproc)
    for table in ("entries", "cancels", "settlements", "meters", "transactions"):
        assert read_rows(socket, table) == read_rows(inproc, table), table
    assert read_rows(socket, "rounds") == read_rows(inproc, "rounds")  # not in the digest, equal too
    assert a.summary.bills == b.summary.bills


async def test_a_ledger_written_by_a_child_process_is_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long run's ledger goes through `LedgerPipe` (ledger/pipe_writer.py) in frames of
    `PIPE_EVERY` records: the same rows as written in this process."""
    here, there = f"sqlite:///{tmp_path}/here.db", f"sqlite:///{tmp_path}/there.db"
    kw = {"participants": 20, "days": 1.0, "progress": False, "transport": "inproc"}
    monkeypatch.setattr(inproc, "PIPE_FROM", 10**9)
    a = await run_sim(SCENARIO, ledger=here, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(inproc, "PIPE_FROM", 0)
    monkeypatch.setattr(inproc, "PIPE_EVERY", 1_000)  # several frames, merged by the child as it lags
    b = await run_sim(SCENARIO, ledger=there, **kw)  # type: ignore[arg-type]
    assert a.summary.trades > 0 and a.summary.bills == b.summary.bills
    assert ledger_digest(here) == ledger_digest(there)
    for table in ("rounds", "entries", "cancels", "settlements", "meters", "transactions"):
        assert read_rows(here, table) == read_rows(there, table), table
    run_a, run_b = (
        [{k: v for k, v in r.items() if k not in ("id", "started")} for r in read_rows(u, "runs")]
        for u in (here, there)
    )
    assert run_a == run_b and len(run_a) == 1  # but the wall clock the run started at


def test_the_cli_runs_inproc_and_says_what_it_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    assert main(["sim", str(SCENARIO), "--transport", "inproc", "--days", "0.25", "--ledger", url]) == 0
    out = capsys.readouterr().out
    assert "rounds/s" in out and "readings missing: 0" in out
    assert len(read_rows(url, "meters")) == 20 * 24
    # A [feeder] scenario needs the DSO agent, which runs over sockets only.
    bad = f"sqlite:///{tmp_path}/feeder.db"
    assert main(["sim", str(SCENARIOS / "feeder.toml"), "--transport", "inproc", "--ledger", bad]) == 2
    assert "--transport socket" in capsys.readouterr().err
    assert main(["sim", str(SCENARIO), "--transport", "inproc", "--fleet", "2", "--ledger", bad]) == 2
    assert not (tmp_path / "feeder.db").exists()


def test_rounds_must_be_opened_and_closed_in_order() -> None:
    scenario = load_scenario(SCENARIO, {"days": 0.1})
    run = InprocMarket(scenario, community(scenario, 4))
    t = scenario.start_time
    with pytest.raises(RuntimeError, match="no round is open"):
        run.close()
    run.open(t)
    with pytest.raises(RuntimeError, match="still open"):
        run.open(t + scenario.step)
    run.close()
    with pytest.raises(ValueError, match="not after"):
        run.open(t)
    with pytest.raises(ValueError, match="not in the scenario"):
        InprocMarket(scenario, community(scenario, 4), external=["nobody"])


def test_readings_of_a_source_the_market_does_not_know_are_refused_as_one_prosumer_each() -> None:
    """The population's readings are checked once per batch for the keys their maps may
    hold (`MeterBatch.keys`); a market that does not know one of them (no `wind` here)
    checks each reading, and refuses those that name it, as it does a prosumer's own."""
    scenario = load_scenario(SCENARIO, {"days": 0.25, "market.non_dispatch": ["solar"]})
    specs = community(scenario, 30)
    assert any(s.wind is not None for s in specs), "the community should have wind turbines"
    runs = [InprocMarket(scenario, specs, population=p) for p in (True, False)]
    assert runs[0].population is not None and runs[1].population is None
    for k in range(scenario.rounds):
        for run in runs:
            run.step(scenario.start_time + k * scenario.step)
    assert runs[0].refused == runs[1].refused > 0
    assert runs[0].missing == runs[1].missing > 0  # the refused readings are missing
    assert runs[0].take_records() == runs[1].take_records()
