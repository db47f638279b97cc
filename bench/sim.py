"""Full microte rounds against the bare python-socketio ceiling, measured in the same run.

    python bench/sim.py [--n 10 50 100] [--seconds 5] [--repeat 1] [--no-fast-ceiling] [--no-memory-ledger]
                        [--no-combined] [--fleet 1000:1:96 10000:2:12] [--write]

For each N, in this order and each in a fresh process (so peak memory and event loops
never mix):

1. `bench/ceiling.py --n N`: the bare round (default serializer, asyncio; bid and meter
   acknowledged, 6 messages per participant), the same with `--no-ack` (issue 16's bare
   round of 4 messages: bid and meter unacknowledged), and unless `--no-fast-ceiling` the
   acknowledged one with msgpack + uvloop, for reference;
2. microte, own loop: `microte market` as a subprocess (`controller.sim.market_process`,
   the same arguments as `run_sim`), the scenario's community grown to N
   (`controller.scenario.community`), a `participants.fleet.Fleet` of real clients and a
   controller stepping rounds like `controller.sim._step_all` (on `controller.runloop.run`'s
   loop, as `microte sim` runs them: uvloop when installed), each `step` call timed
   (p50/p99), for about `--seconds`; a temporary SQLite ledger (on disk, synchronous=FULL);
   the server's peak RSS read from /proc/PID/status (VmHWM) before it stops; with the v1
   events (`orders` + ack, `meter` + ack, `settled`, `delivery`), then unless
   `--no-combined` with microte's one-event round as `microte sim` runs it (`round.submit`
   + ack, and each step's fills and deliveries with the next round's start in one
   `round.start`: docs/protocol.md), 3 messages per participant where the bare round has 4;
3. microte through `controller.sim.run_sim` itself (what `microte sim` runs), for the same
   number of rounds (its default: the one-event round): its rounds/s and start-up time,
   as a cross-check of (2).

Then fleet mode (issue 16): for each `--fleet PARTICIPANTS:CONNECTIONS:ROUNDS`, `run_sim` with
that many `/fleet` connections (what `microte sim --participants N --fleet K` runs), its
rounds/s against the issue's target (100 at 1,000, 20 at 10,000), the readings missing over
all rounds (the first included), and its ledger digest against the in-process run of the
same community and seed (`--transport inproc`, which tests/controller/test_inproc.py holds to
the ledger of one connection each). `--fleet` with no value leaves fleet mode out.

`--write` puts the tables into docs/benchmarks-sim.md (between markers; the rest of the
file is kept). Prints figures; never asserts (DESIGN.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import secrets
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path and bench/ledger.py would
# shadow the `ledger` package: put the project root there instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench")]

from bench.ceiling import peak_rss_kib, percentile, proc_cpu, proc_status, self_cpu  # noqa: E402

SCENARIO = _ROOT / "scenarios" / "community.toml"
DOC = _ROOT / "docs" / "benchmarks-sim.md"
BEGIN, END = "<!-- bench/sim.py:begin -->", "<!-- bench/sim.py:end -->"


# -- workers (one process each) --------------------------------------------------------------


def server_pid() -> int:
    """The `microte market` subprocess `market_process` started (a child of this process)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"controller\x00market" in cmdline:
            return int(entry.name)
    raise RuntimeError("no microte market subprocess found")


def ledger_counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return {
            t: db.execute(f"select count(*) from {t}").fetchone()[0]
            for t in ("transactions", "settlements", "meters", "rounds")
        }


async def own_loop(
    n: int, seconds: float, max_rounds: int, memory_ledger: bool = False, combined: bool = False
) -> dict[str, Any]:
    """microte rounds stepped and timed here; everything else is the library's own code."""
    import msgspec
    import socketio

    from controller import runloop
    from controller.scenario import community, load_scenario
    from controller.sim import CONTROLLER_ID, market_process, write_registry
    from participants.fleet import Fleet

    scenario = load_scenario(SCENARIO)
    scenario = msgspec.structs.replace(scenario, days=(max_rounds + 0.5) * scenario.step / 86400)
    specs = community(scenario, n)
    tokens = {s.id: secrets.token_urlsafe(18) for s in specs} | {CONTROLLER_ID: secrets.token_urlsafe(18)}
    with tempfile.TemporaryDirectory(prefix="microte-bench-") as tmp:
        db = Path(tmp) / "ledger.db"
        ledger = "memory:" if memory_ledger else f"sqlite:///{db}"
        registry = Path(tmp) / "registry.toml"
        write_registry(registry, tokens)
        server_args = [
            *("--registry", str(registry), "--scenario", str(SCENARIO), "--port", "0"),
            *("--ledger", ledger, "--mode", "sim", "--log-level", "WARNING", "--serializer", "json"),
        ]
        launched = time.perf_counter()
        async with market_process(server_args) as url:
            listening = time.perf_counter() - launched
            spid = server_pid()
            rss_idle = proc_status(spid, "VmRSS")
            fleet = Fleet(
                url,
                [(s, tokens[s.id]) for s in specs],
                scenario.seed,
                timezone=scenario.timezone,
                base_dir=SCENARIO.parent,
                concurrency=64,
                combined=combined,
                round_start=combined,  # as `microte sim` runs them
            )
            async with fleet:
                ctl = socketio.AsyncClient(reconnection=False)
                await ctl.connect(
                    url,
                    namespaces=["/simulation"],
                    transports=["websocket"],
                    auth={"id": CONTROLLER_ID, "token": tokens[CONTROLLER_ID]},
                )
                connected = time.perf_counter() - launched
                runloop.settle_heap()  # as run_sim does once its clients are connected
                rss_connected = proc_status(spid, "VmRSS")
                timeout = float(scenario.market.get("round_timeout", 10.0)) + 30
                times: list[float] = []
                missing = 0
                first_round = 0.0
                cpu_s = cpu_c = 0.0
                started = 0.0
                for i in range(scenario.rounds):
                    t = scenario.start_time + i * scenario.step
                    t1 = time.perf_counter()
                    reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=timeout)
                    t2 = time.perf_counter()
                    if not reply.get("ok"):
                        raise RuntimeError(f"step {t} refused: {reply}")
                    missing += len(reply["round"]["missing"])
                    if i == 0:  # the first round is part of start-up, not of the steady state
                        first_round = t2 - launched
                        cpu_s, cpu_c, started = proc_cpu(spid), self_cpu(), t2
                        continue
                    times.append(t2 - t1)
                    if t2 - started >= seconds and len(times) >= 20:
                        break
                elapsed = time.perf_counter() - started
                cpu_s, cpu_c = proc_cpu(spid) - cpu_s, self_cpu() - cpu_c
                hwm = proc_status(spid, "VmHWM")
                await ctl.disconnect()
            stats = fleet.stats()
        counts = {} if memory_ledger else ledger_counts(db)
    rounds = len(times)
    return {
        "n": n,
        "combined": combined,
        "ledger": ledger.split(":")[0],
        "rounds": rounds,
        "seconds": elapsed,
        "rounds_per_second": rounds / elapsed,
        "p50_ms": percentile(times, 50) * 1000,
        "p99_ms": percentile(times, 99) * 1000,
        "max_ms": max(times) * 1000,
        "listening_seconds": listening,
        "connected_seconds": connected,
        "first_round_seconds": first_round,
        "server_rss_idle_kib": rss_idle,
        "server_rss_connected_kib": rss_connected,
        "server_peak_rss_kib": hwm,
        "client_peak_rss_kib": peak_rss_kib(),
        "server_cpu_ms_per_round": cpu_s / rounds * 1000,
        "client_cpu_ms_per_round": cpu_c / rounds * 1000,
        "missing": missing,
        "client_errors": sum(s.errors for s in stats.values()),
        "orders_per_round": sum(s.orders for s in stats.values()) / (rounds + 1),
        "ledger_rows": counts,
    }


async def via_run_sim(n: int, rounds: int) -> dict[str, Any]:
    from controller.sim import run_sim

    with tempfile.TemporaryDirectory(prefix="microte-bench-") as tmp:
        days = (rounds + 0.5) * 900 / 86400  # community.toml: 900 s slots
        r = await run_sim(
            SCENARIO, ledger=f"sqlite:///{Path(tmp) / 'ledger.db'}", participants=n, days=days, progress=False
        )
    return {
        "n": n,
        "rounds": r.summary.rounds,
        "seconds": r.summary.seconds,
        "rounds_per_second": r.summary.rounds_per_second,
        "startup_seconds": r.startup_seconds,
        "missing": r.missing_total,
    }


FLEET_TARGETS = {1000: 100.0, 10000: 20.0}  # rounds/s, issue 16


async def fleet_run(n: int, fleets: int, rounds: int) -> dict[str, Any]:
    """`run_sim` over `fleets` /fleet connections, then the in-process run's digest."""
    from controller.sim import run_sim
    from ledger import ledger_digest

    days = (rounds + 0.5) * 900 / 86400  # community.toml: 900 s slots
    with tempfile.TemporaryDirectory(prefix="microte-bench-") as tmp:
        fleet, inproc = f"sqlite:///{Path(tmp) / 'fleet.db'}", f"sqlite:///{Path(tmp) / 'inproc.db'}"
        r = await run_sim(SCENARIO, ledger=fleet, participants=n, days=days, progress=False, fleets=fleets)
        await run_sim(SCENARIO, ledger=inproc, participants=n, days=days, progress=False, transport="inproc")
        digest, same = ledger_digest(fleet), ledger_digest(fleet) == ledger_digest(inproc)
    return {
        "n": n,
        "fleets": fleets,
        "rounds": r.summary.rounds,
        "rounds_per_second": r.summary.rounds_per_second,
        "startup_seconds": r.startup_seconds,
        "missing": r.missing_total,
        "digest": digest,
        "same_as_inproc": same,
    }


def render_fleet(rows: list[dict[str, Any]]) -> str:
    out = [
        "",
        "### Fleet mode (`/fleet`, issue 16)",
        "",
        "`run_sim` with the participants on `/fleet` connections (`microte sim --participants N --fleet K`: "
        "columnar orders, readings, fills and deliveries), SQLite ledger; the digest compared with the "
        "in-process run of the same community and seed.",
        "",
    ]
    header = [
        "participants",
        "connections",
        "rounds",
        "rounds/s",
        "target",
        "ratio to target",
        "readings missing",
        "start-up s",
        "digest",
        "same as in-process",
    ]
    body = []
    for r in rows:
        target = FLEET_TARGETS.get(r["n"])
        body.append(
            [
                str(r["n"]),
                str(r["fleets"]),
                str(r["rounds"]),
                fmt(r["rounds_per_second"]),
                fmt(target, ".0f") if target else "-",
                fmt(_ratio(r["rounds_per_second"], target), ".2f") if target else "-",
                str(r["missing"]),
                fmt(r["startup_seconds"], ".2f"),
                f"`{r['digest'][:8]}...`",
                "yes" if r["same_as_inproc"] else "**no**",
            ]
        )
    return "\n".join([*out, *_table(header, body)])


# -- the orchestrator ------------------------------------------------------------------------


def child(args: list[str], timeout: float = 300) -> dict[str, Any] | None:
    """Run a benchmark process; its last stdout line is a JSON object."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        print(f"  failed: {shlex.join(args)} (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def cli_import_seconds() -> float:
    """What `microte sim` pays before `run_sim` starts: a cold interpreter importing the CLI."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import controller.cli, controller.sim"], cwd=_ROOT, check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import aiohttp
    import engineio
    import socketio

    def version(mod: Any, dist: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(dist)
        except Exception:
            return getattr(mod, "__version__", "?")

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT, capture_output=True, text=True
        ).stdout.strip()
        if dirty:
            diff = subprocess.run(["git", "diff", "HEAD"], cwd=_ROOT, capture_output=True, check=True).stdout
            commit += f" + uncommitted changes (git diff HEAD sha256 {hashlib.sha256(diff).hexdigest()[:12]})"
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": (
            f"python-socketio {version(socketio, 'python-socketio')}, "
            f"python-engineio {version(engineio, 'python-engineio')}, aiohttp {version(aiohttp, 'aiohttp')}"
        ),
        "commit": commit,
    }


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _get(d: dict[str, Any] | None, key: str) -> Any:
    return d.get(key) if d else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def render(rows: list[dict[str, Any]], meta: dict[str, str], command: str, cli_import: float) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    fast = any(r.get("fast") for r in rows)
    memory = any(r.get("memory") for r in rows)
    combined = any(r.get("combined") for r in rows)
    out = [
        "## Full microte rounds against the bare python-socketio round (`bench/sim.py`)",
        "",
        f"Command: `{command}`  ",
        f"Date: {now}; commit {meta['commit']}  ",
        f"Machine: {meta['platform']}, Python {meta['python']}, {meta['cpus']} CPUs ({meta['cpu']}); "
        f"load average at start {meta['load']}  ",
        f"Libraries: {meta['versions']}",
        "",
        "Each figure comes from its own process, in this order per N: the ceiling (`bench/ceiling.py`, default "
        "serializer and asyncio loop; bid and meter acknowledged, then unacknowledged"
        + (", then acknowledged with msgpack + uvloop for reference" if fast else "")
        + "), microte with the v1 events (own timed loop, SQLite ledger; microte's server and clients on "
        "`controller.runloop.run`'s loop, uvloop, as `microte sim` runs them)"
        + (", microte with `round.submit` / `round.start` (same loop)" if combined else "")
        + ", microte via `controller.sim.run_sim` (its default: `round.submit` / `round.start`)"
        + (", microte with the `memory:` ledger" if memory else "")
        + ". Server and clients share the machine's cores; other work on the machine makes rounds/s noisy, "
        "the CPU milliseconds per round much less so.",
        "",
        "### Throughput",
        "",
    ]
    header = ["N", "ceiling rounds/s (acked, 6 msgs)", "ceiling, no acks (4 msgs)"]
    if fast:
        header.append("ceiling msgpack+uvloop")
    header += ["microte v1 events rounds/s", "ratio"]
    if combined:
        header += ["microte round.submit/round.start", "ratio", "ratio to no-ack ceiling"]
    header += ["via run_sim", "ratio"]
    if memory:
        header += ["microte v1, memory: ledger", "ratio"]
    header += ["p50 ms", "p99 ms", "ceiling p50 / p99 ms"]
    body = []
    for r in rows:
        c, m, s = r["ceiling"], r["microte"], r["run_sim"]
        base = _get(c, "rounds_per_second")
        bare = _get(r.get("bare4"), "rounds_per_second")
        line = [str(r["n"]), fmt(base), fmt(bare)]
        if fast:
            line.append(fmt(_get(r.get("fast"), "rounds_per_second")))
        rate = _get(m, "rounds_per_second")
        line += [fmt(rate), fmt(_ratio(rate, base), ".0%")]
        if combined:
            rate = _get(r.get("combined"), "rounds_per_second")
            line += [fmt(rate), fmt(_ratio(rate, base), ".0%"), fmt(_ratio(rate, bare), ".0%")]
        for run in (s, *((r.get("memory"),) if memory else ())):
            rate = _get(run, "rounds_per_second")
            line += [fmt(rate), fmt(_ratio(rate, base), ".0%")]
        timed = r.get("combined") or m
        line += [
            fmt(_get(timed, "p50_ms")),
            fmt(_get(timed, "p99_ms")),
            f"{fmt(_get(c, 'p50_ms'))} / {fmt(_get(c, 'p99_ms'))}",
        ]
        body.append(line)
    out += _table(header, body)

    out += ["", "### CPU per round (the part other load distorts least)", ""]
    header = ["N", "ceiling server ms", "ceiling clients ms", "microte v1 server ms", "microte v1 clients ms"]
    if combined:
        header += ["round.submit server ms", "round.submit clients ms"]
    if memory:
        header.append("microte v1 server ms, memory: ledger")
    header += ["CPU ratio (ceiling / microte v1)"]
    if combined:
        header.append("CPU ratio (ceiling / round.submit)")
    header += ["orders/round", "ledger rows/round"]
    body = []
    for r in rows:
        c, m, k = r["ceiling"], r["microte"], r.get("combined")
        cs, cc = _get(c, "server_cpu_ms_per_round"), _get(c, "client_cpu_ms_per_round")
        ms, mc = _get(m, "server_cpu_ms_per_round"), _get(m, "client_cpu_ms_per_round")
        ks, kc = _get(k, "server_cpu_ms_per_round"), _get(k, "client_cpu_ms_per_round")
        line = [str(r["n"]), fmt(cs), fmt(cc), fmt(ms), fmt(mc)]
        if combined:
            line += [fmt(ks), fmt(kc)]
        if memory:
            line.append(fmt(_get(r.get("memory"), "server_cpu_ms_per_round")))
        line.append(fmt((cs + cc) / (ms + mc) if None not in (cs, cc, ms, mc) else None, ".0%"))
        if combined:
            line.append(fmt((cs + cc) / (ks + kc) if None not in (cs, cc, ks, kc) else None, ".0%"))
        per_round = sum(m["ledger_rows"].values()) / (m["rounds"] + 1) if m else None
        line += [fmt(_get(m, "orders_per_round")), fmt(per_round, ".0f")]
        body.append(line)
    out += _table(header, body)

    out += [
        "",
        "### Start-up and memory",
        "",
        f"A cold interpreter importing the CLI (`import controller.cli, controller.sim`, what `microte sim` "
        f"pays before `run_sim` starts): {cli_import:.2f} s (best of 3).",
        "",
    ]
    header = [
        "N",
        "server listening s",
        "all connected s",
        "first round done s",
        "run_sim start-up s",
        "server RSS idle MiB",
        "server peak RSS MiB",
        "server KiB / participant",
        "client process peak RSS MiB",
    ]
    body = []
    for r in rows:
        m, s = r["microte"], r["run_sim"]
        per = (m["server_rss_connected_kib"] - m["server_rss_idle_kib"]) / r["n"] if m else None
        body.append(
            [
                str(r["n"]),
                fmt(_get(m, "listening_seconds"), ".2f"),
                fmt(_get(m, "connected_seconds"), ".2f"),
                fmt(_get(m, "first_round_seconds"), ".2f"),
                fmt(_get(s, "startup_seconds"), ".2f"),
                fmt(m and m["server_rss_idle_kib"] / 1024, ".0f"),
                fmt(m and m["server_peak_rss_kib"] / 1024, ".0f"),
                fmt(per, ".0f"),
                fmt(m and m["client_peak_rss_kib"] / 1024, ".0f"),
            ]
        )
    out += _table(header, body)
    out += [
        "",
        "Notes: rounds/s counts the steady state only (the first round is in the start-up figures); p50/p99 are "
        "the `step` round trips the controller sees (of the `round.submit` run when there is one); "
        '"ratio" is microte\'s rounds/s over the default-settings '
        '(acknowledged) ceiling of the same N, "ratio to no-ack ceiling" over the 4-message bare round of '
        "issue 16 (start_round, bid, meter, settled; nothing acknowledged): microte's one-event round has 3 "
        "(round.start, round.submit and the acknowledgement every PROTOCOL.md event gets); "
        "the CPU ratio is the ceiling's server + client CPU per round over microte's. "
        '"server KiB / participant" is the server\'s RSS growth from idle to all clients connected, divided by N. '
        '"run_sim start-up" is `run_sim`\'s own figure (subprocess start to controller connected); "first round '
        "done\" counts from the subprocess start to the first `step` reply. The clients' process holds all N "
        "participant clients and the controller. A microte round with the v1 events carries more messages than "
        "the bare round (`settled` per fill and a `delivery` per participant besides the `start_round` broadcast, "
        "the `orders` and `meter` acks and the `step` reply); with `round.submit` / `round.start` it is 3 per "
        "participant (round.start: the round's start with the last step's fills and deliveries, "
        "round.submit + ack).",
    ]
    details = {str(r["n"]): r for r in rows}
    out += ["", "<details><summary>raw figures (JSON)</summary>", "", "```json", json.dumps(details, indent=1)]
    out += ["```", "", "</details>"]
    return "\n".join(out)


def write_section(path: Path, begin: str, end: str, text: str) -> None:
    """Replace the text between the markers (or append it), keeping the rest of the file."""
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.write_text(new)


def orchestrate(args: argparse.Namespace) -> int:
    here = str(Path(__file__).resolve())
    ceiling = str(Path(__file__).resolve().with_name("ceiling.py"))
    meta = machine()
    began = time.perf_counter()
    print(f"machine: {meta['platform']}, {meta['cpus']} CPUs, load {meta['load']}", file=sys.stderr)
    cli_import = cli_import_seconds()
    rows = []
    for n in args.n:
        row: dict[str, Any] = {"n": n}
        secs = str(args.ceiling_seconds)
        runs: dict[str, list[str]] = {"ceiling": [ceiling, "--n", str(n), "--seconds", secs, "--json"]}
        runs["bare4"] = [*runs["ceiling"], "--no-ack"]
        if args.fast_ceiling:
            runs["fast"] = [*runs["ceiling"], "--msgpack", "--uvloop"]
        runs["microte"] = [here, "--worker", "own", "--n", str(n), "--seconds", str(args.seconds)]
        if args.combined:
            runs["combined"] = [*runs["microte"], "--worker-combined"]
        runs["run_sim"] = [here, "--worker", "run_sim", "--n", str(n)]  # + --rounds of the first microte run
        if args.memory_ledger:
            runs["memory"] = [*runs["microte"], "--worker-ledger", "memory"]
        for _ in range(args.repeat):  # interleaved; the best run of each kind is kept
            for kind, cmd in runs.items():
                if kind == "run_sim":
                    m = row.get("microte")
                    cmd = [*cmd, "--rounds", str(m["rounds"] + 1 if m else 96)]
                result = child(cmd)
                best = row.get(kind)
                if result and (not best or result["rounds_per_second"] > best["rounds_per_second"]):
                    row[kind] = result
        for kind in runs:
            row.setdefault(kind, None)
        rows.append(row)
        c, m, s, k, b = row["ceiling"], row["microte"], row["run_sim"], row.get("combined"), row["bare4"]
        print(
            f"N={n}: ceiling {fmt(c and c['rounds_per_second'])} rounds/s "
            f"(no acks {fmt(b and b['rounds_per_second'])}), "
            f"microte {fmt(m and m['rounds_per_second'])}, round.submit {fmt(k and k['rounds_per_second'])} "
            f"(run_sim {fmt(s and s['rounds_per_second'])}), "
            f"p50/p99 {fmt(m and m['p50_ms'])}/{fmt(m and m['p99_ms'])} ms "
            f"[{time.perf_counter() - began:.0f} s]",
            file=sys.stderr,
        )
    fleet_rows = []
    for spec in args.fleet:
        n, fleets, rounds = (int(x) for x in spec.split(":"))
        result = child([here, "--worker", "fleet", "--n", str(n), "--fleets", str(fleets), "--rounds", str(rounds)])
        if result:
            fleet_rows.append(result)
            target = FLEET_TARGETS.get(n)
            print(
                f"fleet N={n} x{fleets}: {fmt(result['rounds_per_second'])} rounds/s"
                + (f" ({fmt(_ratio(result['rounds_per_second'], target), '.2f')} of {target:.0f})" if target else "")
                + f", missing {result['missing']}, same digest as in-process: {result['same_as_inproc']} "
                f"[{time.perf_counter() - began:.0f} s]",
                file=sys.stderr,
            )
    command = "python bench/sim.py" + (" " + shlex.join(args.argv) if args.argv else "")
    text = render(rows, meta, command, cli_import)
    if fleet_rows:
        text += "\n" + render_fleet(fleet_rows)
    if args.write:  # before printing: a closed stdout must not lose the run
        write_section(DOC, BEGIN, END, text)
        print(f"wrote {DOC.relative_to(_ROOT)}", file=sys.stderr)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[10, 50, 100], help="participants per run")
    p.add_argument("--seconds", type=float, default=5.0, help="microte stepping time per N (at least 20 rounds)")
    p.add_argument("--ceiling-seconds", type=float, default=3.0, help="ceiling stepping time per N")
    p.add_argument(
        "--fast-ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the ceiling with msgpack + uvloop (reference only)",
    )
    p.add_argument(
        "--memory-ledger",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run microte with the `memory:` ledger, to isolate the SQLite commit per round",
    )
    p.add_argument(
        "--combined",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run microte with `round.submit` / `round.start` (docs/protocol.md)",
    )
    p.add_argument("--worker-ledger", choices=["sqlite", "memory"], default="sqlite", help=argparse.SUPPRESS)
    p.add_argument("--worker-combined", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-rounds", type=int, default=5000, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=96, help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help="runs of each kind per N (interleaved); the best is kept")
    p.add_argument("--write", action="store_true", help=f"write the tables into {DOC.relative_to(_ROOT)}")
    p.add_argument(
        "--fleet",
        nargs="*",
        default=["1000:1:96", "10000:2:12"],
        metavar="N:K:ROUNDS",
        help="fleet-mode runs: participants, /fleet connections, rounds (none: leave fleet mode out)",
    )
    p.add_argument("--fleets", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["own", "run_sim", "fleet"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    # microte's side runs as `microte sim` runs it (`controller.runloop.run`: uvloop when
    # installed, as `make` installs it); the bare ceiling (bench/ceiling.py) on asyncio, as
    # issue 16 defines it.
    from controller import runloop

    if args.worker == "own":
        print(
            json.dumps(
                runloop.run(
                    own_loop(
                        args.n[0],
                        args.seconds,
                        args.max_rounds,
                        args.worker_ledger == "memory",
                        combined=args.worker_combined,
                    )
                )
            )
        )
        return 0
    if args.worker == "run_sim":
        print(json.dumps(runloop.run(via_run_sim(args.n[0], args.rounds))))
        return 0
    if args.worker == "fleet":
        print(json.dumps(runloop.run(fleet_run(args.n[0], args.fleets, args.rounds))))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
