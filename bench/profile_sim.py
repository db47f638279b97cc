"""Where a full microte round spends its CPU: cProfile of the server and of the clients.

    python bench/profile_sim.py [--n 50] [--rounds 150] [--top 25] [--out DIR] [--write]

Runs what `microte sim` runs (`microte market` in a subprocess, a `Fleet` of N real
clients and a controller here) twice for `--rounds` rounds:

1. without a profiler, timing the phases of the server's round by wrapping (in the
   subprocess only, nothing is edited) `MarketServer.step/_announce/_await_readings/
   _finish/_deliver`, `Market.open_round/process` and the ledger's `DatasetSink.write`;
2. with cProfile on the server's event loop thread (the subprocess imports the CLI
   first, then profiles `microte market` until SIGTERM) and on this process (the clients
   and the controller) while the rounds are stepped. cProfile's clock is the wall clock
   (a CPU clock costs a system call per event and distorts far more): the time spent
   waiting in `epoll.poll` is idle and is left out of the totals. The ledger's writer
   thread is not seen by cProfile: its CPU is read per thread from /proc.

Prints, per side, CPU grouped by component (socket.io/engine.io, aiohttp, json, msgspec,
market/, participants/, ledger/, ...), the top functions by own time and our own code by
cumulative time; the .prof files stay in `--out` for `python -m pstats`. Also the slowest
imports of the CLI (`python -X importtime`), which bound the start-up. cProfile inflates
the cost of every call (about 2x, more for small ones): read it for shares, not rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import inspect
import io
import json
import os
import pstats
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench")]

from bench.ceiling import percentile, proc_cpu  # noqa: E402

SCENARIO = _ROOT / "scenarios" / "community.toml"
LISTENING = "microte market listening on "

# (component, substring of the function's file) in match order
COMPONENTS = [
    ("socketio", "/socketio/"),
    ("engineio", "/engineio/"),
    ("aiohttp", "/aiohttp/"),
    ("json (stdlib)", "/json/"),
    ("msgspec", "msgspec"),
    ("asyncio", "/asyncio/"),
    ("sqlalchemy/dataset", "/sqlalchemy/"),
    ("sqlalchemy/dataset", "/dataset/"),
    ("numpy", "/numpy/"),
    ("tqdm", "/tqdm/"),
    ("logging", "/logging/"),
    ("market/", "/market/"),
    ("participants/", "/participants/"),
    ("ledger/", "/ledger/"),
    ("controller/", "/controller/"),
    ("bench/", "/bench/"),
]


def component(filename: str, func: str) -> str:
    for name, needle in COMPONENTS:
        if needle in filename:
            return name
    if filename == "~":
        # C functions: cProfile names them like "<method 'send' of '_socket.socket' objects>"
        if "socket" in func or "select" in func or "epoll" in func:
            return "socket syscalls (send, recv, epoll)"
        if "json" in func:
            return "json (stdlib)"
        if "msgspec" in func:
            return "msgspec"
        return "builtins (C)"
    return "other Python"


def summarize(stats: pstats.Stats, top: int, rounds: int, title: str) -> str:
    raw: dict[Any, Any] = {k: v for k, v in stats.stats.items() if not _idle(k)}  # type: ignore[attr-defined]
    idle = sum(v[2] for k, v in stats.stats.items() if _idle(k))  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    by: dict[str, float] = defaultdict(float)
    for (filename, _line, func), (_cc, _nc, tt, _ct, _callers) in raw.items():
        by[component(filename, func)] += tt
    out = [
        f"#### {title}: {total:.2f} s busy ({total / rounds * 1000:.1f} ms/round), {idle:.2f} s idle in epoll",
        "",
    ]
    out.append("| component | own time s | share | ms/round |")
    out.append("|---|---:|---:|---:|")
    for name, tt in sorted(by.items(), key=lambda kv: -kv[1]):
        out.append(f"| {name} | {tt:.2f} | {tt / total:.0%} | {tt / rounds * 1000:.2f} |")
    out += ["", f"Top {top} functions by own time (calls per round, own ms/round, cumulative ms/round):", ""]
    out.append("| function | calls/round | own ms/round | cum ms/round |")
    out.append("|---|---:|---:|---:|")
    rows = sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in rows:
        where = _short(filename)
        label = f"{where}:{line}({func})" if filename != "~" else func
        out.append(f"| `{label}` | {nc / rounds:.1f} | {tt / rounds * 1000:.2f} | {ct / rounds * 1000:.2f} |")
    return "\n".join(out)


def _idle(key: tuple[str, int, str]) -> bool:
    return key[0] == "~" and "poll" in key[2] and "epoll" in key[2]


def cumulative(stats: pstats.Stats, pattern: str, rounds: int, limit: int = 20) -> str:
    """Cumulative time of the functions whose file:func matches `pattern` (our own code)."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rx = re.compile(pattern)
    rows = [
        (f"{_short(f)}:{ln}({fn})", nc, ct)
        for (f, ln, fn), (_cc, nc, _tt, ct, _c) in raw.items()
        if rx.search(f"{f}:{fn}")
    ]
    rows.sort(key=lambda r: -r[2])
    out = ["| function | calls/round | cum ms/round |", "|---|---:|---:|"]
    for label, nc, ct in rows[:limit]:
        out.append(f"| `{label}` | {nc / rounds:.1f} | {ct / rounds * 1000:.2f} |")
    return "\n".join(out)


def _short(filename: str) -> str:
    for marker in ("/site-packages/", str(_ROOT) + "/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def thread_cpu(pid: int) -> dict[int, float]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


# -- the server (subprocess) -----------------------------------------------------------------


def _install_phase_timers(phases: dict[str, list[float]]) -> None:
    """Wrap the server's round phases with wall-clock timers (this process only)."""
    import market.core.engine
    import market.server.app

    def wrap(cls: Any, name: str, key: str) -> None:
        orig = getattr(cls, name, None)
        if orig is None:
            return
        if inspect.iscoroutinefunction(orig):

            @functools.wraps(orig)
            async def timed_async(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await orig(*a, **k)
                finally:
                    phases[key].append(time.perf_counter() - t)

            setattr(cls, name, timed_async)
        else:

            @functools.wraps(orig)
            def timed(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    phases[key].append(time.perf_counter() - t)

            setattr(cls, name, timed)
        phases.setdefault(key, [])  # report in this order

    server = market.server.app.MarketServer
    wrap(server, "step", "step (whole round in the server)")
    wrap(market.core.engine.Market, "open_round", "· Market.open_round (close + clear slots)")
    wrap(server, "_announce", "· _announce (emit settled + start_round)")
    wrap(server, "_await_readings", "· _await_readings (clients' work + their orders/meters)")
    wrap(server, "_finish", "· _finish (process + ledger + deliveries)")
    wrap(market.core.engine.Market, "process", "· · Market.process (energy exchange)")
    with contextlib.suppress(ImportError):
        from ledger.dataset_sink import DatasetSink

        wrap(DatasetSink, "write", "· · DatasetSink.write (until committed)")
    wrap(server, "_deliver", "· · _deliver (emit delivery)")


WHATIF_ENV = "MICROTE_BENCH_WHATIF"
WHATIFS = ("fastjson", "uvloop")


@contextlib.contextmanager
def what_if(names: Collection[str]) -> Iterator[None]:
    """Changes tried on a running microte without editing it, undone on exit:
    fastjson: python-socketio's JSON packets replaced by bench.ceiling.FastJsonPacket
    (msgspec, no binary scan; same wire format) in every AsyncServer/AsyncClient made
    with the default serializer; uvloop: the uvloop event loop policy."""
    import socketio

    from bench.ceiling import FastJsonPacket

    saved = {cls: cls.__init__ for cls in (socketio.AsyncServer, socketio.AsyncClient)}
    policy = asyncio.get_event_loop_policy()
    try:
        if "fastjson" in names:
            for cls, init in saved.items():

                def patched(self: Any, *a: Any, _init: Any = init, **k: Any) -> None:
                    if k.get("serializer", "default") == "default":
                        k["serializer"] = FastJsonPacket
                    _init(self, *a, **k)

                cls.__init__ = patched
        if "uvloop" in names:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        yield
    finally:
        for cls, init in saved.items():
            cls.__init__ = init
        asyncio.set_event_loop_policy(policy)


def serve_profiled(out: str, mode: str, argv: list[str]) -> int:
    """`microte market` with phase timers, and with cProfile if mode is 'cprofile'."""
    from controller.cli import main  # imports happen before the profiler starts

    whatif = set(filter(None, os.environ.get(WHATIF_ENV, "").split(",")))
    if whatif:
        with what_if(whatif):
            return _serve(main, out, mode, argv)
    return _serve(main, out, mode, argv)


def _serve(main: Any, out: str, mode: str, argv: list[str]) -> int:

    phases: dict[str, list[float]] = defaultdict(list)
    _install_phase_timers(phases)
    prof = cProfile.Profile() if mode == "cprofile" else None
    if prof:
        prof.enable()
    try:
        return int(main(["market", *argv]))
    finally:
        if prof:
            prof.disable()
            prof.dump_stats(out)
        Path(out + ".phases.json").write_text(json.dumps(phases))


@contextlib.asynccontextmanager
async def profiled_market(
    out: Path,
    mode: str,
    args: list[str],
    whatif: Collection[str] = (),
) -> AsyncIterator[tuple[str, int, dict[str, float]]]:
    """Like controller.sim.market_process, with the server instrumented; yields (url, pid,
    and a dict filled at the end with the server's main/other-thread CPU seconds)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve-profiled",
        str(out),
        mode,
        "--",
        *args,
        stdout=subprocess.PIPE,
        env={**os.environ, WHATIF_ENV: ",".join(sorted(whatif))},
    )
    assert proc.stdout is not None
    threads: dict[str, float] = {}
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"the market server exited (code {await proc.wait()}) before listening")
                if line.startswith(LISTENING):
                    break
        yield line.removeprefix(LISTENING).strip(), proc.pid, threads
    finally:
        if proc.returncode is None:
            cpu = thread_cpu(proc.pid)
            threads["main"] = cpu.pop(proc.pid, 0.0)
            threads["other threads"] = sum(cpu.values())
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 60)


class Run:
    def __init__(self, server_prof: Path, client_prof: Path | None) -> None:
        self.server_prof = server_prof
        self.client_prof = client_prof
        self.threads: dict[str, float] = {}
        self.seconds = 0.0
        self.server_cpu = 0.0
        self.client_cpu = 0.0
        self.steps: list[float] = []

    @property
    def phases(self) -> dict[str, list[float]]:
        path = Path(str(self.server_prof) + ".phases.json")
        for _ in range(100):  # the server writes it as it exits
            if path.exists():
                return dict(json.loads(path.read_text()))
            time.sleep(0.1)
        return {}


async def profile_run(n: int, rounds: int, outdir: Path, mode: str, whatif: Collection[str] = ()) -> Run:
    import msgspec
    import socketio

    from bench.ceiling import self_cpu
    from controller.scenario import community, load_scenario
    from controller.sim import CONTROLLER_ID, write_registry
    from participants.fleet import Fleet

    scenario = load_scenario(SCENARIO)
    scenario = msgspec.structs.replace(scenario, days=(rounds + 0.5) * scenario.step / 86400)
    specs = community(scenario, n)
    tokens = {s.id: secrets.token_urlsafe(18) for s in specs} | {CONTROLLER_ID: secrets.token_urlsafe(18)}
    run = Run(outdir / f"server-{mode}.prof", outdir / "clients.prof" if mode == "cprofile" else None)
    with tempfile.TemporaryDirectory(prefix="microte-profile-") as tmp:
        registry = Path(tmp) / "registry.toml"
        write_registry(registry, tokens)
        args = [
            *("--registry", str(registry), "--scenario", str(SCENARIO), "--port", "0"),
            *("--ledger", f"sqlite:///{Path(tmp) / 'ledger.db'}", "--mode", "sim", "--log-level", "WARNING"),
        ]
        async with profiled_market(run.server_prof, mode, args, whatif) as (url, pid, threads):
            members = [(s, tokens[s.id]) for s in specs]
            fleet = Fleet(url, members, scenario.seed, timezone=scenario.timezone, base_dir=SCENARIO.parent)
            async with fleet:
                ctl = socketio.AsyncClient(reconnection=False)
                await ctl.connect(
                    url,
                    namespaces=["/simulation"],
                    transports=["websocket"],
                    auth={"id": CONTROLLER_ID, "token": tokens[CONTROLLER_ID]},
                )
                prof = cProfile.Profile() if run.client_prof else None
                cpu_s, cpu_c = proc_cpu(pid), self_cpu()
                t0 = time.perf_counter()
                if prof:
                    prof.enable()
                for i in range(scenario.rounds):
                    t = scenario.start_time + i * scenario.step
                    t1 = time.perf_counter()
                    reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=60)
                    run.steps.append(time.perf_counter() - t1)
                    if not reply.get("ok"):
                        raise RuntimeError(f"step {t} refused: {reply}")
                if prof and run.client_prof:
                    prof.disable()
                    prof.dump_stats(run.client_prof)
                run.seconds = time.perf_counter() - t0
                run.server_cpu, run.client_cpu = proc_cpu(pid) - cpu_s, self_cpu() - cpu_c
                await ctl.disconnect()
        run.threads = threads
    return run


def phase_table(run: Run, rounds: int) -> str:
    out = ["| phase (server, wall clock) | calls/round | mean ms | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    for name, values in run.phases.items():
        if not values:
            continue
        out.append(
            f"| {name} | {len(values) / rounds:.2f} | {sum(values) / len(values) * 1000:.2f} "
            f"| {percentile(values, 50) * 1000:.2f} | {percentile(values, 99) * 1000:.2f} |"
        )
    steps = run.steps[1:] or run.steps
    out.append(
        f"| controller `step` round trip (client side) | 1.00 | {sum(steps) / len(steps) * 1000:.2f} "
        f"| {percentile(steps, 50) * 1000:.2f} | {percentile(steps, 99) * 1000:.2f} |"
    )
    return "\n".join(out)


def slowest_imports(limit: int = 15) -> str:
    """Top-level packages by the cumulative time of their first import, and our modules."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import controller.cli, controller.sim"],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((int(m.group(2)), (len(m.group(3)) - 1) // 2, m.group(4)))
    total = sum(us for us, depth, _ in rows if depth == 0)
    ours = ("market", "participants", "controller", "ledger")
    packages = [r for r in rows if "." not in r[2] and not r[2].startswith("_") and r[2] not in ours]
    own = [r for r in rows if r[2].split(".")[0] in ours and r[2].count(".") == 1]
    out = [f"Cold `import controller.cli, controller.sim`: {total / 1e6:.2f} s of import time.", ""]
    out += ["| third-party / stdlib package (first import) | cumulative ms |", "|---|---:|"]
    out += [f"| {name} | {us / 1000:.0f} |" for us, _, name in sorted(packages, key=lambda r: -r[0])[:limit]]
    out += ["", "| microte module | cumulative ms |", "|---|---:|"]
    out += [f"| {name} | {us / 1000:.0f} |" for us, _, name in sorted(own, key=lambda r: -r[0])[:limit]]
    return "\n".join(out)


def variants(n: int, rounds: int, outdir: Path, base: Run) -> str:
    """The same rounds with each what-if change (server and clients), no profiler."""
    out = [
        "### What if (no profiler; changes applied by patching at run time, see `what_if`)",
        "",
        "| variant | rounds/s | step p50 ms | step p99 ms | server CPU ms/round | clients CPU ms/round |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    combos = [set(), *({w} for w in WHATIFS), set(WHATIFS)]
    for combo in combos:
        if combo:
            with what_if(combo):
                run = asyncio.run(profile_run(n, rounds, outdir, "phases", combo))
        else:
            run = base
        steps = run.steps[1:]
        out.append(
            f"| {' + '.join(sorted(combo)) or 'as is'} | {rounds / run.seconds:.1f} | "
            f"{percentile(steps, 50) * 1000:.1f} | {percentile(steps, 99) * 1000:.1f} | "
            f"{run.server_cpu / rounds * 1000:.1f} | {run.client_cpu / rounds * 1000:.1f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-profiled"]:
        return serve_profiled(argv[1], argv[2], argv[4:])
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, help="keep the .prof files here (default: a temp dir)")
    p.add_argument("--write", action="store_true", help="also put the report into docs/benchmarks-sim.md")
    p.add_argument(
        "--variants",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run with FastJsonPacket and/or uvloop patched in (what-if, no code edited)",
    )
    args = p.parse_args(argv)
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        _profile(args)
    text = report.getvalue().rstrip()
    print(text)
    if args.write:
        from bench.sim import DOC, machine, write_section

        command = "python bench/profile_sim.py" + (" " + shlex.join(argv) if argv else "")
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        meta = machine()
        text = text.replace(
            "\n",
            f"\n\nCommand: `{command}`; {stamp}; commit {meta['commit']}; load average {meta['load']}\n",
            1,
        )
        write_section(DOC, "<!-- bench/profile_sim.py:begin -->", "<!-- bench/profile_sim.py:end -->", text)
    return 0


def _profile(args: argparse.Namespace) -> None:
    outdir = args.out or Path(tempfile.mkdtemp(prefix="microte-prof-"))
    outdir.mkdir(parents=True, exist_ok=True)
    r = args.rounds
    plain = asyncio.run(profile_run(args.n, r, outdir, "phases"))
    print(f"## Where a microte round goes: N={args.n}, {r} rounds, SQLite ledger")
    print()
    print(
        f"### Round phases, no profiler: {r / plain.seconds:.1f} rounds/s; CPU per round: server "
        f"{plain.server_cpu / r * 1000:.1f} ms, clients + controller {plain.client_cpu / r * 1000:.1f} ms"
    )
    print()
    print(phase_table(plain, r))
    print()
    if args.variants:
        print(variants(args.n, r, outdir, plain))
        print()
    prof = asyncio.run(profile_run(args.n, r, outdir, "cprofile"))
    assert prof.client_prof is not None
    buf = io.StringIO()
    print(f"### Under cProfile: {r / prof.seconds:.1f} rounds/s")
    print()
    print(
        f"Server process CPU while stepping: {prof.server_cpu / r * 1000:.1f} ms/round; over its whole life the "
        f"event loop thread used {prof.threads.get('main', 0):.2f} s and the other threads (ledger writer, "
        f"executors) {prof.threads.get('other threads', 0):.2f} s."
    )
    print()
    server = pstats.Stats(str(prof.server_prof), stream=buf)
    print(summarize(server, args.top, r, "Server (`microte market`, event loop thread)"))
    print()
    print("Our server code, cumulative (busy time):")
    print()
    print(cumulative(server, r"/(market|ledger)/", r))
    print()
    clients = pstats.Stats(str(prof.client_prof), stream=buf)
    print(summarize(clients, args.top, r, f"Clients ({args.n} ParticipantClients + controller, one process)"))
    print()
    print("Our client code, cumulative (busy time):")
    print()
    print(cumulative(clients, r"/participants/", r))
    print()
    print("### Start-up: slowest imports")
    print()
    print(slowest_imports())
    print()
    print(f"profiles: {prof.server_prof} {prof.client_prof}  (python -m pstats FILE)", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
