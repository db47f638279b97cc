"""The bare python-socketio round: the physical limit microte's round is measured against.

    python bench/ceiling.py [--n 10 50 100 500] [--seconds 3] [--msgpack | --fastjson] [--uvloop] [--no-ack] [--json]

One round has microte's shape (issue 5) and nothing else: the controller calls `step` on
`/simulation`; the server broadcasts `start_round` on `/market`; every client answers with
one acknowledged `bid` and one acknowledged `meter` (sent back to back, both awaited, as
participants/client.py does); once the server has every meter it sends one private
`settled` to each client and replies to `step`. No validation, no matching, no ledger.
That is 6 messages per participant (start_round, bid + ack, meter + ack, settled).
`--no-ack` is the bare round of issue 16, 4 messages: the bid and the meter go without an
acknowledgement (the server still counts the meters before it answers `step`).
Payloads have the size of microte's (a start_round of ~570 bytes, a bid of ~110, a
meter of ~120, a settled of ~180, replies as the market's).

The server runs in a subprocess (`--serve`, as `microte sim` runs `microte market`), the
clients and the controller in this process, so the two processes share the machine's
cores like a microte sim does. `--fastjson` measures a socket.io packet class that keeps
the JSON wire format but encodes with msgspec and skips python-socketio's recursive binary
scan of every payload (a candidate for microte, see docs/benchmarks-sim.md).
Prints figures; never asserts (DESIGN.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import socketio

LISTENING = "ceiling listening on "
DURATION = 900
T0 = 1_781_481_600  # a Monday 00:00 Europe/Berlin... any aligned time will do
MAX_PAYLOAD = 1_000_000  # as market/server.py


# -- payloads of microte's size -------------------------------------------------------------


def start_round(t: int) -> dict[str, Any]:
    slots = [(t, t + DURATION), (t + DURATION, t + 2 * DURATION), (t + 2 * DURATION, t + 3 * DURATION)]
    return {
        "mode": "sim",
        "time": t,
        "duration": DURATION,
        "timezone": "Europe/Berlin",
        "current_round": list(slots[0]),
        "last_round": [t - DURATION, t],
        "next_settle": list(slots[2]),
        "last_settle": list(slots[1]),
        "market_info": [
            {"time_delivery": list(s), "grid": {"buy_price": 0.24, "sell_price": 0.08}, "grid_state": "GREEN"}
            for s in slots
        ],
    }


def bid(t: int, pid: str) -> dict[str, Any]:
    slot = [t + 2 * DURATION, t + 3 * DURATION]
    return {"quantity": 36, "price": 0.2, "time_delivery": slot, "id": f"{slot[0]}-0"}


def meter(t: int) -> dict[str, Any]:
    return {
        "time_interval": [t, t + DURATION],
        "generation": {"solar": 412},
        "consumption": {"bess": {}, "other": {"external": 38, "solar": 120}},
    }


def settled(t: int, pid: str) -> dict[str, Any]:
    return {
        "commit_id": f"c{t}-0",
        "quantity": 21,
        "source": "solar",
        "time_delivery": [t + DURATION, t + 2 * DURATION],
        "uuid": f"{pid}.0",
        "id": f"{t + DURATION}-0",
        "side": "bid",
        "price": 0.16444999999999999,
    }


def bid_reply(pid: str, data: dict[str, Any], t: int) -> dict[str, Any]:
    return {
        "ok": True,
        "entry": {
            "uuid": f"{pid}.{t}",
            "id": data.get("id"),
            "side": "bid",
            "quantity": data.get("quantity"),
            "price": data.get("price"),
            "time_delivery": data.get("time_delivery"),
            "source": None,
            "time_submission": t,
        },
    }


# -- a faster JSON packet, wire-compatible with the default one --------------------------------


class _MsgspecJson:
    """The `json` module interface python-socketio's Packet uses, backed by msgspec."""

    _encoder = msgspec.json.Encoder()

    @classmethod
    def dumps(cls, obj: Any, **_: Any) -> str:
        return cls._encoder.encode(obj).decode()

    loads = staticmethod(msgspec.json.decode)


class FastJsonPacket(socketio.packet.Packet):  # type: ignore[misc]
    """Socket.IO JSON packets encoded by msgspec, without the recursive binary scan of every
    payload (`Packet.data_is_binary`): same text on the wire, so any socket.io client still
    talks to it; only binary attachments (which microte never sends) are given up."""

    uses_binary_events = False
    json = _MsgspecJson


SERIALIZERS: dict[str, Any] = {"default": "default", "msgpack": "msgpack", "fastjson": FastJsonPacket}


# -- helpers shared with bench/sim.py --------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100]); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def proc_status(pid: int, field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/PID/status, in KiB (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_kib() -> int:
    """Peak RSS of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_loop(main: Callable[[], Coroutine[Any, Any, Any]], use_uvloop: bool) -> Any:
    if use_uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


# -- the server (subprocess) -----------------------------------------------------------------


class CeilingServer:
    def __init__(self, serializer: str) -> None:
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp",
            async_handlers=False,  # as market/server.py
            serializer=SERIALIZERS[serializer],
            max_http_buffer_size=MAX_PAYLOAD,
            cors_allowed_origins="*",
        )
        self.pid_of: dict[str, str] = {}  # sid -> participant id on /market
        self.t = -1
        self.metered: set[str] = set()
        self.all_in = asyncio.Event()
        sio = self.sio
        sio.on("connect", self.on_connect, namespace="/market")
        sio.on("disconnect", self.on_disconnect, namespace="/market")
        sio.on("bid", self.on_bid, namespace="/market")
        sio.on("meter", self.on_meter, namespace="/market")
        sio.on("connect", self.on_ctl_connect, namespace="/simulation")
        sio.on("step", self.on_step, namespace="/simulation")

    async def on_connect(self, sid: str, _environ: Any, auth: Any = None) -> None:
        self.pid_of[sid] = str((auth or {}).get("id", sid))

    async def on_disconnect(self, sid: str, *_: Any) -> None:
        self.pid_of.pop(sid, None)

    async def on_ctl_connect(self, sid: str, _environ: Any, auth: Any = None) -> None:
        return None

    async def on_bid(self, sid: str, data: Any) -> dict[str, Any]:
        return bid_reply(self.pid_of.get(sid, sid), data, self.t)

    async def on_meter(self, sid: str, data: Any) -> dict[str, Any]:
        if data["time_interval"][0] == self.t:
            self.metered.add(sid)
            if len(self.metered) >= len(self.pid_of):
                self.all_in.set()
        return {"ok": True}

    async def on_step(self, sid: str, data: Any) -> dict[str, Any]:
        t = int(data["time"])
        self.t, self.metered, self.all_in = t, set(), asyncio.Event()
        await self.sio.emit("start_round", start_round(t), namespace="/market")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_in.wait(), 10.0)
        metered = len(self.metered)
        for client_sid, pid in list(self.pid_of.items()):
            await self.sio.emit("settled", settled(t, pid), to=client_sid, namespace="/market")
        return {
            "ok": True,
            "round": {
                "current_round": [t, t + DURATION],
                "metered": metered,
                "missing": [],
                "trades": metered // 2,
                "records": 3 * metered,
            },
        }


async def serve(serializer: str) -> None:
    from aiohttp import web

    server = CeilingServer(serializer)
    app = web.Application()
    server.sio.attach(app)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"{LISTENING}http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


@contextlib.asynccontextmanager
async def server_process(serializer: str, use_uvloop: bool, timeout: float = 30.0) -> AsyncIterator[tuple[str, int]]:
    """Start the ceiling server in a subprocess; yield (url, pid)."""
    args = [sys.executable, os.path.abspath(__file__), "--serve", "--serializer", serializer]
    if use_uvloop:
        args.append("--uvloop")
    proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"the ceiling server exited (code {await proc.wait()}) before listening")
                if line.startswith(LISTENING):
                    break
        yield line.removeprefix(LISTENING).strip(), proc.pid
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


# -- the clients (this process) --------------------------------------------------------------


class BareClient:
    """A participant reduced to its socket traffic."""

    def __init__(self, pid: str, serializer: str, ack: bool = True) -> None:
        self.pid = pid
        self.ack = ack  # False: bid and meter without an acknowledgement (4 messages a round)
        self.settled = 0
        self.errors = 0
        self.sio = socketio.AsyncClient(reconnection=False, serializer=SERIALIZERS[serializer])
        self.sio.on("start_round", self.on_start_round, namespace="/market")
        self.sio.on("settled", self.on_settled, namespace="/market")

    async def connect(self, url: str) -> None:
        await self.sio.connect(
            url, namespaces=["/market"], transports=["websocket"], auth={"id": self.pid, "token": "x"}, wait_timeout=30
        )

    async def on_start_round(self, payload: Any) -> None:
        t = payload["time"]
        if not self.ack:
            await self.sio.emit("bid", bid(t, self.pid), namespace="/market")
            await self.sio.emit("meter", meter(t), namespace="/market")
            return
        loop = asyncio.get_running_loop()
        futs = []
        for event, data in (("bid", bid(t, self.pid)), ("meter", meter(t))):
            fut: asyncio.Future[Any] = loop.create_future()

            def ack(*args: Any, fut: asyncio.Future[Any] = fut) -> None:
                if not fut.done():
                    fut.set_result(args[0] if args else None)

            await self.sio.emit(event, data, namespace="/market", callback=ack)
            futs.append(fut)
        for fut in futs:
            reply = await asyncio.wait_for(fut, 30)
            if not (isinstance(reply, dict) and reply.get("ok")):
                self.errors += 1

    async def on_settled(self, payload: Any) -> None:
        self.settled += 1


@dataclass
class CeilingResult:
    n: int
    serializer: str
    uvloop: bool
    ack: bool
    rounds: int
    seconds: float
    rounds_per_second: float
    p50_ms: float
    p99_ms: float
    connect_seconds: float
    server_cpu_ms_per_round: float
    client_cpu_ms_per_round: float
    server_peak_rss_kib: int
    settled_missing: int
    errors: int


async def measure(
    n: int,
    seconds: float = 3.0,
    *,
    serializer: str = "default",
    use_uvloop: bool = False,
    warmup: int = 5,
    ack: bool = True,
) -> CeilingResult:
    """Step rounds for about `seconds` (after `warmup` rounds) with n clients."""
    async with server_process(serializer, use_uvloop) as (url, server_pid):
        clients = [BareClient(f"P{i:05d}", serializer, ack) for i in range(n)]
        t_connect = time.perf_counter()
        gate = asyncio.Semaphore(64)  # as controller/sim.py's Fleet(concurrency=64)

        async def connect(c: BareClient) -> None:
            async with gate:
                await c.connect(url)

        await asyncio.gather(*(connect(c) for c in clients))
        ctl = socketio.AsyncClient(reconnection=False, serializer=SERIALIZERS[serializer])
        await ctl.connect(url, namespaces=["/simulation"], transports=["websocket"], auth={"id": "controller"})
        connect_seconds = time.perf_counter() - t_connect
        try:
            t = T0
            for _ in range(warmup):
                await ctl.call("step", {"time": t}, namespace="/simulation", timeout=60)
                t += DURATION
            times: list[float] = []
            cpu_s, cpu_c = proc_cpu(server_pid), self_cpu()
            start = time.perf_counter()
            while time.perf_counter() - start < seconds or len(times) < 3:
                t1 = time.perf_counter()
                reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=60)
                times.append(time.perf_counter() - t1)
                if not reply.get("ok") or reply["round"]["metered"] != n:
                    raise RuntimeError(f"ceiling round {t} incomplete: {reply}")
                t += DURATION
            elapsed = time.perf_counter() - start
            cpu_s, cpu_c = proc_cpu(server_pid) - cpu_s, self_cpu() - cpu_c
            hwm = proc_status(server_pid, "VmHWM")
            expected = warmup + len(times)
            # The step reply may overtake the last `settled`s by a hair: give them a moment.
            deadline = time.perf_counter() + 5
            while time.perf_counter() < deadline and any(c.settled < expected for c in clients):
                await asyncio.sleep(0.01)
            missing = sum(max(0, expected - c.settled) for c in clients)
        finally:
            await ctl.disconnect()
            await asyncio.gather(*(c.sio.disconnect() for c in clients), return_exceptions=True)
    rounds = len(times)
    return CeilingResult(
        n=n,
        serializer=serializer,
        uvloop=use_uvloop,
        ack=ack,
        rounds=rounds,
        seconds=elapsed,
        rounds_per_second=rounds / elapsed,
        p50_ms=percentile(times, 50) * 1000,
        p99_ms=percentile(times, 99) * 1000,
        connect_seconds=connect_seconds,
        server_cpu_ms_per_round=cpu_s / rounds * 1000,
        client_cpu_ms_per_round=cpu_c / rounds * 1000,
        server_peak_rss_kib=hwm,
        settled_missing=missing,
        errors=sum(c.errors for c in clients),
    )


def render(results: Sequence[CeilingResult]) -> str:
    lines = [
        "| N | serializer | loop | acks | rounds | rounds/s | p50 ms | p99 ms | server CPU ms/round "
        "| client CPU ms/round | server peak RSS MiB |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.n} | {r.serializer} | {'uvloop' if r.uvloop else 'asyncio'} | {'yes' if r.ack else 'no'} "
            f"| {r.rounds} "
            f"| {r.rounds_per_second:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.server_cpu_ms_per_round:.1f} "
            f"| {r.client_cpu_ms_per_round:.1f} | {r.server_peak_rss_kib / 1024:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--n", type=int, nargs="+", default=[10, 50, 100, 500], help="participants per run")
    p.add_argument("--seconds", type=float, default=3.0, help="stepping time per N (after warm-up)")
    p.add_argument("--msgpack", action="store_true", help="msgpack serializer on both ends")
    p.add_argument(
        "--fastjson", action="store_true", help="JSON packets by msgspec, no binary scan (FastJsonPacket) on both ends"
    )
    p.add_argument("--uvloop", action="store_true", help="uvloop on both ends")
    p.add_argument(
        "--no-ack", action="store_true", help="bid and meter without acknowledgements (issue 16's 4-message round)"
    )
    p.add_argument("--budget", type=float, default=60.0, help="skip an N >= 500 once this many seconds are spent")
    p.add_argument("--json", action="store_true", help="print one JSON object per N instead of a table")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serializer", default="default", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        run_loop(lambda: serve(args.serializer), args.uvloop)
        return 0
    serializer = "msgpack" if args.msgpack else "fastjson" if args.fastjson else "default"
    results = []
    began = time.perf_counter()
    for n in args.n:
        spent = time.perf_counter() - began
        if n >= 500 and spent > args.budget / 2:
            print(f"skipped N={n}: {spent:.0f} s already spent of the {args.budget:.0f} s budget", file=sys.stderr)
            continue
        try:
            r = run_loop(
                functools.partial(
                    measure, n, args.seconds, serializer=serializer, use_uvloop=args.uvloop, ack=not args.no_ack
                ),
                args.uvloop,
            )
        except Exception as exc:  # a benchmark reports, it does not crash half-way
            print(f"N={n} failed: {exc!r}", file=sys.stderr)
            continue
        results.append(r)
        if args.json:
            print(json.dumps(asdict(r)), flush=True)
        else:
            print(
                f"N={n}: {r.rounds_per_second:.1f} rounds/s (p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms)",
                file=sys.stderr,
            )
    if not args.json:
        print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
