"""A tree of markets in lockstep over sockets (a district of communities, a city of
districts, ...): one `microte market` process per market, every market below another
`--in-district`, each with its own registry and ledger; the members of each market in a
`microte participant` process of their own; the controller steps them all and holds each
lower market's session in the market above (docs/hierarchy.md). Round t, from the bottom:

1. each market below another `step`s round t, after the markets below it (siblings at once);
   it gets the fills its own round made for the markets below it (`upstream.fills` there),
   then the controller reads the residuals of the slot its gate just closed
   (`upstream.residuals`) and places them in the market above as that market (`orders` on
   its `/market`, one order per residual, client id = the residual's id), and reads what
   its upstream account passed on in slot t (`upstream.flows`), which its session meters
   above on the next `start_round`;
2. the top market `step`s round t and its fills go down (`upstream.fills`), each level's
   reply naming the part that filled orders of the markets below it, which goes on down.

A market process that dies is started again on the same port and ledger (`restart`): it
resumes from its ledger, its members reconnect, and the round goes on; every write is
idempotent, so no row is lost or doubled. The same scenario and seed give the same
ledgers as the in-process run (tests/e2e/test_district.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import socketio

from controller.hierarchy import District, ledger_urls, load_district
from controller.scenario import Scenario
from controller.sim import CONTROLLER_ID, fresh_ledger, stop_process, wait_listening, write_registry
from market.core.hierarchy import fill_of, upstream_orders
from participants.spec import decode_specs

CALL_TIMEOUT = 60.0


class MarketProcess:
    """One `microte market` subprocess that can be killed and started again on its port."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self, timeout: float = 30.0) -> str:
        args = [*self.args, "--port", str(self.port)]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "market", *args, stdout=subprocess.PIPE
        )
        self.url = await wait_listening(self.proc, timeout)
        self.port = int(self.url.rsplit(":", 1)[1])  # the same port after a restart
        return self.url

    def kill(self) -> None:
        """SIGKILL: nothing flushed, as a crash."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def stop(self) -> None:
        if self.proc is not None:
            await stop_process(self.proc)


class CommunitySession:
    """A community as a participant of the district, on the district's `/market`."""

    def __init__(self, cid: str, token: str) -> None:
        self.cid, self.token = cid, token
        self.flows: dict[int, dict[str, Any]] = {}  # slot start -> its reading above
        self.fills: dict[int, list[dict[str, Any]]] = {}  # slot start -> district fills seen
        self.errors: list[Any] = []
        self.sio = socketio.AsyncClient(reconnection=False)
        self.sio.on("start_round", self._on_start_round, namespace="/market")
        self.sio.on("settled", self._on_settled, namespace="/market")

    async def connect(self, url: str) -> None:
        await self.sio.connect(
            url, namespaces=["/market"], transports=["websocket"], auth={"id": self.cid, "token": self.token}
        )

    async def _on_start_round(self, payload: Any) -> None:
        slot = payload["current_round"]
        flows = self.flows.pop(int(slot[0]), None)
        if flows is None:
            return
        reading = {"time_interval": slot, "generation": flows["generation"]}
        reading["consumption"] = {"other": {"external": flows["external"]}}
        reply = await self.sio.call("meter", reading, namespace="/market", timeout=CALL_TIMEOUT)
        if not reply.get("ok"):
            self.errors.append(reply)

    async def _on_settled(self, payload: Any) -> None:  # before the round's start_round: no await
        self.fills.setdefault(int(payload["time_delivery"][0]), []).append(payload)

    async def place(self, residuals: list[dict[str, Any]], slot: list[int]) -> None:
        orders = upstream_orders(self.cid, residuals, slot)
        for i in range(0, len(orders), 1000):
            reply = await self.sio.call(
                "orders", {"orders": orders[i : i + 1000]}, namespace="/market", timeout=CALL_TIMEOUT
            )
            if not reply.get("ok"):
                self.errors.append(reply)
            else:
                self.errors += [x for x in reply["results"] if not x.get("ok")]

    def take_fills(self, start: int) -> list[dict[str, Any]]:
        return [fill_of(self.cid, f) for f in self.fills.pop(start, [])]


async def _call(sio: socketio.AsyncClient, event: str, data: dict[str, Any]) -> dict[str, Any]:
    reply = await sio.call(event, data, namespace="/simulation", timeout=CALL_TIMEOUT)
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise RuntimeError(f"{event} {data.get('time', data.get('time_delivery'))}: {reply}")
    return reply


async def _controller(url: str, token: str) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(
        url, namespaces=["/simulation"], transports=["websocket"], auth={"id": CONTROLLER_ID, "token": token}
    )
    return sio


class DistrictRunner:
    """The processes, clients and sessions of one run over a tree of markets (a district of
    communities, a city of districts, ...; see the module docstring): every market below
    another is `--in-district` and has a session in the one above, held by the controller."""

    def __init__(self, district: District, path: Path, ledger: str, tmp: Path) -> None:
        self.district, self.path, self.tmp = district, path, tmp
        self.root = district.scenario.name
        self.files: dict[str, Path] = {self.root: path}
        self.scenarios: dict[str, Scenario] = {self.root: district.scenario}
        self.children: dict[str, list[str]] = {}
        self.parent: dict[str, str] = {}
        self._tree(self.root, district)
        self.urls = ledger_urls(ledger, list(self.files))
        self.procs: dict[str, MarketProcess] = {}
        self.tokens: dict[str, dict[str, str]] = {}
        self.ctl: dict[str, socketio.AsyncClient] = {}
        self.sessions = {m: CommunitySession(m, secrets.token_urlsafe(18)) for m in self.parent}
        self.rounds_done = 0
        self.seconds: dict[str, float] = {}  # wall time per phase of the rounds (bench/district.py)
        self.member_procs: list[asyncio.subprocess.Process] = []

    def _tree(self, mid: str, d: District) -> None:
        self.children[mid] = list(d.communities)
        for cid, sc in d.communities.items():
            if cid in self.files:
                raise ValueError(f"{d.files[cid]}: market id {cid!r} is used twice in the tree")
            self.files[cid], self.scenarios[cid], self.parent[cid] = d.files[cid], sc, mid
            self.children[cid] = []
            if sc.communities:
                self._tree(cid, load_district(d.files[cid], nested=True))

    def _server_args(self, market: str, tokens: dict[str, str]) -> list[str]:
        registry = self.tmp / f"{market}.registry.toml"
        write_registry(registry, tokens)
        args = ["--registry", str(registry), "--scenario", str(self.files[market]), "--ledger", self.urls[market]]
        args += ["--mode", "sim", "--log-level", "WARNING"]
        return [*args, "--in-district"] if market in self.parent else args

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        for url in self.urls.values():
            fresh_ledger(url)
        for market, sc in self.scenarios.items():
            specs = decode_specs(sc.participants)
            tokens = {s.id: secrets.token_urlsafe(18) for s in specs} | {CONTROLLER_ID: secrets.token_urlsafe(18)}
            tokens |= {c: self.sessions[c].token for c in self.children[market]}
            self.tokens[market] = tokens
            self.procs[market] = MarketProcess(self._server_args(market, tokens))
        for proc in self.procs.values():
            stack.push_async_callback(proc.stop)
        await asyncio.gather(*(p.start() for p in self.procs.values()))
        for market, proc in self.procs.items():
            self.ctl[market] = await _controller(proc.url, self.tokens[market][CONTROLLER_ID])
            stack.push_async_callback(self.ctl[market].disconnect)
            if decode_specs(self.scenarios[market].participants):
                # The members of a market in a process of their own (`microte participant`), as
                # they would run: the controller's process measures the markets, not 1,000 clients.
                members = await self._members(market, proc.url)
                self.member_procs.append(members)
                stack.push_async_callback(stop_process, members)
        for market, session in self.sessions.items():
            await session.connect(self.procs[self.parent[market]].url)
            stack.push_async_callback(session.sio.disconnect)
        for market in self.procs:
            await self._all_online(market)

    def cpu_seconds(self) -> float:
        """CPU time so far of this process and every market and member process (Linux /proc;
        0 for a process it cannot read)."""
        own = resource.getrusage(resource.RUSAGE_SELF)
        total = own.ru_utime + own.ru_stime
        procs = [p.proc for p in self.procs.values()] + list(self.member_procs)
        tick = os.sysconf("SC_CLK_TCK")
        for proc in procs:
            if proc is None:
                continue
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            except (OSError, IndexError, ValueError):
                continue
        return total

    async def _members(self, market: str, url: str) -> asyncio.subprocess.Process:
        registry = self.tmp / f"{market}.registry.toml"
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "participant", "--url", url, "--scenario", str(self.files[market]),
            "--registry", str(registry), "--connect-retry", "60", "--log-level", "WARNING",
            stdout=subprocess.DEVNULL,
        )  # fmt: skip

    async def _all_online(self, market: str, timeout: float = 120.0) -> None:
        """Wait until every member of `market` (and every market below it) is online."""
        expected = set(self.tokens[market]) - {CONTROLLER_ID}
        async with asyncio.timeout(timeout):
            while True:
                status = await _call(self.ctl[market], "status", {})
                if expected <= set(status["participants"]["online"]):
                    return
                await asyncio.sleep(0.1)

    async def step(self, t: int, between: Callable[[str], Awaitable[None]] | None = None) -> None:
        """Round t, level by level from the bottom (module docstring); `between(market)` (awaited)
        runs right after each market below another stepped, before its residuals go up: where
        a test kills one."""
        clock = time.perf_counter
        t0 = clock()
        await asyncio.gather(*(self._visit(c, t, between) for c in self.children[self.root]))
        t1 = clock()
        await _call(self.ctl[self.root], "step", {"time": t})
        t2 = clock()
        await asyncio.gather(*(self._fills_from_above(c, t) for c in self.children[self.root]))
        t3 = clock()
        for phase, seconds in (("below", t1 - t0), ("top", t2 - t1), ("down", t3 - t2)):
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.rounds_done += 1

    def _gate(self, t: int) -> tuple[int, int]:
        sc = self.district.scenario
        g = t + (int(sc.market.get("close_steps", 2)) - 1) * sc.step
        return g, g + sc.step

    async def _visit(self, market: str, t: int, between: Callable[[str], Awaitable[None]] | None) -> None:
        """A market below another, and everything below it: step, hand its fills down, pass its
        residuals and flows up. Siblings share nothing and go concurrently; the market above
        orders their orders by uuid, not by arrival."""
        await asyncio.gather(*(self._visit(c, t, between) for c in self.children[market]))
        await _call(self.ctl[market], "step", {"time": t})
        if between is not None:
            await between(market)
        await asyncio.gather(*(self._fills_from_above(c, t) for c in self.children[market]))
        d = self.district.scenario.step
        gate = self._gate(t)
        res = await _call(self.ctl[market], "upstream.residuals", {"time_delivery": list(gate)})
        if self.rounds_done and res["residuals"]:  # before the first round above no slot is open there
            await self.sessions[market].place(res["residuals"], list(gate))
        flows = await _call(self.ctl[market], "upstream.flows", {"time_delivery": [t, t + d]})
        self.sessions[market].flows[t] = {"generation": flows["generation"], "external": flows["external"]}

    async def _fills_from_above(self, market: str, t: int) -> None:
        """The fills the market above gave `market`'s session in its round: settled in `market`."""
        await self._settle(market, self.sessions[market].take_fills(self._gate(t)[0]), t)

    async def _settle(self, market: str, fills: list[dict[str, Any]], t: int) -> None:
        """Settle fills in `market`; the part of them that filled orders of markets below it
        goes on down, level by level (the reply names each member's fill)."""
        if not fills:
            return
        reply = await _call(self.ctl[market], "upstream.fills", {"time_delivery": list(self._gate(t)), "fills": fills})
        below: dict[str, list[dict[str, Any]]] = {}
        for e in reply.get("events", []):
            child = e["participant"]
            if child in self.children[market]:
                below.setdefault(child, []).append(fill_of(child, e))
        await asyncio.gather(*(self._settle(c, f, t) for c, f in below.items()))

    async def restart(self, market: str) -> None:
        """Kill a market's server (SIGKILL) and start it again on its port and ledger; its
        members reconnect by themselves, the controller's session is made again."""
        proc = self.procs[market]
        proc.kill()
        assert proc.proc is not None
        await proc.proc.wait()
        with contextlib.suppress(Exception):
            await self.ctl[market].disconnect()
        await proc.start()
        self.ctl[market] = await _controller(proc.url, self.tokens[market][CONTROLLER_ID])
        await self._all_online(market)  # every member back before the round goes on


async def run_district_socket(
    path: str | Path,
    ledger: str,
    *,
    between: Callable[[DistrictRunner, int, str], Awaitable[None]] | None = None,
    timing: dict[str, float] | None = None,
) -> dict[str, str]:
    """Every round of a district scenario over sockets; the ledgers by market id.
    `between(runner, k, market)` runs in round k after each market below another stepped;
    `timing` gets the seconds of the start-up and of the rounds."""
    path = Path(path)
    district = load_district(path, nested=True)
    with tempfile.TemporaryDirectory(prefix="microte-district-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            runner = DistrictRunner(district, path, ledger, Path(tmp))
            t0 = time.perf_counter()
            await runner.start(stack)
            t1, cpu0 = time.perf_counter(), runner.cpu_seconds()
            sc = district.scenario
            for k in range(sc.rounds):
                hook = None if between is None else functools.partial(between, runner, k)
                await runner.step(sc.start_time + k * sc.step, hook)
            if timing is not None:
                cpu = runner.cpu_seconds() - cpu0
                timing.update(startup=t1 - t0, rounds=time.perf_counter() - t1, cpu=cpu, **runner.seconds)
    return runner.urls
