"""`microte report LEDGER_URL [--out DIR]` (controller/run_report): figures and a self-contained
HTML page of a real run, whose numbers are controller.report's Summary; every section of the
seed systems' tables when they have rows; PostgreSQL and `evm+` URLs; bad input refused in
one line with nothing written."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import sqlite3
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from msgspec.structs import replace

from controller.cli import main
from controller.report import Summary, summarize
from controller.run_report import ReportError, report
from controller.run_report.queries import read
from controller.scenario import load_scenario
from controller.sim import SimResult, run_sim
from ledger import DatasetSink, connect, read_rows
from market.core.records import (
    Batch,
    FlexDeliveryRecord,
    FlexRequestRecord,
    FlexTokenRecord,
    GridFlowRecord,
    GridStateRecord,
    LemResultRecord,
    ParityGridState,
    Record,
    SlaRecord,
    SlaResultRecord,
    TokenTransfer,
)

SCENARIO = Path(__file__).parents[2] / "scenarios" / "community.toml"
AUCTION_FIGURES = {"prices.png", "p2p.png", "energy-mix.png", "bills.png", "sufficiency.png"}
PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("Grid states and feeder loading", "Flexibility requests and token moves", "LEM results", "SLA penalties")


def simulate(url: str, **kw: Any) -> SimResult:
    """A small real run: 10 prosumers (batteries, PV, synthetic ones) over half a day, inproc."""
    return asyncio.run(
        run_sim(SCENARIO, ledger=url, participants=10, days=0.5, progress=False, transport="inproc", **kw)
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimResult]:
    path = tmp_path_factory.mktemp("run") / "run.db"
    result = simulate(f"sqlite:///{path}")
    assert result.summary.trades > 0 and result.missing_total == 0
    return path, result


@pytest.fixture(scope="module")
def written(run: tuple[Path, SimResult], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of `run`, in a directory of its own (read, never changed, by the tests)."""
    out = tmp_path_factory.mktemp("report") / "out"
    assert report(f"sqlite:///{run[0]}", out) == (out / "report.html").resolve()
    return out


def copy_ledger(path: Path, to: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        f = path.with_name(path.name + suffix)
        if f.exists():
            shutil.copy2(f, to.with_name(to.name + suffix))
    return to


class Page(HTMLParser):
    """What a test reads off report.html: KPIs, bills, images, sections, references out."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.kpis: dict[str, str] = {}
        self.bills: list[dict[str, str]] = []
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if "data-kpi" in a:
            self.kpis[a["data-kpi"]] = a["data-value"]
        if "data-participant" in a:
            self.bills.append(a)
        if tag == "img":
            self.images.append(a["src"])
        self.links += [a[k] for k in ("href", "src") if k in a and tag != "img"]


def page(out: Path) -> tuple[str, Page]:
    html = (out / "report.html").read_text()
    return html, Page(html)


def assert_kpis_are(p: Page, s: Summary) -> None:
    assert int(p.kpis["trades"]) == s.trades
    for name in ("rounds", "p2p_wh", "imported_wh", "load_wh", "grid_bought_wh", "grid_sold_wh"):
        assert int(p.kpis[name]) == getattr(s, name), name
    assert float(p.kpis["p2p_share"]) == s.p2p_share
    assert float(p.kpis["self_sufficiency"]) == s.self_sufficiency
    assert int(p.kpis["community_saving"]) == sum(b.grid_only - b.market for b in s.bills)
    numbers = ("data-market", "data-grid-only", "data-p2p-bought", "data-p2p-sold")
    bills = [(b["data-participant"], *(int(b[k]) for k in numbers)) for b in p.bills]
    assert bills == [(b.participant, b.market, b.grid_only, b.p2p_bought, b.p2p_sold) for b in s.bills]


def test_the_report_of_a_run_has_its_figures_and_the_summary_numbers(
    run: tuple[Path, SimResult], written: Path
) -> None:
    _, result = run
    assert {f.name for f in written.iterdir()} == AUCTION_FIGURES | {"report.html"}
    html, p = page(written)
    assert_kpis_are(p, result.summary)  # the summary `microte sim` printed, from summarize()
    assert int(p.kpis["participants"]) == 10
    # Self-contained: every figure inline (the same PNG as the file), no script, style sheet or
    # font from anywhere, no link out.
    embedded = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in p.images]
    assert all(src.startswith("data:image/png;base64,") for src in p.images)
    assert sorted(embedded) == sorted((written / f).read_bytes() for f in AUCTION_FIGURES)
    assert all(png.startswith(PNG) for png in embedded)
    assert not p.tags & {"script", "link", "iframe", "object"} and p.links == []
    assert "url(" not in html and "@import" not in html and "http://" not in html and "https://" not in html
    # No flexibility, LEM, SLA or grid rows in a plain auction run: each section says so.
    for title in SECTIONS:
        assert f"{title}: omitted (the ledger's" in html


def test_the_sql_aggregates_are_summarize_of_the_same_rows(run: tuple[Path, SimResult]) -> None:
    path, result = run
    url = f"sqlite:///{path}"
    scenario = load_scenario(SCENARIO)
    with connect(url) as conn:
        data = read(conn)
    rows = read_rows(url, "transactions"), read_rows(url, "meters"), len(read_rows(url, "settlements"))
    expected = summarize(*rows, scenario.grid_tariff, len(read_rows(url, "rounds")), 0.0)
    assert data.summary() == expected
    # Per slot, the energy transactions add up to what the meters say.
    s = data.slots
    assert (s.energy["p2p"] + s.energy["bess_compensation"] + s.energy["grid_buy"] == s.imported).all()
    assert (s.energy["self"] + s.energy["p2p"] + s.energy["bess_compensation"] + s.energy["grid_buy"]
            == s.load + s.charged).all()  # fmt: skip
    assert s.fills.sum() == result.summary.trades and (s.metered[s.metered > 0] == 10).all()


def test_default_out_is_next_to_the_ledger_and_the_cli_prints_the_page(
    run: tuple[Path, SimResult], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = copy_ledger(run[0], tmp_path / "demo.db")
    assert main(["report", f"sqlite:///{ledger}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"report: {(tmp_path / 'demo-report' / 'report.html').resolve()}"]
    assert {f.name for f in (tmp_path / "demo-report").iterdir()} == AUCTION_FIGURES | {"report.html"}


def test_a_ledger_without_the_seed_systems_tables_still_reports(run: tuple[Path, SimResult], tmp_path: Path) -> None:
    """A ledger whose flexibility, Parity and grid tables do not exist at all (an older or a
    foreign writer's) is an auction report with those sections omitted."""
    ledger = copy_ledger(run[0], tmp_path / "old.db")
    with sqlite3.connect(ledger) as db:
        for (name,) in db.execute("select name from sqlite_master where type = 'table'").fetchall():
            if name.startswith(("flex_", "lem", "sla", "kpi_", "token_", "grid_", "balance")):
                db.execute(f'drop table "{name}"')
    report(f"sqlite:///{ledger}", tmp_path / "out")
    html, p = page(tmp_path / "out")
    assert_kpis_are(p, run[1].summary)
    for title in SECTIONS:
        assert f"{title}: omitted" in html


def test_every_section_of_a_ledger_with_grid_flex_lem_and_sla_rows(run: tuple[Path, SimResult], tmp_path: Path) -> None:
    ledger = copy_ledger(run[0], tmp_path / "all.db")
    url = f"sqlite:///{ledger}"
    t0 = read_rows(url, "meters")[0]["time_interval_start"]
    asyncio.run(write(url, seed_system_records(t0)))
    report(url, tmp_path / "out")
    names = {f.name for f in (tmp_path / "out").iterdir()}
    assert names == AUCTION_FIGURES | {"report.html", "grid.png", "flex.png", "lem.png", "sla.png"}
    html, p = page(tmp_path / "out")
    assert '<p class="omitted">' not in html and len(p.images) == 9
    text = re.sub(r"<[^>]+>", " ", html)
    assert "slots RED 1" in " ".join(text.split())  # the DSO's RED slot
    assert "delivery checks met 1 of 2 (50%)" in " ".join(text.split())
    assert "LEM slots solved / skipped (RED) 1 / 1" in " ".join(text.split())
    assert "2 penalty transfers, 0.00" in " ".join(text.split())  # 2 x 1,000 micro
    # A rerun into the same directory on the plain ledger removes the figures it no longer draws.
    report(f"sqlite:///{run[0]}", tmp_path / "out")
    assert {f.name for f in (tmp_path / "out").iterdir()} == AUCTION_FIGURES | {"report.html"}


async def write(url: str, records: list[Record]) -> None:
    sink = DatasetSink(url)
    await sink.start()
    try:
        await sink.write(Batch(tuple(records)))
    finally:
        await sink.close()


def seed_system_records(t0: int) -> list[Record]:
    """A RED slot with power flows, a flexibility request with two delivery checks and their
    tokens, a solved and a skipped LEM with a token transfer, an SLA with two penalties."""
    s1, s2 = t0 + 900, t0 + 1800

    def flow(start: int, kind: str, loading: float) -> GridFlowRecord:
        return GridFlowRecord(
            f"pf{start}.{kind}",
            kind,
            start,
            start + 900,
            "GREEN",
            True,
            0.97,
            1.03,
            loading,
            loading + 5,
            1.5,
            2.0,
            10,
            start,
        )

    def lem(start: int, who: str, amount: int, state: ParityGridState) -> LemResultRecord:
        return LemResultRecord(
            id=f"lr{start}/{who}",
            solve_id=f"s{t0}-{s2 + 900}",
            time_delivery_start=start,
            time_delivery_end=start + 900,
            participant_id=who,
            aggregator_id="AGG",
            grid_state=state,
            skipped=state == "RED",
            consumption=3000,
            production=1000,
            measured="meter",
            total_consumption=6000,
            total_production=2000,
            p_buy=0.21,
            p_sell=0.09,
            beta=0.025,
            amount=amount,
            time_creation=s2 + 960,
        )

    return [
        GridStateRecord(f"g{s1}.0", s1, s1 + 900, "RED", 0, "DSO", t0),
        *(flow(s, kind, 40.0 + i) for i, s in enumerate((t0, s1, s2)) for kind in ("forecast", "metered")),
        FlexRequestRecord("fr1", "DSO", "AGG", None, -2000, s1, s1 + 900, "fair", 3, 2, 1500, 500, None, t0),
        FlexDeliveryRecord("fr1.H01", "fr1", "H01", True, 0, 400, 100, 300, 290, True, 15_000, 0, s1 + 900),
        FlexDeliveryRecord("fr1.H02", "fr1", "H02", True, 0, 100, 100, 300, 20, False, 0, 4_000, s1 + 900),
        FlexTokenRecord("fr1.H01.reward", "fr1", "AGG", "H01", 15_000, "reward", s1 + 900),
        FlexTokenRecord("fr1.H02.penalty", "fr1", "H02", "AGG", 4_000, "penalty", s1 + 900),
        lem(s1, "H01", -120_000, "GREEN"),
        lem(s1, "H02", 80_000, "GREEN"),
        lem(s2, "H01", 0, "RED"),
        TokenTransfer(f"t/s{t0}/H01/AGG", "lem", "H01", "AGG", 120_000, f"s{t0}", None, s1, s2 + 900, s2 + 960),
        SlaRecord("sla1", "AGG", t0, s2 + 900, '[{"id":"K1","players":["H01","H02"]}]', t0),
        SlaResultRecord("sla1", 2, 2_000, "OP", s2 + 1000),
        *(
            TokenTransfer(f"p/sla1/K1/{who}/{s1}", "sla_penalty", who, "AGG", 1_000, "sla1", "K1", s1, s2, s2 + 1000)
            for who in ("H01", "H02")
        ),
    ]


def test_a_postgresql_ledger_reports_the_same(
    pg_url: str, run: tuple[Path, SimResult], written: Path, tmp_path: Path
) -> None:
    """The same run on PostgreSQL (collating en-US, not in byte order) gives the same page
    numbers as on SQLite, and the same figures."""
    result = simulate(pg_url)
    assert replace(result.summary, seconds=0) == replace(run[1].summary, seconds=0)
    assert main(["report", pg_url, "--out", str(tmp_path / "pg")]) == 0
    _, p = page(tmp_path / "pg")
    assert_kpis_are(p, run[1].summary)
    assert {f.name: f.read_bytes() for f in (tmp_path / "pg").glob("*.png")} == {
        f.name: f.read_bytes() for f in written.glob("*.png")
    }


def test_an_evm_ledger_url_is_read_from_its_database(run: tuple[Path, SimResult], tmp_path: Path) -> None:
    """A chain ledger's rows are in its database: `evm+DATABASE_URL` (chain options and all)
    reports that database, without opening the chain."""
    report(f"evm+sqlite:///{run[0]}?evm_state=memory", tmp_path / "out")
    _, p = page(tmp_path / "out")
    assert_kpis_are(p, run[1].summary)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    assert main(["report", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("microte report: ") and all(w in err for w in words), err
    return err


def test_bad_input_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, run: tuple[Path, SimResult], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "missing.db"
    _refused([f"sqlite:///{missing}", "--out", str(out)], capsys, "no ledger database at", str(missing))
    assert not missing.exists()  # not created by reading it
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    _refused([f"sqlite:///{empty}", "--out", str(out)], capsys, "not a microte ledger")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("create table things (id integer primary key, name text)")
        db.execute("insert into things values (1, 'a')")
    _refused([f"sqlite:///{foreign}", "--out", str(out)], capsys, "not a microte ledger")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database file at all" * 100)
    _refused([f"sqlite:///{junk}", "--out", str(out)], capsys, "file is not a database")
    blank = tmp_path / "blank.db"
    asyncio.run(write(f"sqlite:///{blank}", []))  # every table created, no row
    _refused([f"sqlite:///{blank}", "--out", str(out)], capsys, "an empty ledger")
    _refused(["memory:", "--out", str(out)], capsys, "memory:")
    _refused(["nonsense", "--out", str(out)], capsys)
    assert not out.exists()
    # An --out that cannot be a directory: a file, or a path under a file.
    good = f"sqlite:///{run[0]}"
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refused([good, "--out", str(afile)], capsys, "not a directory")
    _refused([good, "--out", str(afile / "sub")], capsys, "not a directory")
    assert afile.read_text() == "x"
    assert {p.name for p in tmp_path.iterdir()} == {"empty.db", "foreign.db", "junk.db", "blank.db", "afile"}
    with pytest.raises(ReportError, match="not a directory"):
        report(good, afile)


def test_a_postgresql_database_that_does_not_exist(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    _refused([gone, "--out", str(tmp_path / "out")], capsys, "no_such_database")
    _refused([pg_url, "--out", str(tmp_path / "out")], capsys, "not a microte ledger")  # a new, empty database
    assert not (tmp_path / "out").exists()
