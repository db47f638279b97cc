"""`microte report` on a large ledger: 1,000 participants over one day (96 slots).

    python bench/report.py [--participants 1000] [--days 1] [--repeat 3] [--fresh]

The ledger is built once with `microte sim --transport inproc` (the fastest way to a real
ledger) and cached in the temporary directory (`microte-bench-report/`, keyed by the
participants, days and scenario); `--fresh` builds it again. Then `microte report` runs as a
subprocess (interpreter start, imports, the queries, the figures and the page: what a user
waits for), `--repeat` times, and once more in this process with the time split by part.

Goal (#21): under 10 s. Prints a markdown table; never asserts (DESIGN.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench")]

from controller.run_report import command, page  # noqa: E402
from controller.run_report import queries as q  # noqa: E402
from controller.sim import run_sim  # noqa: E402
from ledger import connect  # noqa: E402

SCENARIO = _ROOT / "scenarios" / "community.toml"
GOAL = 10.0


def ledger(participants: int, days: float, fresh: bool) -> tuple[Path, float | None]:
    """The cached ledger's path, and the seconds it took to build (None: from the cache)."""
    key = hashlib.sha256(f"{participants}/{days}/".encode() + SCENARIO.read_bytes()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / "microte-bench-report" / f"n{participants}-d{days:g}-{key}.db"
    if path.exists() and not fresh:
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    asyncio.run(
        run_sim(
            SCENARIO,
            ledger=f"sqlite:///{path}",
            participants=participants,
            days=days,
            progress=False,
            transport="inproc",
        )
    )
    return path, time.perf_counter() - t0


def in_process(url: str, out: Path) -> dict[str, float]:
    """One report in this process, timed by part."""
    parts: dict[str, float] = {}
    t0 = time.perf_counter()
    with connect(url) as conn:
        data = q.read(conn)
    t1 = time.perf_counter()
    parts["queries (GROUP BY slot / participant; meters streamed)"] = t1 - t0
    tz = command._timezone(data.run.timezone)
    files = command.figures(data, tz)
    t2 = time.perf_counter()
    parts["figures (matplotlib, Agg)"] = t2 - t1
    html = page.render(data, data.summary(), files, ledger=url, tz=tz)
    command._write(out, {command.HTML: html.encode(), **files})
    parts["page and files"] = time.perf_counter() - t2
    return parts


def rows(url: str) -> dict[str, int]:
    import sqlalchemy as sa

    with connect(url) as conn:
        return {
            t: int(conn.execute(sa.text(f"select count(*) from {t}")).scalar_one())
            for t in ("transactions", "settlements", "meters")
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--participants", type=int, default=1000)
    ap.add_argument("--days", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fresh", action="store_true", help="build the ledger again")
    args = ap.parse_args()
    path, built = ledger(args.participants, args.days, args.fresh)
    url = f"sqlite:///{path}"
    counts = rows(url)
    microte = Path(sys.executable).with_name("microte")
    argv = [str(microte)] if microte.exists() else [sys.executable, "-m", "controller"]
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            t0 = time.perf_counter()
            subprocess.run([*argv, "report", url, "--out", f"{tmp}/r{i}"], check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        parts = in_process(url, Path(tmp) / "inproc")
        sizes = {f.name: f.stat().st_size for f in sorted((Path(tmp) / "r0").iterdir())}
    best, median = min(times), statistics.median(times)
    listed = ", ".join(f"{n:,} {t}" for t, n in counts.items())
    print(f"ledger: {path} ({path.stat().st_size / 2**20:.0f} MiB; {listed})")
    print(f"  built in {built:.1f} s" if built is not None else "  (cached; --fresh builds it again)")
    print(f"machine: {os.cpu_count()} cores, shared with other work; Python {sys.version.split()[0]}\n")
    print("| what | seconds |")
    print("|---|---|")
    print(
        f"| `microte report` ({args.participants:,} participants, {args.days:g} day), "
        f"best / median of {args.repeat} | **{best:.2f}** / {median:.2f} |"
    )
    for part, s in parts.items():
        print(f"| in process: {part} | {s:.2f} |")
    print(f"| in process: total | {sum(parts.values()):.2f} |")
    verdict = "met" if median < GOAL else "MISSED"
    print(f"\ngoal < {GOAL:.0f} s: {verdict}; files: " + ", ".join(f"{n} {s // 1024} KiB" for n, s in sizes.items()))


if __name__ == "__main__":
    main()
