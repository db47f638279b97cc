"""The Parity market run as a community would (issue #19, items 4 and 5): `microte init
parity` from the seed's initializer JSON, then `microte sim` of its scenario for a day with
the `[parity.agents]` it wrote: the market server as a subprocess, the prosumers as socket.io
clients on `/market`, the aggregator and the prosumers' `/grid` sessions as agents, the
periodic LEM solver and SLA checker in the server, the pseudonyms from a real HTTP
pseudonymization service that the test starts (the seed's own URL points nowhere).

Checked from the ledger alone: every LEM slot that ended is solved, hour by hour; each SLA
is checked once and its penalties are exactly the values that broke their KPIs; tokens are
conserved; no table holds a registry id; the auction and the LEM together pay each kWh once;
the same seed gives the same ledger.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from controller import cli
from controller.sim import run_sim
from ledger.digest import ledger_digest, read_rows
from market.community.solver import community_flow
from tests.e2e.test_grid import grid_digest
from tests.e2e.test_grid_pseudonyms import good, service, svc_pseudonym

DATA = Path(__file__).parents[1] / "data"
SEED = DATA / "conf_sidechain_initializer_example.json"
IDS = ("DSO", "AGG", "PR1", "PR2", "PR3", "PR4")  # the initializer's accounts
TABLES = (
    "transactions",
    "settlements",
    "meters",
    "rounds",
    "runs",
    "entries",
    "lems",
    "lem_measures",
    "lem_results",
    "token_transfers",
    "slas",
    "kpi_values",
    "sla_results",
)


def community(tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]) -> Path:
    """The seed's initializer JSON with its pseudonymization service at `url`, initialized."""
    conf = json.loads(SEED.read_text())
    conf["pseudonymization"]["pseudonomizerWebService"] = url
    (tmp_path / "conf").mkdir()
    shutil.copy(DATA / "conf" / "accounts_addresses.txt", tmp_path / "conf")
    (tmp_path / "conf.json").write_text(json.dumps(conf))
    out = tmp_path / "community"
    assert cli.main(["init", "parity", "--from", str(tmp_path / "conf.json"), "--out", str(out)]) == 0
    capsys.readouterr()
    return out / "scenario.toml"


def lem_price(r: dict[str, Any]) -> int:
    """The LEM's price of a player's energy (docs/parity.md, *Solving a LEM*), micro-currency."""
    ec, ep = r["consumption"] / 1000, r["production"] / 1000
    f = community_flow(r["total_consumption"] / 1000, r["total_production"] / 1000)
    return round(1e6 * (ep * r["p_sell"] - ec * r["p_buy"] - r["beta"] * (ec - ep) * f))


async def test_a_community_from_the_seed_json_runs_a_day(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with service(good) as (url, asked):
        scenario = community(tmp_path, url, capsys)
        ledger = f"sqlite:///{tmp_path / 'day.db'}"
        result = await run_sim(scenario, ledger=ledger, progress=False)
        again = f"sqlite:///{tmp_path / 'again.db'}"
        await run_sim(scenario, ledger=again, progress=False)
    assert {"AGG", "PR1", "PR2", "PR3", "PR4"} <= set(asked)  # the service named everyone
    assert result.missing_total == 0 and result.parity is not None
    rows = {t: read_rows(ledger, t) for t in TABLES}

    # No registry id anywhere: every column of every row of every table.
    for table, found in rows.items():
        for row in found:
            for column, value in row.items():
                if isinstance(value, str):
                    assert not any(i in value for i in IDS), (table, column, value)
    ps = {p: svc_pseudonym(p) for p in ("AGG", "PR1", "PR2", "PR3", "PR4")}
    assert {r["participant_id"] for r in rows["meters"]} == {ps[p] for p in ("PR1", "PR2", "PR3", "PR4")}

    # Every LEM slot that ended (95 of the day's 96) solved, by the periodic solver hour by
    # hour (each hour's four LEMs in one solve), the last hour's by the aggregator at the end.
    results = rows["lem_results"]
    starts = sorted({r["time_delivery_start"] for r in results})
    t0 = starts[0]
    assert starts == [t0 + 900 * k for k in range(95)] and len(results) == 95 * 4
    by_solve: dict[str, set[int]] = {}
    for r in results:
        by_solve.setdefault(r["solve_id"], set()).add(r["time_delivery_start"])
    hourly = [s for s in by_solve if s.endswith(f"-{int(s[1:].split('-')[0]) + 3600}")]
    assert len(hourly) >= 23 and all(len(by_solve[s]) == 4 for s in hourly)
    assert all(r["measured"] == "prosumer" for r in results)  # the prosumers saved every measurement

    # The auction and the LEM pay each kWh once: the tokens move the LEM's price less what
    # the auction's transactions already moved for that player in that slot.
    money: dict[tuple[int, str], int] = {}
    for t in rows["transactions"]:
        lem = t["time_delivery_start"] // 900 * 900
        money[lem, t["seller_id"]] = money.get((lem, t["seller_id"]), 0) + t["amount_sell"]
        money[lem, t["buyer_id"]] = money.get((lem, t["buyer_id"]), 0) - t["amount_buy"]
    for r in results:
        assert r["auction"] == money.get((r["time_delivery_start"], r["participant_id"]), 0)
        assert r["amount"] + r["auction"] == lem_price(r)
    assert any(r["auction"] != 0 for r in results) and any(r["amount"] != 0 for r in results)

    # Each SLA (2 h, the 11 that ended by the last step) checked once; its penalties are the
    # values that broke their KPI, each paid once to the aggregator.
    assert len(rows["slas"]) == 11 and len(rows["sla_results"]) == 11
    kpis = {(s["id"], k["id"]): k for s in rows["slas"] for k in json.loads(s["kpis"])}

    def breaks(v: dict[str, Any]) -> bool:
        kpi = kpis[v["sla_id"], v["kpi_id"]]
        return bool(v["value"] > kpi["limit"] if kpi["rule"] == "gt" else v["value"] < kpi["limit"])

    broken = {
        (v["sla_id"], v["kpi_id"], v["participant_id"], v["time_interval_start"])
        for v in rows["kpi_values"]
        if breaks(v)
    }
    penalties = [t for t in rows["token_transfers"] if t["kind"] == "sla_penalty"]
    assert {(t["reference"], t["kpi_id"], t["payer_id"], t["time_start"]) for t in penalties} == broken
    assert len(penalties) == len(broken) > 0 and all(t["payee_id"] == ps["AGG"] for t in penalties)
    assert sum(r["penalties"] for r in rows["sla_results"]) == len(penalties)
    assert len(rows["kpi_values"]) == 11 * 2 * 4  # 2 periods x 4 players (2 per KPI) per SLA

    # Tokens are conserved, and the summary says what the ledger holds.
    balances: dict[str, int] = {}
    for t in rows["token_transfers"]:
        balances[t["payer_id"]] = balances.get(t["payer_id"], 0) - t["amount"]
        balances[t["payee_id"]] = balances.get(t["payee_id"], 0) + t["amount"]
    assert sum(balances.values()) == 0 == result.parity.balance_sum
    assert (result.parity.lems, result.parity.slas_checked, result.parity.penalties) == (95, 11, len(penalties))

    # The same seed, the same ledger.
    assert ledger_digest(ledger) == ledger_digest(again) and grid_digest(ledger) == grid_digest(again)


async def test_an_oracle_saves_the_community_s_kpi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An `oracle` in `[parity.agents]` saves the community's import per KPI period: the sum
    of what every prosumer's meter imported in it, as the ledger's readings say."""
    async with service(good) as (url, _asked):
        scenario = community(tmp_path, url, capsys)
        kpi = {"id": "K", "signal": "community_import_wh", "rule": "gt", "limit": 1.0, "penalty": 5, "resolution": 3600}
        ledger = f"sqlite:///{tmp_path / 'oracle.db'}"
        overrides = {"parity.agents.oracle": "ORA", "parity.agents.kpis": [kpi]}
        result = await run_sim(scenario, ledger=ledger, progress=False, days=0.25, overrides=overrides)
    assert result.parity is not None and result.parity.slas_checked == 2  # 00-02 and 02-04 of 6 hours
    values = read_rows(ledger, "kpi_values")
    assert {v["participant_id"] for v in values} == {svc_pseudonym("ORA")} and len(values) == 4  # 2 SLAs x 2 h
    imported: dict[int, int] = {}
    for m in read_rows(ledger, "meters"):
        hour = m["time_interval_start"] // 3600 * 3600
        imported[hour] = imported.get(hour, 0) + json.loads(m["consumption"])["other"].get("external", 0)
    assert {v["time_interval_start"]: v["value"] for v in values} == {
        h: float(imported[h]) for h in sorted(imported)[:4]
    }
    penalties = [t for t in read_rows(ledger, "token_transfers") if t["kind"] == "sla_penalty"]
    assert [t["payer_id"] for t in penalties] == [svc_pseudonym("ORA")] * sum(v["value"] > 1.0 for v in values)
    assert penalties and all(t["amount"] == 5 and t["payee_id"] == svc_pseudonym("AGG") for t in penalties)
