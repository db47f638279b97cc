"""`microte report LEDGER_URL [--out DIR]`: figures and one self-contained HTML page of a run,
from its ledger alone (docs/report.md).

The ledger URL is any database ledger URL `microte ledger digest` takes (`sqlite:///...`,
`postgresql://...`, a chain ledger's `evm+...`, whose rows are in its database), opened by
`ledger.connect`. The default DIR is next to the ledger: `microte-demo-report/` beside
`microte-demo.db`; for PostgreSQL, `DATABASE-report/` in the working directory.

Everything is read and drawn before anything is written: a ledger that cannot be read, an
empty or foreign database, or a DIR that cannot be a directory is one line on stderr,
exit code 2, and no file written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa

import ledger
from controller.report import Summary
from controller.run_report import queries
from controller.run_report.queries import LedgerData

HTML = "report.html"
# Every file a report may write: a rerun into the same DIR removes those it does not write again.
FILES = (
    HTML,
    "prices.png",
    "p2p.png",
    "energy-mix.png",
    "bills.png",
    "sufficiency.png",
    "grid.png",
    "flex.png",
    "lem.png",
    "sla.png",
)


class ReportError(Exception):
    """Bad input: said in one line, nothing written."""


def default_out(url: str) -> Path:
    """`NAME-report/` next to a SQLite ledger `NAME.db`; `DATABASE-report/` (in the working
    directory) for a PostgreSQL one."""
    db = sa.make_url(ledger.db_url(url))
    if db.get_backend_name() == "sqlite" and db.database:
        path = Path(db.database)
        return path.with_name(f"{path.stem}-report")
    return Path(f"{db.database or 'ledger'}-report")


def _name(url: str) -> str:
    """The ledger's file stem or database name."""
    database = sa.make_url(ledger.db_url(url)).database or "ledger"
    return Path(database).stem if database.endswith(".db") else database


def shown_url(url: str) -> str:
    """The ledger URL with its password hidden."""
    prefix = "evm+" if url.lower().startswith("evm+") else ""
    with contextlib.suppress(sa.exc.ArgumentError):
        return prefix + sa.make_url(url[len(prefix) :]).render_as_string(hide_password=True)
    return url


def _check_out(out: Path) -> None:
    """Refuse a DIR that cannot become a directory we write in (before reading the ledger)."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ReportError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ReportError(f"--out {out}: {parent} is not writable")


def _timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _notes(data: LedgerData) -> list[str]:
    notes = []
    if data.run.tariffs_differ:
        notes.append(
            f"The grid tariff changed between the ledger's {data.run.runs} market starts: grid prices and "
            "grid-only bills use the last one."
        )
    if data.run.tariff is None and data.has_market:
        notes.append(
            "The ledger has no runs row, so no grid tariff: grid prices are those its grid transactions were "
            "booked at, and grid-only bills are not computed."
        )
    return notes


def figures(data: LedgerData, tz: ZoneInfo) -> dict[str, bytes]:
    """Every figure the ledger has data for, by file name."""
    from controller.run_report import figures as fig

    out: dict[str, bytes] = {}
    states = None
    if data.grid is not None and data.grid.states:  # the DSO's state of each auction slot
        by_start = {r.start: r.state for r in data.grid.rows}
        states = [by_start.get(int(s), "GREEN") for s in data.slots.start]
    if data.has_market:
        out["prices.png"] = fig.prices(data.slots, tz, states)
        out["p2p.png"] = fig.p2p(data.slots, tz)
        out["energy-mix.png"] = fig.energy_mix(data.slots, tz)
        if len(data.bills):
            out["bills.png"] = fig.bills(data.bills)
        out["sufficiency.png"] = fig.sufficiency(data.slots, tz)
    if data.grid is not None and data.grid.flows and data.grid.rows:
        out["grid.png"] = fig.grid(data.grid, tz)
    if data.flex is not None:
        out["flex.png"] = fig.flex(data.flex, tz)
    if data.lems is not None:
        out["lem.png"] = fig.lems(data.lems, tz)
    if data.slas is not None and data.slas.kpis:
        out["sla.png"] = fig.slas(data.slas)
    return out


def read(url: str) -> LedgerData:
    """The ledger's aggregates (queries.py), or ReportError saying in one line why not."""
    try:
        with ledger.connect(url) as conn:
            return queries.read(conn)
    except sa.exc.DBAPIError as exc:
        raise ReportError(_about(url, exc.orig)) from None
    except (queries.NotALedger, FileNotFoundError, ValueError, sa.exc.SQLAlchemyError) as exc:
        raise ReportError(_about(url, exc)) from None


def _about(url: str, exc: BaseException | None) -> str:
    """One line: the URL (password hidden), unless the message names it, and the first line
    of the error."""
    text = str(exc).strip() if exc is not None else ""
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line if repr(url) in line else f"{shown_url(url)}: {line}"


def _write(out: Path, files: dict[str, bytes]) -> None:
    """Each file written whole (a temporary name, then renamed); on a failure the files of
    this report are removed again, and DIR if this call created it."""
    created = not out.exists()
    written: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            path, tmp = out / name, out / f".{name}.tmp"
            tmp.write_bytes(content)
            written.append(tmp)
            tmp.replace(path)
            written[-1] = path
        for stale in sorted(set(FILES) - set(files)):
            (out / stale).unlink(missing_ok=True)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise ReportError(f"--out {out}: {exc.strerror or exc}") from None


def report(url: str, out: str | Path | None = None) -> Path:
    """Write the figures and report.html of the ledger at `url` into `out`; returns the
    page's path. Raises ReportError on bad input, having written nothing."""
    from controller.run_report import page

    if out is not None:
        target = Path(out)
    else:
        try:
            target = default_out(url)
        except (ValueError, sa.exc.ArgumentError):
            read(url)  # not a database ledger URL: says why (a memory: ledger, a typo)
            raise ReportError(f"{shown_url(url)}: give --out (no default directory for this URL)") from None
    _check_out(target)
    data = read(url)
    tz = _timezone(data.run.timezone)
    summary: Summary = data.summary()
    files = figures(data, tz)
    html = page.render(data, summary, files, ledger=shown_url(url), tz=tz, notes=_notes(data), name=_name(url))
    _write(target, {HTML: html.encode("utf-8"), **files})
    return (target / HTML).resolve()


def report_markets(url: str, out: str | Path | None = None) -> Path:
    """Every market of a PostgreSQL database with a schema per market (docs/hierarchy.md): a
    report per market in `out/<market>/` and `out/index.html` linking them, with each
    market's energy traded locally, through its upstream account, and with the grid."""
    import html

    from controller.run_report.district import summary
    from ledger.markets import market_url, markets_in

    try:
        schemas = markets_in(ledger.db_url(url))
    except sa.exc.SQLAlchemyError as exc:
        raise ReportError(f"{shown_url(url)}: {exc.__class__.__name__}") from None
    if not schemas:
        raise ReportError(f"{shown_url(url)}: no market schemas (m_...) in this database")
    target = Path(out) if out is not None else default_out(url)
    urls = {m.removeprefix("m_"): market_url(url, m.removeprefix("m_")) for m in schemas}
    pages = {m: report(u, target / m) for m, u in urls.items()}  # each checks its own ledger first
    rows = "".join(f'<li><a href="{html.escape(m)}/{HTML}">{html.escape(m)}</a></li>' for m in pages)
    table = html.escape("\n".join(line.rsplit("  ", 1)[0] for line in summary(urls)))
    index = (
        f"<!doctype html><meta charset=utf-8><title>markets</title><h1>Markets</h1><ul>{rows}</ul><pre>{table}</pre>"
    )
    (target / "index.html").write_text(index)
    return (target / "index.html").resolve()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ledger", help="ledger URL (sqlite:///file, postgresql://..., evm+sqlite:///...)")
    p.add_argument(
        "--out",
        help="output directory (default: NAME-report/ next to a SQLite ledger NAME.db; "
        "DATABASE-report/ here for PostgreSQL)",
    )
    p.add_argument(
        "--markets",
        action="store_true",
        help="every market of a PostgreSQL database with a schema each (docs/hierarchy.md): a report per market "
        "and an index page",
    )


def main(args: argparse.Namespace) -> int:
    try:
        path = report_markets(args.ledger, args.out) if args.markets else report(args.ledger, args.out)
    except ReportError as exc:
        print(f"microte report: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0
