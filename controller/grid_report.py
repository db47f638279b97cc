"""`microte grid-report LEDGER --out DIR`: voltage and loading per slot next to P2P volume
and prices, from a ledger with DSO power flows (table `grid_flows`, docs/grid.md).

Writes `DIR/grid.png` (four panels sharing the time axis, each slot shaded by the DSO's
state) and `DIR/grid_slots.csv` (the same numbers per slot); the rows and the figure are
`controller.grid_view`'s.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from controller.grid_view import SlotRow, plot


def write_csv(rows: list[SlotRow], path: Path) -> None:
    fields = list(SlotRow.__struct_fields__)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for r in rows:
            w.writerow(["" if (v := getattr(r, f)) is None else v for f in fields])


def report(ledger: str, out: str | Path, *, scenario: str | None = None) -> list[Path]:
    """Read the ledger, write the PNG and the CSV; returns their paths. The fills and prices
    are summed per slot in SQL (`controller.run_report.queries`), so a ledger of any size
    is read in bounded memory: the power flows and grid states are one row per slot."""
    import ledger as ledgers
    from controller.run_report.queries import NotALedger, present_tables, read_grid, read_run, read_slots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with ledgers.connect(ledger) as conn:
        try:
            present = present_tables(conn)
        except NotALedger as err:
            raise SystemExit(f"{ledger}: {err}") from None
        run = read_run(conn, present)
        grid = read_grid(conn, present, read_slots(conn, present, run)[0])
    rows = grid.rows if grid is not None else []
    if not rows:
        raise SystemExit(f"{ledger}: no grid flows, grid states or settlements to report")
    thresholds, timezone = None, run.timezone
    if scenario is not None:
        from controller.scenario import load_scenario

        sc = load_scenario(scenario)
        thresholds = sc.feeder.thresholds if sc.feeder else None
        timezone = sc.timezone
    png, table = out / "grid.png", out / "grid_slots.csv"
    plot(rows, png, thresholds=thresholds, timezone=timezone)
    write_csv(rows, table)
    return [png, table, *_pem_report(ledger, out, present, timezone)]


def _pem_report(ledger: str, out: Path, present: set[str], timezone: str) -> list[Path]:
    """A PEM site's figure and table (docs/pem.md), when the ledger has one."""
    import ledger as ledgers
    from controller import pem_view

    if "pem_slots" not in present:
        return []
    with ledgers.connect(ledger) as conn:
        slots = pem_view.read_pem(conn)
        if not slots:
            return []
        run = pem_view.summarize_pem(conn, slots)
        houses = pem_view.read_houses(conn, run.site)
    png, table = out / "pem.png", out / "pem_slots.csv"
    pem_view.plot_pem(
        slots, png, houses=houses, timezone=timezone, title=f"{run.site} ({run.mode}, {run.houses} houses)"
    )
    pem_view.write_csv(slots, table)
    return [png, table]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ledger", help="ledger URL (sqlite:///file, postgresql://...)")
    p.add_argument("--out", default="grid-report", help="output directory")
    p.add_argument("--scenario", help="scenario TOML: thresholds and time zone (default: the ledger's run)")


def main(args: argparse.Namespace) -> int:
    for path in report(args.ledger, args.out, scenario=args.scenario):
        print(path)
    return 0
