"""`microte sweep SCENARIO --set KEY=V1,V2 ... --seeds N --out DIR`: a parameter sweep.

Every combination of the `--set` values (their cartesian product) runs once per seed, each
into its own SQLite ledger `DIR/runs/<run-name>.db`. `DIR/results.csv` holds one row per run
(the swept values, the seed, the run's KPIs, its ledger digest) and `DIR/comparison.png` the
mean KPIs of each combination with their spread over the seeds (docs/sweeps.md).

The pure parts come first (parsing `--set`, the run list, the CSV rows, the statistics per
combination), then the I/O: validation, the runs (worker processes or Ray tasks), the files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import multiprocessing
import re
import statistics
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date, datetime, time
from logging import WARNING
from pathlib import Path
from typing import Any

import msgspec
from tqdm import tqdm

from controller import runloop
from controller.scenario import community, load_scenario
from controller.sim import SimResult, run_sim
from ledger import ledger_digest

# `--set` keys that are run_sim arguments, not scenario keys (the scenario's `participants`
# is its list of participant tables; `days` is also validated as the scenario key).
RUN_ARGS = ("participants", "days")
KPIS = (
    "rounds",
    "seconds",
    "rounds_per_second",
    "startup_seconds",
    "trades",
    "p2p_wh",
    "imported_wh",
    "load_wh",
    "grid_bought_wh",
    "grid_sold_wh",
    "p2p_share",
    "self_sufficiency",
    "bill_total",
    "grid_only_total",
    "saving",
    "readings_missing",
)
TIMING = ("seconds", "rounds_per_second", "startup_seconds")  # the columns that differ between equal runs
# The comparison plot's panels: KPI column, axis label, scale from the CSV's unit.
PANELS = (
    ("p2p_share", "P2P share of imports (%)", 100.0),
    ("grid_bought_wh", "grid import (kWh)", 1e-3),
    ("bill_total", "community bill (currency)", 1.0),
)
MAX_NAME = 180  # file names stay well below the usual 255-byte limit


class SweepError(Exception):
    """Bad sweep input: one line on stderr, exit code 2, nothing written."""


class RunFailed(Exception):
    """A run raised: the sweep stops (exit code 1)."""


class Run(msgspec.Struct, frozen=True):
    """One run of the sweep: picklable, so a worker process or a Ray task can take it."""

    name: str
    scenario: str  # absolute path
    ledger: str  # sqlite:/// URL of an absolute path
    values: dict[str, Any]  # the combination: `--set` key -> value, in `--set` order
    seed: int
    transport: str
    participants: int | None = None
    days: float | None = None

    @property
    def overrides(self) -> dict[str, Any]:
        """The scenario values by dotted key (`load_scenario`), the seed included."""
        return {k: v for k, v in self.values.items() if k not in RUN_ARGS} | {"seed": self.seed}

    @property
    def combination(self) -> str:
        return ",".join(f"{k}={format_value(v)}" for k, v in self.values.items()) or "scenario"


class Outcome(msgspec.Struct, frozen=True):
    result: SimResult
    digest: str


# -- pure: `--set`, the run list, rows and statistics ----------------------------------------


def parse_value(text: str) -> Any:
    """A `--set` value: a TOML literal when it is one (`50`, `0.1`, `true`, `"a,b"`, `[1, 2]`),
    else the text itself (`uniform`). Dates stay text: scenario times are strings or integers."""
    if "\n" in text:  # one value, never more TOML lines
        return text
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if isinstance(value, datetime | date | time) else value


def split_values(text: str) -> list[str]:
    """The comma-separated items of `text`; commas inside brackets, braces or quotes stay."""
    items: list[str] = []
    depth, quote, start = 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items]


def format_value(value: Any) -> str:
    """A value as the run name and the CSV show it: text as is, anything else as JSON (`true`, `0.1`)."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def parse_sets(items: Sequence[str]) -> dict[str, list[Any]]:
    """`["market.pricing=midpoint,uniform", "participants=50,100"]` -> key -> values, in order."""
    sets: dict[str, list[Any]] = {}
    for item in items:
        key, sep, rest = (part.strip() for part in item.partition("="))
        if not sep or not key or not rest or any(not k for k in key.split(".")):
            raise SweepError(f"--set {item!r}: expected KEY=VALUE[,VALUE...] (e.g. market.pricing=midpoint,uniform)")
        if key == "seed":
            raise SweepError("--set seed=...: the seeds are --seeds N from --seed-base S")
        if key in sets:
            raise SweepError(f"--set {key}: given twice (list all its values in one --set)")
        texts = split_values(rest)
        if not all(texts):
            raise SweepError(f"--set {item!r}: an empty value")
        if len(set(texts)) < len(texts):
            raise SweepError(f"--set {item!r}: a value listed twice")
        sets[key] = [parse_value(t) for t in texts]
    return sets


def safe_name(text: str) -> str:
    """A file name for a run: unsafe characters become `_`; a long name is cut and keeps a hash."""
    name = re.sub(r"[^A-Za-z0-9._,=+-]", "_", text)
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 13] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return name


def plan_runs(
    sets: Mapping[str, Sequence[Any]],
    seeds: Sequence[int],
    *,
    scenario: str | Path,
    out: str | Path,
    transport: str,
    participants: int | None = None,
    days: float | None = None,
) -> list[Run]:
    """Every combination of `sets` (cartesian product, the first key varying slowest), each
    once per seed: the order of results.csv."""
    runs_dir = Path(out).absolute() / "runs"
    runs: list[Run] = []
    taken: set[str] = set()
    for combo in itertools.product(*sets.values()):
        values = dict(zip(sets, combo, strict=True))
        n = values.get("participants", participants)
        d = values.get("days", days)
        if n is not None and (type(n) is not int or n < 1):
            raise SweepError(f"participants={format_value(n)}: expected a whole number of at least 1")
        if d is not None and (type(d) not in (int, float)):
            raise SweepError(f"days={format_value(d)}: expected a number")
        for seed in seeds:
            label = ",".join(f"{k}={format_value(v)}" for k, v in values.items()) + ("," if values else "")
            name = base = safe_name(f"{label}seed={seed}")
            for i in itertools.count(2):  # two labels made the same by safe_name
                if name not in taken:
                    break
                name = f"{base}-{i}"
            taken.add(name)
            runs.append(
                Run(
                    name=name,
                    scenario=str(Path(scenario).absolute()),
                    ledger=f"sqlite:///{runs_dir / (name + '.db')}",
                    values=values,
                    seed=seed,
                    transport=transport,
                    participants=n,
                    days=None if d is None else float(d),
                )
            )
    return runs


def columns(keys: Iterable[str]) -> list[str]:
    return [*keys, "seed", "transport", *KPIS, "digest", "ledger"]


def kpis(result: SimResult) -> dict[str, int | float]:
    """The numbers of a run's summary; money in currency units (the ledger's micro-units / 1e6)."""
    s = result.summary
    bill = sum(b.market for b in s.bills)
    grid_only = sum(b.grid_only for b in s.bills)
    return {
        "rounds": s.rounds,
        "seconds": round(s.seconds, 4),
        "rounds_per_second": round(s.rounds_per_second, 2),
        "startup_seconds": round(result.startup_seconds, 4),
        "trades": s.trades,
        "p2p_wh": s.p2p_wh,
        "imported_wh": s.imported_wh,
        "load_wh": s.load_wh,
        "grid_bought_wh": s.grid_bought_wh,
        "grid_sold_wh": s.grid_sold_wh,
        "p2p_share": round(s.p2p_share, 6),
        "self_sufficiency": round(s.self_sufficiency, 6),
        "bill_total": bill / 1e6,
        "grid_only_total": grid_only / 1e6,
        "saving": (grid_only - bill) / 1e6,
        "readings_missing": result.missing_total,
    }


def row(run: Run, outcome: Outcome, out: str | Path) -> dict[str, Any]:
    """The CSV row of a run; the ledger path relative to DIR (the CSV moves with its runs)."""
    ledger = Path(run.ledger.removeprefix("sqlite:///"))
    return {
        **{k: format_value(v) for k, v in run.values.items()},
        "seed": run.seed,
        "transport": run.transport,
        **kpis(outcome.result),
        "digest": outcome.digest,
        "ledger": ledger.relative_to(Path(out).absolute()).as_posix(),
    }


def by_combination(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metrics: Sequence[str]
) -> list[tuple[str, int, dict[str, tuple[float, float]]]]:
    """(combination, runs, metric -> (mean, standard deviation over the seeds)), in row order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        label = ",".join(f"{k}={r[k]}" for k in keys) or "scenario"
        groups.setdefault(label, []).append(r)
    stats = []
    for label, group in groups.items():
        values = {m: [float(r[m]) for r in group] for m in metrics}
        spread = {m: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in values.items()}
        stats.append((label, len(group), spread))
    return stats


def table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """A Markdown table of the means (± standard deviation) per combination."""
    stats = by_combination(rows, keys, ["p2p_share", "self_sufficiency", "grid_bought_wh", "bill_total", "saving"])
    lines = [
        "| combination | runs | P2P share | self-sufficiency | grid import kWh | community bill | saving |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, n, s in stats:
        cells = [
            f"{s['p2p_share'][0]:.1%} ± {s['p2p_share'][1]:.1%}",
            f"{s['self_sufficiency'][0]:.1%} ± {s['self_sufficiency'][1]:.1%}",
            f"{s['grid_bought_wh'][0] / 1000:.1f} ± {s['grid_bought_wh'][1] / 1000:.1f}",
            f"{s['bill_total'][0]:.2f} ± {s['bill_total'][1]:.2f}",
            f"{s['saving'][0]:.2f} ± {s['saving'][1]:.2f}",
        ]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- I/O: validation, runs, files ---------------------------------------------------------------


def validate(runs: Sequence[Run]) -> None:
    """Load every combination's scenario as its run will, before any run writes a ledger."""
    seen: set[str] = set()
    for run in runs:
        if run.combination in seen:  # the seed alone changes nothing that could be refused
            continue
        seen.add(run.combination)
        overrides = run.overrides | ({} if run.days is None else {"days": run.days})
        try:
            scenario = load_scenario(run.scenario, overrides)
        except SystemExit as exc:  # load_scenario's one-line message
            raise SweepError(f"{run.combination}: {exc.code}") from None
        try:
            scenario.market_config("sim")  # [market] is a plain table until the market reads it
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            raise SweepError(f"{run.combination}: [market] {exc}") from None
        try:
            community(scenario, run.participants)
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            raise SweepError(f"{run.combination}: [[participants]] {exc}") from None
        if run.transport == "inproc" and scenario.feeder is not None:
            raise SweepError(
                f"{run.combination}: --transport inproc does not run the DSO agent of a [feeder] scenario yet; "
                "use --transport socket"
            )


def run_one(run: Run) -> Outcome:
    """One run, in whichever process or Ray worker it lands: the sim, then its ledger's digest."""
    Path(run.ledger.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)  # a Ray node's disk
    result = runloop.run(
        run_sim(
            run.scenario,
            ledger=run.ledger,
            participants=run.participants,
            days=run.days,
            progress=False,
            transport=run.transport,
            overrides=run.overrides,
        )
    )
    return Outcome(result, ledger_digest(run.ledger))


def _failed(run: Run, exc: BaseException) -> RunFailed:
    return RunFailed(f"run {run.name} failed: {type(exc).__name__}: {exc}")


def execute_local(runs: Sequence[Run], jobs: int, done: Callable[[], object]) -> list[Outcome]:
    """The runs in `jobs` spawned worker processes (one: in this process), results in run order."""
    if jobs == 1:
        outcomes = []
        for run in runs:
            try:
                outcomes.append(run_one(run))
            except Exception as exc:
                raise _failed(run, exc) from exc
            done()
        return outcomes
    # spawn: a fresh interpreter per worker on every OS (no forked event loop or SQLite handle).
    results: list[Outcome | None] = [None] * len(runs)
    with ProcessPoolExecutor(max_workers=min(jobs, len(runs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, run): i for i, run in enumerate(runs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except BaseException as exc:  # a worker's SystemExit too
                pool.shutdown(cancel_futures=True)
                raise _failed(runs[i], exc) from exc
            done()
    return [r for r in results if r is not None]


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError("--ray needs Ray: pip install 'microte[cluster]'") from None
    return ray


def execute_ray(runs: Sequence[Run], address: str, jobs: int, done: Callable[[], object]) -> list[Outcome]:
    """The runs as Ray tasks: `local` starts a Ray instance here with `jobs` CPUs, anything else
    is a running cluster's address (its nodes need microte installed and DIR shared)."""
    ray = import_ray()
    if address == "local":
        ray.init(address="local", num_cpus=jobs, include_dashboard=False, log_to_driver=False, logging_level=WARNING)
    else:
        ray.init(address=address, log_to_driver=False, logging_level=WARNING)
    try:
        task = ray.remote(num_cpus=1)(run_one)
        refs = [task.remote(run) for run in runs]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            for ref in finished:
                try:
                    ray.get(ref)
                except Exception as exc:  # RayTaskError: its `cause` is the run's own exception
                    raise _failed(runs[index[ref]], getattr(exc, "cause", None) or exc) from exc
                done()
        outcomes: list[Outcome] = ray.get(refs)
        return outcomes
    finally:
        ray.shutdown()


def write_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def plot(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], path: Path) -> None:
    """A bar per combination and KPI: the mean over the seeds, the error bar their standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = by_combination(rows, keys, [p[0] for p in PANELS])
    labels = [label.replace(",", "\n") for label, _, _ in stats]
    width = max(9.0, 0.8 * len(stats) * len(PANELS))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(width, 4.8), constrained_layout=True)
    for ax, (metric, title, scale) in zip(axes, PANELS, strict=True):
        means = [s[metric][0] * scale for _, _, s in stats]
        errors = [s[metric][1] * scale for _, _, s in stats]
        ax.bar(range(len(stats)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(stats)), labels, fontsize=7, rotation=30 if len(stats) > 4 else 0)
        ax.set_title(title, fontsize=10)
    seeds = sorted({n for _, n, _ in stats})
    fig.suptitle(f"Sweep: mean per combination, error bars: standard deviation over {'/'.join(map(str, seeds))} seeds")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare(args: argparse.Namespace) -> tuple[list[str], list[Run]]:
    """The `--set` keys and the validated run list; raises SweepError, writes nothing."""
    if args.jobs < 1:
        raise SweepError(f"--jobs {args.jobs}: expected at least 1")
    if args.seeds < 1:
        raise SweepError(f"--seeds {args.seeds}: expected at least 1")
    if not Path(args.scenario).is_file():
        raise SweepError(f"{args.scenario}: no such scenario file")
    if args.ray:
        import_ray()
    sets = parse_sets(args.set)
    for key in RUN_ARGS:
        if key in sets and getattr(args, key) is not None:
            raise SweepError(f"--{key} and --set {key}=...: give one of them")
    base = args.seed_base
    if base is None:
        try:
            base = load_scenario(args.scenario).seed
        except SystemExit as exc:
            raise SweepError(str(exc.code)) from None
    runs = plan_runs(
        sets,
        range(base, base + args.seeds),
        scenario=args.scenario,
        out=args.out,
        transport=args.transport,
        participants=args.participants,
        days=args.days,
    )
    validate(runs)
    return list(sets), runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario TOML file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=V1[,V2...]",
        help="values of a scenario key (dotted: market.pricing=midpoint,uniform) or of participants= / days=; "
        "repeat it: every combination runs",
    )
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="runs per combination: seeds BASE..BASE+N-1")
    p.add_argument("--seed-base", type=int, metavar="S", help="the first seed (default: the scenario's seed)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes (with --ray local: Ray CPUs)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory: runs/, results.csv, comparison.png")
    p.add_argument("--transport", choices=["inproc", "socket"], default="inproc", help="as `microte sim --transport`")
    p.add_argument("--participants", type=int, metavar="N", help="every run: scale the community to N")
    p.add_argument("--days", type=float, metavar="D", help="every run: override the scenario's number of days")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run as Ray tasks: 'local' starts Ray here with --jobs CPUs, else a cluster (auto, ray://HOST:10001)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        keys, runs = prepare(args)
    except SweepError as err:
        print(f"microte sweep: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    # disable=None: tqdm shows the bar only on a terminal.
    with tqdm(total=len(runs), unit="run", desc="sweep", disable=True if args.quiet else None) as bar:
        try:
            if args.ray:
                outcomes = execute_ray(runs, args.ray, args.jobs, bar.update)
            else:
                outcomes = execute_local(runs, args.jobs, bar.update)
        except RunFailed as err:
            print(f"microte sweep: {err}", file=sys.stderr)
            return 1
    rows = [row(run, outcome, out) for run, outcome in zip(runs, outcomes, strict=True)]
    write_csv(out / "results.csv", columns(keys), rows)
    plot(rows, keys, out / "comparison.png")
    print(table(rows, keys))
    runs_word = "run" if len(runs) == 1 else "runs"
    print(f"\n{len(runs)} {runs_word}: {out / 'results.csv'}, {out / 'comparison.png'}, ledgers in {out / 'runs'}")
    return 0
