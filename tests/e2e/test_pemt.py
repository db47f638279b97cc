"""The PEMT-CoSim case through the market (issue #18): `microte init pemt` writes a scenario
that `microte sim` runs as it is, over sockets (a real market server, real clients, the DSO
agent's power flows), with the PEM coordinator trading its houses' energy in the auction.

Checked from the ledger: one row per house and slot and one per site and slot; the
coordinator's meter readings are exactly the sum of its houses' HVAC energy; it bought that
energy in the auction; the same seed gives the same ledger (its houses' rows included), and
the in-process run writes the same ledger as the socket run.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import tomli_w

from controller import cli
from controller.sim import run_sim
from ledger.digest import ledger_digest, read_rows

HOUSES = 5


def init(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> Path:
    out = tmp_path / "case"
    assert cli.main(["init", "pemt", "--houses", str(HOUSES), "--out", str(out), "--days", "0.25", *extra]) == 0
    assert "wrote" in capsys.readouterr().out
    return out / "scenario.toml"


async def test_generated_case_runs_over_sockets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = init(tmp_path, capsys)
    url = f"sqlite:///{tmp_path / 'a.db'}"
    result = await run_sim(scenario, ledger=url)
    assert result.missing_total == 0
    slots = 24  # a quarter day of 15-minute slots
    houses = read_rows(url, "house_slots")
    pem = read_rows(url, "pem_slots")
    assert len(houses) == HOUSES * slots and len(pem) == slots
    assert {r["mode"] for r in pem} == {"pem"}
    meters = {r["time_interval_start"]: r for r in read_rows(url, "meters") if r["participant_id"] == "PEM1"}
    assert len(meters) == slots
    for p in pem:
        reading = json.loads(meters[p["time_delivery_start"]]["consumption"])
        hvac = sum(h["hvac_wh"] for h in houses if h["time_delivery_start"] == p["time_delivery_start"])
        assert reading == {"bess": {}, "other": {"external": hvac}} and hvac == p["load_wh"]
        assert p["target_w"] is not None and p["capacity_w"] == round(1.7 * HOUSES * 1000)
    bought = sum(t["quantity"] for t in read_rows(url, "transactions") if t["buyer_id"] == "PEM1")
    assert bought == sum(p["load_wh"] for p in pem)  # every Wh the houses used was bought
    assert read_rows(url, "grid_flows")  # the DSO agent ran the feeder's power flows
    # The same seed, the same ledger: the houses' rows are in the digest.
    again = f"sqlite:///{tmp_path / 'b.db'}"
    await run_sim(scenario, ledger=again)
    assert ledger_digest(again) == ledger_digest(url)
    assert read_rows(again, "house_slots") == houses
    # The grid report draws the site's figure (issue 18 item 6).
    assert cli.main(["grid-report", url, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "pem.png").stat().st_size > 10_000
    assert len((tmp_path / "report" / "pem_slots.csv").read_text().splitlines()) == slots + 1


async def test_inproc_writes_the_same_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = init(tmp_path, capsys, "--mode", "thermostat")
    table = tomllib.loads(scenario.read_text())
    del table["feeder"]  # in-process runs have no DSO agent yet
    scenario.write_text(tomli_w.dumps(table))
    sockets, inproc = f"sqlite:///{tmp_path / 's.db'}", f"sqlite:///{tmp_path / 'i.db'}"
    await run_sim(scenario, ledger=sockets)
    await run_sim(scenario, ledger=inproc, transport="inproc")
    assert read_rows(inproc, "pem_slots") == read_rows(sockets, "pem_slots")
    assert ledger_digest(inproc) == ledger_digest(sockets)


async def test_a_pem_site_needs_a_database_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = init(tmp_path, capsys)
    with pytest.raises(ValueError, match="house rows need a sqlite"):
        await run_sim(scenario, ledger=f"evm+sqlite:///{tmp_path / 'x.db'}")


def test_init_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["init", "pemt", "--houses", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--houses" in capsys.readouterr().err
    init(tmp_path, capsys)
    assert cli.main(["init", "pemt", "--out", str(tmp_path / "case")]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


async def test_microte_participant_writes_a_pem_sites_rows(tmp_path: Path) -> None:
    """A PEM site run by `microte participant` against a market someone else steps: it
    refuses to start without a ledger for its houses, and with one writes them as it goes."""
    import asyncio
    import signal
    import sys

    from ledger import open_sink
    from market.core.engine import MarketConfig
    from market.server.app import MarketServer
    from tests.e2e.conftest import TOKENS, registry
    from tests.e2e.test_connect_retry import free_port, serving_on

    scenario = tmp_path / "s.toml"
    scenario.write_text('[[participants]]\nid = "P1"\npem = { houses = 3, capacity_kw = 8.0 }\n')
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[participants]]\nid = "P1"\ntoken = "{TOKENS["P1"]}"\n')
    port = free_port()
    cmd = [sys.executable, "-m", "controller", "participant", "--url", f"http://127.0.0.1:{port}"]
    cmd += ["--scenario", str(scenario), "--registry", str(tokens)]
    refused = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(refused.communicate(), 30)
    assert refused.returncode != 0 and b"--ledger" in err
    houses = f"sqlite:///{tmp_path / 'houses.db'}"
    proc = await asyncio.create_subprocess_exec(*cmd, "--ledger", houses, stdout=asyncio.subprocess.PIPE)
    try:
        server = MarketServer(
            MarketConfig(duration=900, round_timeout=5), registry(), open_sink(f"sqlite:///{tmp_path / 'm.db'}")
        )
        async with serving_on(server, port):
            for _ in range(300):
                if "P1" in server.online():
                    break
                await asyncio.sleep(0.1)
            for k in range(4):
                await server.step(1_689_051_600 + k * 900, None)
            await asyncio.sleep(2.5)  # the command writes about every second
            assert len(read_rows(houses, "pem_slots")) == 4  # written while it runs
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0
        assert len(read_rows(houses, "house_slots")) == 3 * 4
        meters = read_rows(f"sqlite:///{tmp_path / 'm.db'}", "meters")
        assert sum(json.loads(m["consumption"])["other"]["external"] for m in meters) == sum(
            r["load_wh"] for r in read_rows(houses, "pem_slots")
        )
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
