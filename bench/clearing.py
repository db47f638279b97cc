"""Clearing and exchange cost of the market core (no sockets, no ledger).

    python bench/clearing.py [--reps 300] [--big 1000000] [--no-big-clear] [--participants 1000] [--write]

1. a 2 x 1,000-order slot through `market.clearing.clear` (mean of `--reps` clears);
2. a `--big`-order slot (half bids, half asks) through the numpy kernel `match_sorted`,
   including the sort of both sides from unsorted arrays (`priority_order`; the three-key
   `np.lexsort` it replaced is timed too), and through `clear()` end to end on `Entry` objects;
3. a `--participants` engine round: submit, open_round (clearing), meters, process (exchange).

Prints figures; never asserts (DESIGN.md: benchmarks are not tests). `--write` puts them
into docs/benchmarks-clearing.md between markers, keeping the rest of the file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path: put the project root there.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench")]

import numpy as np  # noqa: E402

from market.core.book import Entry, ask_order, bid_order, tie_key  # noqa: E402
from market.core.clearing import Fill, clear, match_sorted, priority_order  # noqa: E402
from market.core.engine import Market, MarketConfig  # noqa: E402
from market.core.protocol import ConsumptionMsg, EntryMsg, MeterMsg  # noqa: E402

DOC = _ROOT / "docs" / "benchmarks-clearing.md"
BEGIN, END = "<!-- bench/clearing.py:begin -->", "<!-- bench/clearing.py:end -->"
SOURCES = ("solar", "wind", "bess")


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT, capture_output=True, text=True
        ).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "none yet"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "commit": commit,
    }


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall s, CPU s, result) of one call, with the garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - w, time.process_time() - c, out
    finally:
        gc.enable()


# -- 1. a 2 x 1,000-order slot -------------------------------------------------------------


def small_book(n: int, sourced_share: float, seed: int) -> tuple[list[Entry], list[Entry]]:
    """n bids and n asks of 200 prosumers; prices to 3 decimals (many ties), most orders cross."""
    rng = random.Random(seed)

    def entry(side: str, k: int, price: float, source: str | None) -> Entry:
        uuid = f"p{rng.randrange(200)}.{side}{k}"
        return Entry(
            uuid=uuid,
            id=None,
            participant=uuid.split(".")[0],
            side="bid" if side == "b" else "ask",
            quantity=rng.randint(50, 2000),
            price=price,
            time_delivery=(0, 900),
            source=source,
            time_submission=rng.choice((0, 900, 1800)),
            tie=tie_key(uuid),
        )

    bids = [
        entry("b", k, round(rng.uniform(0.08, 0.20), 3), rng.choice(SOURCES) if rng.random() < sourced_share else None)
        for k in range(n)
    ]
    asks = [entry("a", k, round(rng.uniform(0.05, 0.17), 3), rng.choice(SOURCES)) for k in range(n)]
    # The book hands a slot's entries over in submission order.
    return sorted(bids, key=lambda e: e.time_submission), sorted(asks, key=lambda e: e.time_submission)


def bench_small(reps: int) -> list[dict[str, Any]]:
    out = []
    cases = []
    for label, share in (("bids without source", 0.0), ("30 % of bids name a source", 0.3)):
        bids, asks = small_book(1000, share, seed=1)
        cases.append((f"{label}, unsorted (`clear()` sorts)", bids, asks, False))
        # The engine's path: the book keeps each side ranked as entries arrive (Book.pop_slot).
        ranked_b, ranked_a = sorted(bids, key=bid_order), sorted(asks, key=ask_order)
        cases.append((f"{label}, ranked by the book (`ranked=True`)", ranked_b, ranked_a, True))
    for label, bids, asks, ranked in cases:
        fills = clear(bids, asks, ranked=ranked)
        walls, cpus = [], []
        for _ in range(reps):
            w, c, _ = timed(lambda b=bids, a=asks, r=ranked: clear(b, a, ranked=r))  # type: ignore[misc]
            walls.append(w)
            cpus.append(c)
        mean = statistics.fmean(walls)
        out.append(
            {
                "book": label,
                "orders": len(bids) + len(asks),
                "fills": len(fills),
                "reps": reps,
                "mean_ms": mean * 1e3,
                "median_ms": statistics.median(walls) * 1e3,
                "min_ms": min(walls) * 1e3,
                "cpu_mean_ms": statistics.fmean(cpus) * 1e3,
                "orders_per_s": (len(bids) + len(asks)) / mean,
            }
        )
        print(
            f"2x1000 ({label}): {len(fills)} fills; per clear mean {mean * 1e3:.3f} ms, "
            f"median {statistics.median(walls) * 1e3:.3f} ms, min {min(walls) * 1e3:.3f} ms, "
            f"CPU {statistics.fmean(cpus) * 1e3:.3f} ms; {(len(bids) + len(asks)) / mean:,.0f} orders/s"
        )
    return out


# -- 2. a 1,000,000-order slot --------------------------------------------------------------


def big_arrays(n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    half = n // 2
    return {
        "bid_price": np.round(rng.uniform(0.08, 0.20, half), 4),
        "ask_price": np.round(rng.uniform(0.05, 0.17, half), 4),
        "bid_qty": rng.integers(50, 2000, half, dtype=np.int64),
        "ask_qty": rng.integers(50, 2000, half, dtype=np.int64),
        "bid_time": rng.integers(0, 4, half, dtype=np.int64) * 900,
        "ask_time": rng.integers(0, 4, half, dtype=np.int64) * 900,
        "bid_tie": rng.integers(0, 2**63, half, dtype=np.int64).astype(np.uint64),
        "ask_tie": rng.integers(0, 2**63, half, dtype=np.int64).astype(np.uint64),
    }


def sort_sides(x: dict[str, Any]) -> tuple[Any, Any]:
    """Both sides in the order `clear` sorts entries (price, then submission time, then tie key)."""
    bo = priority_order(x["bid_price"], x["bid_time"], x["bid_tie"], descending=True)
    ao = priority_order(x["ask_price"], x["ask_time"], x["ask_tie"], descending=False)
    return bo, ao


def lexsort_sides(x: dict[str, Any]) -> tuple[Any, Any]:
    """The same order by a three-key `np.lexsort` (the kernel's sort before `priority_order`)."""
    bo = np.lexsort((x["bid_tie"], x["bid_time"], -x["bid_price"]))
    ao = np.lexsort((x["ask_tie"], x["ask_time"], x["ask_price"]))
    return bo, ao


def kernel(x: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any]:
    """Sort both sides from unsorted arrays and merge."""
    bo, ao = sort_sides(x)
    bi, ai, q = match_sorted(x["bid_price"][bo], x["bid_qty"][bo], x["ask_price"][ao], x["ask_qty"][ao])
    return bo, ao, bi, ai, q


def big_entries(x: dict[str, Any]) -> tuple[list[Entry], list[Entry]]:
    """The same orders as `Entry` objects, each of its own participant (no self-pairs), so
    that `clear` and the kernel must give the same fills."""

    def side(kind: str, s: str) -> list[Entry]:
        price, qty, t, tie = (x[f"{s}_{k}"].tolist() for k in ("price", "qty", "time", "tie"))
        return [
            Entry(
                f"{s}{k}",
                None,
                f"{s}{k}",
                kind,  # type: ignore[arg-type]
                qty[k],
                price[k],
                (0, 900),
                "solar" if kind == "ask" else None,
                t[k],
                tie[k],
            )
            for k in range(len(price))
        ]

    return side("bid", "bid"), side("ask", "ask")


def bench_big(n: int, with_clear: bool) -> dict[str, Any]:
    x = big_arrays(n, seed=2)
    kernel(x)  # warm up
    runs = [timed(lambda: kernel(x)) for _ in range(3)]
    wall, cpu, (bo, ao, bi, ai, q) = min(runs, key=lambda r: r[0])
    sort_wall, _, _ = min((timed(lambda: sort_sides(x)) for _ in range(3)), key=lambda r: r[0])
    lex_wall, _, (lex_bo, lex_ao) = min((timed(lambda: lexsort_sides(x)) for _ in range(3)), key=lambda r: r[0])
    same_order = bool((lex_bo == bo).all() and (lex_ao == ao).all())
    res: dict[str, Any] = {
        "orders": n,
        "kernel_s": wall,
        "kernel_cpu_s": cpu,
        "sort_s": sort_wall,
        "lexsort_s": lex_wall,
        "same_order": same_order,
        "fills": len(q),
        "energy": int(q.sum()),
        "kernel_orders_per_s": n / wall,
    }
    print(
        f"{n:,} orders, numpy kernel incl. the sort: {wall:.3f} s (sort {sort_wall:.3f} s, CPU {cpu:.3f} s), "
        f"{len(q):,} fills, {n / wall:,.0f} orders/s; three-key np.lexsort {lex_wall:.3f} s, "
        f"same order: {same_order}"
    )
    if with_clear:
        build, _, (bids, asks) = timed(lambda: big_entries(x))
        cw, cc, fills = timed(lambda: clear(bids, asks))
        same = _same(fills, bids, asks, bo, ao, bi, ai, q)
        res.update(
            {
                "build_entries_s": build,
                "clear_s": cw,
                "clear_cpu_s": cc,
                "clear_fills": len(fills),
                "clear_orders_per_s": n / cw,
                "same_fills": same,
            }
        )
        print(
            f"{n:,} orders through clear(): {cw:.2f} s (CPU {cc:.2f} s; building the Entry objects took "
            f"{build:.2f} s more), {len(fills):,} fills, {n / cw:,.0f} orders/s; same fills as the kernel: {same}"
        )
        del bids, asks, fills
        gc.collect()
    return res


def _same(fills: list[Fill], bids: list[Entry], asks: list[Entry], bo: Any, ao: Any, bi: Any, ai: Any, q: Any) -> bool:
    if len(fills) != len(q):
        return False
    b_uuid = [bids[k].uuid for k in bo[bi].tolist()]
    a_uuid = [asks[k].uuid for k in ao[ai].tolist()]
    return all(
        (f.bid.uuid, f.ask.uuid, f.quantity) == t
        for f, t in zip(fills, zip(b_uuid, a_uuid, q.tolist(), strict=True), strict=True)
    )


# -- 3. an engine round of N participants ----------------------------------------------------


def bench_engine(n: int, reps: int) -> dict[str, Any]:
    phases: dict[str, list[float]] = {"submit": [], "open_round (clear)": [], "meters": [], "process (exchange)": []}
    counts: dict[str, int] = {}
    for rep in range(reps):
        rng = random.Random(rep)
        people = [f"P{k:04d}" for k in range(n)]
        market = Market(MarketConfig(duration=900, close_steps=2))
        market.open_round(0)
        slot = (1800, 2700)
        orders = []
        for p in people:
            src = rng.choice(SOURCES)
            if rng.random() < 0.5:
                orders.append(
                    (p, "ask", EntryMsg(rng.randint(100, 2000), round(rng.uniform(0.05, 0.17), 3), slot, None, src))
                )
            else:
                sourced = src if rng.random() < 0.3 else None
                orders.append(
                    (p, "bid", EntryMsg(rng.randint(100, 2000), round(rng.uniform(0.08, 0.20), 3), slot, None, sourced))
                )
        meters = {
            p: MeterMsg(
                slot,
                {s: rng.randint(0, 2500) for s in rng.sample(SOURCES, rng.randint(0, 2))},
                ConsumptionMsg({}, {"external": rng.randint(0, 2500), "solar": rng.randint(0, 200)}),
            )
            for p in people
        }

        def submit(m: Market = market, orders: list[Any] = orders) -> None:
            for p, side, msg in orders:
                m.submit(p, side, msg)

        w, _, _ = timed(submit)  # at the round of 0, [1800, 2700] is next_settle
        phases["submit"].append(w)
        w, _, opened = timed(lambda m=market: m.open_round(900))  # type: ignore[misc]
        phases["open_round (clear)"].append(w)  # [1800, 2700] is last_settle: cleared now
        market.process(0, now=900)
        market.process(900, now=1800)
        market.open_round(1800)  # [1800, 2700] is delivered

        def meter_all(m: Market = market, meters: dict[str, MeterMsg] = meters) -> None:
            for p, reading in meters.items():
                m.meter(p, reading)

        w, _, _ = timed(meter_all)
        phases["meters"].append(w)
        w, _, result = timed(lambda m=market: m.process(1800, now=2700))  # type: ignore[misc]
        phases["process (exchange)"].append(w)
        counts = {
            "orders": len(orders),
            "settlements": len(opened.settlements),
            "transactions": len(result.transactions),
        }
    res = {"participants": n, "reps": reps, **counts, **{k: statistics.fmean(v) * 1e3 for k, v in phases.items()}}
    total = sum(statistics.fmean(v) for v in phases.values())
    res["total_ms"] = total * 1e3
    print(
        f"engine round, {n} participants ({counts['orders']} orders, {counts['settlements']} settlements, "
        f"{counts['transactions']} ledger rows), mean of {reps}: "
        + ", ".join(f"{k} {statistics.fmean(v) * 1e3:.1f} ms" for k, v in phases.items())
        + f"; total {total * 1e3:.1f} ms"
    )
    return res


# -- report ------------------------------------------------------------------------------------


def render(
    meta: dict[str, str], command: str, small: list[dict[str, Any]], big: dict[str, Any], engine: dict[str, Any]
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "## Clearing and energy exchange of the market core (`bench/clearing.py`)",
        "",
        f"Command: `{command}`  ",
        f"Date: {now}; commit {meta['commit']}  ",
        f"Machine: {meta['platform']}, Python {meta['python']}, numpy {meta['numpy']}, {meta['cpus']} CPUs "
        f"({meta['cpu']}); load average at start {meta['load']}",
        "",
        "One process, pure functions, garbage collector off while timing. Wall times on a shared machine are "
        "noisy; the CPU column is what the process itself spent.",
        "",
        "### A slot of 1,000 bids and 1,000 asks through `clear()` (unsorted, and ranked as the book hands it over)",
        "",
        "200 prosumers, prices to 3 decimals (many ties), submitted over 3 rounds; unsorted, or ranked by "
        "price and time as the book hands a slot over (it keeps each side ranked on arrival); most orders "
        "cross, so almost every order is filled (the expensive case).",
        "",
        "| book | fills | clears | mean ms | median ms | min ms | CPU mean ms | orders/s (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in small:
        out.append(
            f"| {r['book']} | {r['fills']} | {r['reps']} | {r['mean_ms']:.3f} | {r['median_ms']:.3f} | "
            f"{r['min_ms']:.3f} | {r['cpu_mean_ms']:.3f} | {r['orders_per_s']:,.0f} |"
        )
    n = big["orders"]
    out += [
        "",
        f"### A slot of {n:,} orders ({n // 2:,} bids + {n // 2:,} asks)",
        "",
        "| path | seconds | orders/s | fills |",
        "|---|---:|---:|---:|",
        f"| numpy kernel `match_sorted` incl. the sort of both sides, `priority_order` (best of 3) | "
        f"{big['kernel_s']:.3f} | {big['kernel_orders_per_s']:,.0f} | {big['fills']:,} |",
        f"| of which the two `priority_order` sorts | {big['sort_s']:.3f} | | |",
        f"| (the same order by a three-key `np.lexsort`, the sort before; same order = {big['same_order']}) "
        f"| {big['lexsort_s']:.3f} | | |",
    ]
    if "clear_s" in big:
        out += [
            f"| `clear()` end to end on `Entry` objects (once) | {big['clear_s']:.2f} | "
            f"{big['clear_orders_per_s']:,.0f} | {big['clear_fills']:,} |",
            f"| (building the {n:,} `Entry` objects, not included above) | {big['build_entries_s']:.2f} | | |",
            "",
            f"Every order has its own participant here, so both paths must agree: same fills = {big['same_fills']}.",
        ]
    e = engine
    out += [
        "",
        f"### An engine round of {e['participants']:,} participants (mean of {e['reps']})",
        "",
        f"{e['orders']:,} orders for one slot (half bids, 30 % of them sourced), every participant metered; "
        f"{e['settlements']:,} settlements, {e['transactions']:,} ledger rows.",
        "",
        "| phase | ms |",
        "|---|---:|",
    ]
    for k in ("submit", "open_round (clear)", "meters", "process (exchange)"):
        out.append(f"| {k} | {e[k]:.1f} |")
    out.append(f"| total | {e['total_ms']:.1f} |")
    return "\n".join(out)


def write_section(path: Path, text: str) -> None:
    """Replace the text between the markers (or append it), keeping the rest of the file."""
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.write_text(new)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--reps", type=int, default=300, help="clears of the 2 x 1,000 slot to average")
    p.add_argument("--big", type=int, default=1_000_000, help="orders of the large slot")
    p.add_argument(
        "--big-clear", action=argparse.BooleanOptionalAction, default=True, help="also clear() the large slot"
    )
    p.add_argument("--participants", type=int, default=1000, help="participants of the engine round")
    p.add_argument("--engine-reps", type=int, default=5)
    p.add_argument("--write", action="store_true", help=f"write the figures into {DOC.relative_to(_ROOT)}")
    args = p.parse_args()
    meta = machine()
    command = "python bench/clearing.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    print(f"command: {command}")
    print(
        f"machine: {meta['platform']}, Python {meta['python']}, numpy {meta['numpy']}, "
        f"{meta['cpus']} CPUs ({meta['cpu']})"
    )
    print(f"load average: {meta['load']}")
    small = bench_small(args.reps)
    big = bench_big(args.big, args.big_clear)
    engine = bench_engine(args.participants, args.engine_reps)
    if args.write:
        write_section(DOC, render(meta, command, small, big, engine))
        print(f"wrote {DOC.relative_to(_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
