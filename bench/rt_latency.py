"""rt bid acknowledgement latency: microte against a bare python-socketio acked echo server,
measured in the same run with the same clients.

    python bench/rt_latency.py [--seconds 20] [--participants 100] [--rate 10] [--processes 4]
                               [--servers bare ack round] [--boundary avoid|inside] [--profile DIR]

Servers, each a subprocess on an ephemeral port, one after the other:

- `bare`: a minimal python-socketio `AsyncServer` on aiohttp (default serializer, asyncio,
  no uvloop; `async_handlers=False` as microte) with a `/market` namespace that accepts any
  auth and answers each `bid` with `{"ok": true, "entry": {...}}` echoing the bid, the
  shape of microte's reply; nothing else (`--serve-bare`: this file runs it).
- `ack` / `round`: `microte market --mode rt --duration 60 --durability ack|round` with a
  SQLite ledger in a temporary directory and a registry of `--participants` prosumers.

Load, the same for each server: the participants are spread over `--processes` client
processes (multiprocessing, spawn), each participant one socket.io connection (websocket)
sending `--rate` bids a second for `--seconds`, open loop on a fixed schedule (the
participants' phases spread evenly over one period), each bid for the 60 s slot 4 slots
ahead of the wall clock, quantity 10, price 0.2, a distinct client `id`. Each client
records the time from emit to acknowledgement (taken in the ack callback); the parent
reports p50, p99, max and count per server and the ratios microte/bare.

A 60 s slot boundary (gate closure: the round opens, and with `round` durability the
entries since the last round are written) falls inside a 20 s window a third of the time;
`--boundary avoid` (default) starts microte's window so that it ends before the next
boundary (waiting for one if needed), `--boundary inside` puts one in the middle.
`--profile DIR` records py-spy (collapsed stacks, `--nonblocking`) of each microte server
during its window. Prints figures; never asserts (DESIGN.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import resource
import selectors
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path and bench/ledger.py would
# shadow the `ledger` package: put the project root there instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench")]

import socketio  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

BARE_LISTENING = "bare listening on "
MICROTE_LISTENING = "microte market listening on "  # controller.sim.LISTENING
D = 60  # slot duration (s)
AHEAD = 4  # bids are for the slot this many slots ahead of the wall clock (next_settle is 2 ahead)


def percentile(values: Any, p: float) -> float:
    """Nearest-rank percentile (p in [0, 100]); nan for no values."""
    if not len(values):
        return math.nan
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)])


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def all_cpu() -> dict[int, float]:
    """CPU seconds of every process now running (pid -> user + system)."""
    return {int(e.name): proc_cpu(int(e.name)) for e in Path("/proc").iterdir() if e.name.isdigit()}


def others_cpu(before: dict[int, float], after: dict[int, float], ours: set[int]) -> float:
    """CPU seconds other processes used between two `all_cpu()` snapshots (processes that
    exited in between are missed: a lower bound)."""
    return sum(max(0.0, c - before.get(pid, 0.0)) for pid, c in after.items() if pid not in ours)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- the bare server (subprocess: --serve-bare) -----------------------------------------------


def serve_bare() -> None:
    import signal

    from aiohttp import web

    sio = socketio.AsyncServer(async_mode="aiohttp", async_handlers=False)
    pid_of: dict[str, str] = {}

    async def on_connect(sid: str, _environ: Any, auth: Any = None) -> None:
        pid_of[sid] = str((auth or {}).get("id", sid)) if isinstance(auth, dict) else sid

    async def on_disconnect(sid: str, *_: Any) -> None:
        pid_of.pop(sid, None)

    async def on_bid(sid: str, data: Any) -> dict[str, Any]:
        return {
            "ok": True,
            "entry": {
                "uuid": f"{pid_of.get(sid, sid)}.{data.get('id')}",
                "id": data.get("id"),
                "side": "bid",
                "quantity": data.get("quantity"),
                "price": data.get("price"),
                "time_delivery": data.get("time_delivery"),
                "source": data.get("source"),
                "time_submission": int(time.time()) // D * D,
            },
        }

    sio.on("connect", on_connect, namespace="/market")
    sio.on("disconnect", on_disconnect, namespace="/market")
    sio.on("bid", on_bid, namespace="/market")

    async def main() -> None:
        app = web.Application()
        sio.attach(app)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"{BARE_LISTENING}http://127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


# -- the clients (one process per group of participants) --------------------------------------


def client_main(conn: mpc.Connection, url: str, ids: list[str], phases: list[float], rate: float) -> None:
    """A client process: connect `ids`, report ready, wait for (start epoch, seconds), send,
    send back the latencies (ms, array of doubles as bytes) and counters."""
    from controller import runloop

    runloop.run(_clients(conn, url, ids, phases, rate))


async def _clients(conn: mpc.Connection, url: str, ids: list[str], phases: list[float], rate: float) -> None:
    from market.core import wire

    loop = asyncio.get_running_loop()
    clients = [socketio.AsyncClient(reconnection=False, serializer=wire.serializer("json")) for _ in ids]
    await asyncio.gather(
        *(
            c.connect(
                url,
                namespaces=["/market"],
                auth={"id": pid, "token": "t" + pid.removeprefix("P")},
                transports=["websocket"],
                wait_timeout=30,
            )
            for c, pid in zip(clients, ids, strict=True)
        )
    )
    conn.send(("ready", len(clients)))
    start_epoch, seconds, warmup = await loop.run_in_executor(None, conn.recv)
    t0 = loop.time() + (start_epoch - time.time())  # the measured window starts here
    end = t0 + seconds
    period = 1 / rate
    latencies = array("d")
    lag = array("d")  # how late each emit left against its schedule (client saturation)
    refused: list[Any] = []
    outstanding: set[str] = set()
    all_acked = asyncio.Event()
    all_acked.set()

    async def participant(sio: socketio.AsyncClient, pid: str, phase: float) -> None:
        k = 0
        first = -math.ceil(warmup * rate)  # warm-up bids (before t0) are sent but not recorded
        while (due := t0 + phase + (first + k) * period) < end:
            measured = due >= t0
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if measured:
                lag.append((loop.time() - due) * 1000)
            slot = (int(time.time()) // D + AHEAD) * D
            bid_id = f"{pid}-{k}"
            bid = {"quantity": 10, "price": 0.2, "time_delivery": [slot, slot + D], "id": bid_id}
            outstanding.add(bid_id)
            all_acked.clear()
            sent = time.perf_counter()

            def ack(*reply: Any, sent: float = sent, bid_id: str = bid_id, measured: bool = measured) -> None:
                if measured:
                    latencies.append((time.perf_counter() - sent) * 1000)
                r = reply[0] if reply else None
                if measured and not (isinstance(r, dict) and r.get("ok")):
                    refused.append(r)
                outstanding.discard(bid_id)
                if not outstanding:
                    all_acked.set()

            await sio.emit("bid", bid, namespace="/market", callback=ack)
            k += 1

    cpu0 = [_self_cpu()]

    async def mark() -> None:  # this process's CPU is counted from the window's start
        await asyncio.sleep(max(0.0, t0 - loop.time()))
        cpu0[0] = _self_cpu()

    await asyncio.gather(mark(), *(participant(c, pid, ph) for c, pid, ph in zip(clients, ids, phases, strict=True)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_acked.wait(), 10)
    cpu = _self_cpu() - cpu0[0]
    conn.send(
        {
            "latencies": latencies.tobytes(),
            "lag": lag.tobytes(),
            "unacked": len(outstanding),
            "refused": len(refused),
            "first_refusal": refused[0] if refused else None,
            "cpu": cpu,
        }
    )
    await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- the parent -------------------------------------------------------------------------------


def start_server(cmd: list[str], prefix: str, log: Path, timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server subprocess and read its URL from the first stdout line with `prefix`."""
    proc = subprocess.Popen(cmd, cwd=_ROOT, stdout=subprocess.PIPE, stderr=log.open("wb"))
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{cmd[:4]} did not listen within {timeout} s")
            line = proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(
                    f"the server exited (code {proc.wait()}) before listening: {log.read_text()[-2000:]}"
                )
            if line.startswith(prefix):
                return proc, line.removeprefix(prefix).strip()
    except BaseException:
        stop_server(proc)
        raise
    finally:
        sel.close()


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def window_start(seconds: float, warmup: float, boundary: str | None) -> float:
    """The wall-clock start of the load window (`boundary`: None for the bare server)."""
    start = time.time() + 1.0 + warmup
    if boundary == "inside":  # the first boundary at least half a window away, in the middle
        return math.ceil((start + seconds / 2) / D) * D - seconds / 2
    if boundary == "avoid":
        nxt = ((start - warmup) // D + 1) * D
        if start + seconds + 1.0 > nxt:  # would cross it: warm up just after it (the round is open)
            return nxt + 2.0 + warmup
    return start


def measure(
    name: str, url: str, server_pid: int, args: argparse.Namespace, boundary: str | None, profile: Path | None
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ids = [f"P{i}" for i in range(args.participants)]
    period = 1 / args.rate
    phases = {pid: i / len(ids) * period for i, pid in enumerate(ids)}
    groups = [ids[k :: args.processes] for k in range(args.processes)]
    pipes, procs = [], []
    for group in groups:
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=client_main, args=(child, url, group, [phases[i] for i in group], args.rate), daemon=True
        )
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        for conn in pipes:
            if not conn.poll(60):
                raise RuntimeError(f"{name}: a client process did not connect within 60 s")
            tag, _n = conn.recv()
            assert tag == "ready", tag
        start = window_start(args.seconds, args.warmup, boundary)
        for conn in pipes:
            conn.send((start, args.seconds, args.warmup))
        time.sleep(max(0.0, start - time.time()))
        load0, cpu0, snap0 = loadavg(), proc_cpu(server_pid), all_cpu()
        writes0 = group_writes(url) if name != "bare" else None
        spy = None
        if profile is not None and shutil.which("py-spy", path=str(Path(sys.executable).parent)):
            profile.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-r",
                    "200",
                    "-d",
                    str(int(args.seconds)),
                    "-p",
                    str(server_pid),
                    "-o",
                    str(profile / f"{name}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(args.seconds)
        cpu, snap1 = proc_cpu(server_pid) - cpu0, all_cpu()
        writes1 = group_writes(url) if name != "bare" else None
        ours = {os.getpid(), server_pid, *(p.pid for p in procs if p.pid is not None)}
        if spy is not None:
            ours.add(spy.pid)
        others = others_cpu(snap0, snap1, ours)
        results = []
        for conn in pipes:
            if not conn.poll(60):
                raise RuntimeError(f"{name}: a client process did not report within 60 s")
            results.append(conn.recv())
        load1 = loadavg()
        if spy is not None:
            spy.wait(60)
    finally:
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()
    latencies, lag = array("d"), array("d")
    for r in results:
        latencies.frombytes(r["latencies"])
        lag.frombytes(r["lag"])
    return {
        "name": name,
        "count": len(latencies),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies, default=math.nan),
        "refused": sum(r["refused"] for r in results),
        "first_refusal": next((r["first_refusal"] for r in results if r["first_refusal"] is not None), None),
        "unacked": sum(r["unacked"] for r in results),
        "server_cpu": cpu / args.seconds,
        "client_cpu": sum(r["cpu"] for r in results) / args.seconds,
        "others_cpu": others / args.seconds,
        "lag_p99": percentile(lag, 99),
        "load": f"{load0} -> {load1}",
        "window": time.strftime("%H:%M:%S", time.localtime(start)),
        "writes": writes_summary(writes0, writes1, args.seconds),
        "boundary": "-" if boundary is None else "yes" if start // D != (start + args.seconds) // D else "no",
    }


def group_writes(url: str) -> tuple[float, float] | None:
    """(group commits, seconds spent in them) so far, from the server's GET /metrics."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    try:
        return values["microte_ledger_commits_total"], values["microte_ledger_commit_seconds_total"]
    except KeyError:
        return None


def writes_summary(a: tuple[float, float] | None, b: tuple[float, float] | None, seconds: float) -> str:
    if a is None or b is None or b[0] <= a[0]:
        return "-"
    n = b[0] - a[0]
    return f"{n / seconds:.0f}/s, {(b[1] - a[1]) / n * 1000:.2f} ms"


def fsync_probe(directory: Path, n: int = 200) -> tuple[float, float]:
    """p50/p99 (ms) of a one-row commit to SQLite in WAL mode with synchronous=FULL (the
    ledger's settings) on the disk the benchmark's ledger uses."""
    db = sqlite3.connect(directory / "probe.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("create table t (k integer primary key, v text)")
    times = []
    for i in range(n):
        t = time.perf_counter()
        db.execute("begin")
        db.execute("insert into t values (?, ?)", (i, "x" * 200))
        db.execute("commit")
        times.append((time.perf_counter() - t) * 1000)
    db.close()
    return percentile(times, 50), percentile(times, 99)


def main(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        registry = tmp / "registry.toml"
        registry.write_text(
            "".join(
                f'[[participants]]\nid = "P{i}"\ntoken = "t{i}"\nrole = "prosumer"\n' for i in range(args.participants)
            )
        )
        commit_p50, commit_p99 = fsync_probe(tmp)
        for name in args.servers:
            if name == "bare":
                cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-bare"]
                prefix, boundary = BARE_LISTENING, None
            else:
                cmd = [
                    sys.executable,
                    "-m",
                    "controller",
                    "market",
                    "--mode",
                    "rt",
                    "--duration",
                    str(D),
                    "--registry",
                    str(registry),
                    "--ledger",
                    f"sqlite:///{tmp}/{name}.db",
                    "--durability",
                    name,
                    "--port",
                    "0",
                    "--log-level",
                    "WARNING",
                ]
                prefix, boundary = MICROTE_LISTENING, args.boundary
            proc, url = start_server(cmd, prefix, tmp / f"{name}.log")
            try:
                rows.append(measure(name, url, proc.pid, args, boundary, args.profile))
            finally:
                stop_server(proc)
            print(f"  {name}: {rows[-1]['count']} bids, p50 {rows[-1]['p50']:.2f} ms", file=sys.stderr, flush=True)
    report(rows, args, (commit_p50, commit_p99))


def report(rows: list[dict[str, Any]], args: argparse.Namespace, commit: tuple[float, float]) -> None:
    cmd = " ".join(["python bench/rt_latency.py", *([shlex.join(args.argv)] if args.argv else [])])
    print(
        f"# rt bid acknowledgement latency ({platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')})\n"
    )
    print(
        f"{args.participants} participants x {args.rate:g} bids/s for {args.seconds:g} s, "
        f"{args.processes} client processes; `{cmd}`\n"
    )
    print(
        "| server | bids | p50 ms | p99 ms | max ms | refused / unacked | server CPU | clients CPU "
        "| other processes' CPU "
        "| client emit lag p99 ms | group commits (rate, mean) | window (boundary inside?) "
        "| load avg (1/5/15 min) before -> after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    label = {"bare": "bare python-socketio acked echo", "ack": "microte `--durability ack`"}
    label["round"] = "microte `--durability round`"
    for r in rows:
        print(
            f"| {label.get(r['name'], r['name'])} | {r['count']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.1f} "
            f"| {r['refused']} / {r['unacked']} | {r['server_cpu']:.0%} | {r['client_cpu']:.0%} "
            f"| {r['others_cpu']:.0%} "
            f"| {r['lag_p99']:.2f} | {r['writes']} | {r['window']} ({r['boundary']}) | {r['load']} |"
        )
    by = {r["name"]: r for r in rows}
    targets = {"ack": 3.0, "round": 1.2}
    if "bare" in by and any(n in by for n in targets):
        bare = by["bare"]
        print("\n| microte / bare | p50 | p99 | target (p99) | met? |")
        print("|---|---|---|---|---|")
        for n, limit in targets.items():
            if n in by:
                p50, p99 = by[n]["p50"] / bare["p50"], by[n]["p99"] / bare["p99"]
                print(
                    f"| `{n}` | {p50:.2f}x | {p99:.2f}x | <= {limit}x | {'**met**' if p99 <= limit else '**missed**'} |"
                )
    print(
        f"\nSQLite one-row commit (WAL, synchronous=FULL) on the ledger's disk: p50 {commit[0]:.2f} ms, "
        f"p99 {commit[1]:.2f} ms"
    )
    for r in rows:
        if r["first_refusal"] is not None:
            print(f"first refusal ({r['name']}): {r['first_refusal']}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-bare"]:
        serve_bare()
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--participants", type=int, default=100)
    p.add_argument("--rate", type=float, default=10.0, help="bids per second per participant")
    p.add_argument("--processes", type=int, default=4, help="client processes")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of the same load before the window, not recorded")
    p.add_argument("--servers", nargs="+", choices=["bare", "ack", "round"], default=["bare", "ack", "round"])
    p.add_argument(
        "--boundary", choices=["avoid", "inside"], default="avoid", help="a 60 s slot boundary in the window"
    )
    p.add_argument("--profile", type=Path, help="py-spy collapsed stacks of each microte server into this directory")
    ns = p.parse_args()
    ns.argv = sys.argv[1:]
    main(ns)
