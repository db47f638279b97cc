"""A district over sockets (controller/district_socket.py, docs/hierarchy.md): three
community markets and the district market as separate `microte market` processes, their
members as socket.io clients, the controller stepping them in lockstep.

The ledgers equal the in-process run's, market by market (same seed, however placed); on a
real PostgreSQL server all four markets share one database (a schema each); a community
killed with SIGKILL mid-round and started again rejoins, and the ledgers are still exactly
those of the uninterrupted run: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from controller.district_socket import DistrictRunner, run_district_socket
from controller.hierarchy import run_district
from ledger import ledger_digest, read_rows
from ledger.markets import market_url
from market.core.hierarchy import UPSTREAM_ID

DISTRICT = Path(__file__).parents[2] / "scenarios" / "district"
MARKETS = ("sunny", "town", "windy", "district")


def half_day(tmp_path: Path) -> Path:
    for f in DISTRICT.glob("*.toml"):
        (tmp_path / f.name).write_text(f.read_text().replace("days = 1\n", "days = 0.5\n"))
    return tmp_path / "district.toml"


def digests(urls: dict[str, str]) -> dict[str, str]:
    return {m: ledger_digest(u) for m, u in urls.items()}


@pytest.fixture(scope="module")
def inproc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("inproc")
    _run, urls, _ = asyncio.run(run_district(half_day(tmp), f"sqlite:///{tmp}/{{market}}.db"))
    return digests(urls)


async def test_sockets_give_the_in_process_ledgers(tmp_path: Path, inproc: dict[str, str]) -> None:
    urls = await run_district_socket(half_day(tmp_path), f"sqlite:///{tmp_path}/{{market}}.db")
    assert set(urls) == set(MARKETS)
    assert digests(urls) == inproc
    assert read_rows(urls["district"], "settlements")  # the district traded


async def test_one_postgresql_database_and_a_killed_community(
    tmp_path: Path, pg_url: str, inproc: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = half_day(tmp_path)
    killed: list[int] = []

    async def kill_town(runner: DistrictRunner, k: int, market: str) -> None:
        if k == 9 and market == "town":  # round 10: after it stepped, before its residuals, flows and fills
            await runner.restart("town")
            killed.append(k)

    urls = await run_district_socket(path, pg_url, between=kill_town)
    assert killed
    assert urls == {m: market_url(pg_url, m) for m in MARKETS}  # one database, a schema per market
    assert digests(urls) == inproc
    town = read_rows(urls["town"], "settlements")
    assert len({s["commit_id"] for s in town}) == len(town)
    rounds = Counter(r["current_round_start"] for r in read_rows(urls["town"], "rounds"))
    assert max(rounds.values()) == 1  # every slot processed once
    # Across levels, from this run's own ledgers: each district fill is one upstream
    # settlement below (quantity and amount), and each reading above what flowed below.
    district = read_rows(urls["district"], "settlements")
    above = {(m["participant_id"], m["time_interval_start"]): m for m in read_rows(urls["district"], "meters")}
    assert district
    for c in ("sunny", "town", "windy"):
        below = read_rows(urls[c], "settlements")
        for side, mine, theirs in (("buy", "seller_id", "buyer_id"), ("sell", "buyer_id", "seller_id")):
            assert Counter(
                (s["time_delivery_start"], s["quantity"], s[f"amount_{side}"]) for s in below if s[mine] == UPSTREAM_ID
            ) == Counter(
                (s["time_delivery_start"], s["quantity"], s[f"amount_{side}"]) for s in district if s[theirs] == c
            )
        flowed: Counter[int] = Counter()
        for t in read_rows(urls[c], "transactions"):
            if t["kind"] in ("p2p", "bess_compensation") and t["seller_id"] == UPSTREAM_ID:
                flowed[t["time_delivery_start"]] += t["quantity"]
        for (pid, start), m in above.items():
            if pid == c:
                assert json.loads(m["consumption"])["other"].get("external", 0) == flowed[start]
    # One digest per market, and one over all, from the database alone; a schema whose name
    # would smuggle connection parameters into a market's URL is nobody's market.
    from controller import cli
    from tests.pg import connect

    with connect(pg_url, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "m_x&host=evil.example&sslmode=disable"')

    assert cli.main(["ledger", "digest", pg_url, "--markets"]) == 0
    lines = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert {k: v for k, v in lines.items() if k != "all"} == {f"m_{m}": inproc[m] for m in MARKETS}
    # A report per market and an index over them, from the database alone.
    assert cli.main(["report", pg_url, "--markets", "--out", str(tmp_path / "reports")]) == 0
    index = (tmp_path / "reports" / "index.html").read_text()
    assert all((tmp_path / "reports" / m / "report.html").exists() and f'href="{m}/' in index for m in MARKETS)
    assert "SECRET" not in index and "password" not in index


def test_microte_sim_runs_a_district(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inproc: dict[str, str]
) -> None:
    from controller import cli

    path = half_day(tmp_path)
    assert cli.main(["sim", str(path), "--ledger", f"sqlite:///{tmp_path}/run.db", "--transport", "inproc"]) == 0
    out = capsys.readouterr().out
    assert all(f"run-{m}.db" in out for m in MARKETS), out
    assert digests({m: f"sqlite:///{tmp_path}/run-{m}.db" for m in MARKETS}) == inproc
    assert cli.main(["sim", str(path), "--participants", "5"]) == 2
    assert "not for a district" in capsys.readouterr().err


async def test_a_city_over_sockets_gives_the_in_process_ledgers(tmp_path: Path) -> None:
    """Three levels as processes: city -> (north: the district of three communities, farms):
    the city's fills reach north's communities through north, level by level, and every
    market's ledger equals the in-process run's."""
    half_day(tmp_path)
    farms = (tmp_path / "windy.toml").read_text().replace('name = "windy"', 'name = "farms"')
    (tmp_path / "farms.toml").write_text(farms)
    city = (tmp_path / "district.toml").read_text().replace('name = "district"', 'name = "city"')
    city = city.split("[[communities]]")[0]
    for cid, file in (("north", "district.toml"), ("farms", "farms.toml")):
        city += f'[[communities]]\nid = "{cid}"\nscenario = "{file}"\n\n'
    (tmp_path / "city.toml").write_text(city)
    _run, inproc, _ = await run_district(tmp_path / "city.toml", f"sqlite:///{tmp_path}/in-{{market}}.db")
    sockets = await run_district_socket(tmp_path / "city.toml", f"sqlite:///{tmp_path}/so-{{market}}.db")
    assert set(sockets) == {"city", "north", "farms", "sunny", "town", "windy"}
    assert digests(sockets) == digests(inproc)
    refs = [
        s["ask_uuid"] if s["seller_id"] == UPSTREAM_ID else s["bid_uuid"]
        for c in ("sunny", "town", "windy")
        for s in read_rows(sockets[c], "settlements")
        if UPSTREAM_ID in (s["seller_id"], s["buyer_id"])
    ]
    assert any(r.startswith("u") for r in refs)  # fills that came from the city, through north
