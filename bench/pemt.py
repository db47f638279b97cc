"""PEM against plain thermostats through the market (issue 18's "Done when"; docs/pem.md).

`microte init pemt --houses 30` twice (`--mode thermostat`, `--mode pem`), each run by
`microte sim` over sockets with the DSO agent on the feeder, the same seed; the figures
are read back from each ledger (controller/pem_view.py) and printed side by side.

    python bench/pemt.py [--houses 30] [--out DIR] [--plots DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tomli_w

import ledger
from controller import init_pemt, pem_view
from controller.sim import run_sim


def run(houses: int, mode: str, out: Path, plots: Path | None) -> pem_view.PemRun:
    d = out / mode
    d.mkdir(parents=True, exist_ok=True)
    (d / "scenario.toml").write_text(tomli_w.dumps(init_pemt.scenario(houses, mode, 4, 1.0)))
    url = f"sqlite:///{d / 'ledger.db'}"
    asyncio.run(run_sim(d / "scenario.toml", ledger=url))
    with ledger.connect(url) as conn:
        slots = pem_view.read_pem(conn)
        result = pem_view.summarize_pem(conn, slots)
        houses = pem_view.read_houses(conn, result.site)
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        title = f"{houses} houses, Greensboro 2023-07-10, {mode}"
        pem_view.plot_pem(slots, plots / f"pemt-{mode}.png", houses=houses, timezone="America/New_York", title=title)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--houses", type=int, default=30)
    p.add_argument("--out", type=Path, help="keep the scenarios and ledgers here")
    p.add_argument("--plots", type=Path, help="write pemt-thermostat.png and pemt-pem.png here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        results = [run(args.houses, mode, out, args.plots) for mode in ("thermostat", "pem")]
    cap = init_pemt.KW_PER_HOUSE * args.houses
    print(f"{args.houses} houses, capacity {cap:.1f} kW, 96 slots of 15 min, 60 s device steps\n")
    print(
        "| run | peak feeder kW (slot avg) | slots over capacity | minutes HVAC over target | K.h above band "
        "| K.h below band | max K outside | HVAC kWh | paid by PEM1 | packets requested / accepted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.mode} | {r.peak_feeder_kw:.1f} | {r.slots_over} | {r.steps_over_target} | {r.kh_above:.2f} "
            f"| {r.kh_below:.2f} | {r.max_excursion_k:.2f} | {r.hvac_kwh:.0f} | {r.paid:.2f} "
            f"| {r.requested} / {r.accepted} |"
        )


if __name__ == "__main__":
    main()
