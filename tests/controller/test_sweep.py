"""`microte sweep` (controller/sweep.py): the run list, results.csv, the plot, determinism
across sweeps, processes, Ray and the socket transport, and bad input refused up front."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from controller.cli import main
from controller.sweep import SweepError, parse_sets, parse_value, plan_runs, split_values
from ledger import ledger_digest, read_rows

SCENARIO = Path(__file__).parents[2] / "scenarios" / "community.toml"
SMALL = ["--days", "0.25", "--participants", "10", "--quiet"]
PNG = b"\x89PNG\r\n\x1a\n"


def sweep(out: Path, *args: str) -> list[dict[str, str]]:
    assert main(["sweep", str(SCENARIO), "--out", str(out), *SMALL, *args]) == 0
    with (out / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def digests(rows: list[dict[str, str]]) -> dict[tuple[str, str], str]:
    return {(r["market.pricing"], r["seed"]): r["digest"] for r in rows}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """The small sweep of several tests: 2 pricings x 2 seeds in 2 worker processes."""
    out = tmp_path_factory.mktemp("local")
    return out, sweep(out, "--set", "market.pricing=midpoint,uniform", "--seeds", "2", "--jobs", "2")


def test_set_values_are_toml_literals_or_text() -> None:
    assert [parse_value(v) for v in ("50", "0.1", "true", "uniform", '"a,b"', "2026-06-01")] == [
        50,
        0.1,
        True,
        "uniform",
        "a,b",
        "2026-06-01",
    ]
    assert split_values('a, [1, 2],"x,y"') == ["a", "[1, 2]", '"x,y"']
    sets = parse_sets(["market.pricing=midpoint,uniform", "participants=50,100"])
    assert sets == {"market.pricing": ["midpoint", "uniform"], "participants": [50, 100]}
    runs = plan_runs(sets, [1, 2], scenario=SCENARIO, out="/tmp/x", transport="inproc")
    assert [r.name for r in runs[:3]] == [
        "market.pricing=midpoint,participants=50,seed=1",
        "market.pricing=midpoint,participants=50,seed=2",
        "market.pricing=midpoint,participants=100,seed=1",
    ]
    assert len(runs) == 8 and runs[0].participants == 50
    assert runs[0].overrides == {"market.pricing": "midpoint", "seed": 1}  # participants is run_sim's argument
    with pytest.raises(SweepError, match="given twice"):
        parse_sets(["days=1", "days=2"])


def test_local_sweep_writes_a_row_a_ledger_and_a_plot_per_run(
    local: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    out, rows = local
    assert [(r["market.pricing"], r["seed"], r["transport"]) for r in rows] == [
        ("midpoint", "42", "inproc"),
        ("midpoint", "43", "inproc"),
        ("uniform", "42", "inproc"),
        ("uniform", "43", "inproc"),
    ]
    assert len(list((out / "runs").glob("*.db"))) == 4
    assert (out / "comparison.png").read_bytes().startswith(PNG)
    for r in rows:
        url = f"sqlite:///{out / r['ledger']}"
        assert ledger_digest(url) == r["digest"]
        (run,) = read_rows(url, "runs")
        assert run["seed"] == int(r["seed"])  # the seed reached the market
        assert json.loads(run["config"])["pricing"] == r["market.pricing"]
        assert int(r["rounds"]) == 24 and int(r["readings_missing"]) == 0 and int(r["trades"]) > 0
        assert 0 <= float(r["p2p_share"]) <= 1
    assert len(set(digests(rows).values())) == 3, "seed 43 trades differently under uniform pricing"
    # Another sweep, in this process (--jobs 1), of one combination: the same ledger.
    again = sweep(tmp_path, "--set", "market.pricing=uniform", "--seed-base", "43")
    assert digests(again) == {("uniform", "43"): digests(rows)[("uniform", "43")]}


def test_socket_transport_writes_the_inproc_ledger(local: tuple[Path, list[dict[str, str]]], tmp_path: Path) -> None:
    rows = sweep(tmp_path, "--set", "market.pricing=midpoint", "--transport", "socket")
    assert rows[0]["transport"] == "socket" and int(rows[0]["trades"]) > 0
    assert digests(rows) == {("midpoint", "42"): digests(local[1])[("midpoint", "42")]}


def test_ray_sweep_gives_the_local_digests(local: tuple[Path, list[dict[str, str]]], tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    args = ("--set", "market.pricing=midpoint,uniform", "--seeds", "2", "--jobs", "2", "--ray", "local")
    rows = sweep(tmp_path, *args)
    assert not ray.is_initialized()  # shut down again
    assert digests(rows) == digests(local[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "nonsense"], "expected KEY=VALUE"),
        (["--set", "market.nosuchfield=1"], "nosuchfield"),
        (["--set", "market.pricing=midpoint,nosuchpricing"], "nosuchpricing"),
        (["--set", "participants=0"], "participants=0"),
        (["--jobs", "0"], "--jobs 0"),
        (["--participants", "5", "--set", "participants=5"], "give one of them"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    assert main(["sweep", str(SCENARIO), "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("microte sweep: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_inproc_refuses_a_feeder_scenario_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["sweep", str(SCENARIO.with_name("feeder.toml")), "--out", str(out)]) == 2
    assert "--transport socket" in capsys.readouterr().err
    assert not out.exists()
