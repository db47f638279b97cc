"""A district of community markets in lockstep over sockets: one `microte market` process
per community (`--in-district`) and one for the district, each with its own registry and
ledger; the members as socket.io clients of their community; the controller steps them all
(docs/hierarchy.md). The rounds are those of controller/hierarchy.py, moved onto the wire:

1. every community `step`s round t (concurrently: they share nothing);
2. the controller asks each for the residuals of the slot its gate just closed
   (`upstream.residuals`) and places them in the district as that community (`orders` on the
   district's `/market`, one order per residual, client id = the residual's id), and asks
   what its upstream account passed on in slot t (`upstream.flows`);
3. the district `step`s round t: each community's session meters those flows, the
   district clears, and its `settled` events come back to the community's session;
4. the controller hands each community its fills (`upstream.fills`), which it stores before
   replying and announces to its members before their next `start_round`.

A community process that dies is started again on the same port and ledger (`restart`):
it resumes from its ledger, its members reconnect, and the round is stepped again; every
write is idempotent, so no row is lost or doubled. The same scenario and seed give the same
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
from controller.sim import CONTROLLER_ID, LISTENING, fresh_ledger, write_registry
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
        self.proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "market", *args, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"a market server exited (code {await proc.wait()}) before listening")
                if line.startswith(LISTENING):
                    break
        self.url = line.removeprefix(LISTENING).strip()
        self.port = int(self.url.rsplit(":", 1)[1])  # the same port after a restart
        return self.url

    def kill(self) -> None:
        """SIGKILL: nothing flushed, as a crash."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


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
        orders = []
        for r in residuals:
            order = {k: r[k] for k in ("side", "quantity", "price")} | {"time_delivery": slot, "id": r["id"]}
            if r["source"] is not None:
                order["source"] = r["source"]
            orders.append(order)
        for i in range(0, len(orders), 1000):
            reply = await self.sio.call(
                "orders", {"orders": orders[i : i + 1000]}, namespace="/market", timeout=CALL_TIMEOUT
            )
            if not reply.get("ok"):
                self.errors.append(reply)
            else:
                self.errors += [x for x in reply["results"] if not x.get("ok")]

    def take_fills(self, start: int) -> list[dict[str, Any]]:
        return [
            {
                "id": f["id"],
                "quantity": f["quantity"],
                "price": f["price"],
                "source": f["source"],
                "ref": f["commit_id"],
            }
            for f in self.fills.pop(start, [])
        ]


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
    """The processes, clients and sessions of one district run (see the module docstring)."""

    def __init__(self, district: District, path: Path, ledger: str, tmp: Path) -> None:
        self.district, self.path, self.tmp = district, path, tmp
        self.urls = ledger_urls(ledger, [*district.communities, "district"])
        self.procs: dict[str, MarketProcess] = {}
        self.tokens: dict[str, dict[str, str]] = {}
        self.ctl: dict[str, socketio.AsyncClient] = {}
        self.sessions = {cid: CommunitySession(cid, secrets.token_urlsafe(18)) for cid in district.communities}
        self.rounds_done = 0
        self.seconds: dict[str, float] = {}  # wall time per phase of the rounds (bench/district.py)
        self.member_procs: list[asyncio.subprocess.Process] = []

    def _server_args(self, market: str, scenario: Path, tokens: dict[str, str]) -> list[str]:
        registry = self.tmp / f"{market}.registry.toml"
        write_registry(registry, tokens)
        args = ["--registry", str(registry), "--scenario", str(scenario), "--ledger", self.urls[market]]
        args += ["--mode", "sim", "--log-level", "WARNING"]
        return [*args, "--in-district"] if market != "district" else args

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        d = self.district
        for url in self.urls.values():
            fresh_ledger(url)
        for cid, sc in d.communities.items():
            specs = decode_specs(sc.participants)
            tokens = {s.id: secrets.token_urlsafe(18) for s in specs} | {CONTROLLER_ID: secrets.token_urlsafe(18)}
            self.tokens[cid] = tokens
            self.procs[cid] = MarketProcess(self._server_args(cid, d.files[cid], tokens))
        specs = decode_specs(d.scenario.participants)
        tokens = {s.id: secrets.token_urlsafe(18) for s in specs} | {CONTROLLER_ID: secrets.token_urlsafe(18)}
        tokens |= {cid: s.token for cid, s in self.sessions.items()}
        self.tokens["district"] = tokens
        self.procs["district"] = MarketProcess(self._server_args("district", self.path, tokens))
        for proc in self.procs.values():
            stack.push_async_callback(proc.stop)
        await asyncio.gather(*(p.start() for p in self.procs.values()))
        for market, proc in self.procs.items():
            self.ctl[market] = await _controller(proc.url, self.tokens[market][CONTROLLER_ID])
            stack.push_async_callback(self.ctl[market].disconnect)
            if decode_specs((d.scenario if market == "district" else d.communities[market]).participants):
                # The members of a market in a process of their own (`microte participant`), as
                # they would run: the controller's process measures the markets, not 1,000 clients.
                members = await self._members(market, proc.url)
                self.member_procs.append(members)
                stack.push_async_callback(_terminate, members)
        for session in self.sessions.values():
            await session.connect(self.procs["district"].url)
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
        scenario = self.path if market == "district" else self.district.files[market]
        registry = self.tmp / f"{market}.registry.toml"
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "participant", "--url", url, "--scenario", str(scenario),
            "--registry", str(registry), "--connect-retry", "60", "--log-level", "WARNING",
            stdout=subprocess.DEVNULL,
        )  # fmt: skip

    async def _all_online(self, market: str, timeout: float = 120.0) -> None:
        """Wait until every member of `market` (and, for the district, every community) is online."""
        expected = set(self.tokens[market]) - {CONTROLLER_ID}
        async with asyncio.timeout(timeout):
            while True:
                status = await _call(self.ctl[market], "status", {})
                if expected <= set(status["participants"]["online"]):
                    return
                await asyncio.sleep(0.1)

    async def step(self, t: int, between: Callable[[], Awaitable[None]] | None = None) -> None:
        """Round t (module docstring); `between()` (awaited) runs after the communities
        stepped and before anything else of the round: where a test kills one."""
        sc = self.district.scenario
        d = sc.step
        gate = t + (int(sc.market.get("close_steps", 2)) - 1) * d
        communities = list(self.district.communities)
        clock = time.perf_counter
        t0 = clock()
        await asyncio.gather(*(self._step_community(cid, t) for cid in communities))
        t1 = clock()
        if between is not None:
            await between()
        # Each community's calls are its own; the district orders them by uuid, not by arrival.
        t2 = clock()
        await asyncio.gather(*(self._pass_up(cid, t, gate) for cid in communities))
        t3 = clock()
        await _call(self.ctl["district"], "step", {"time": t})
        t4 = clock()
        await asyncio.gather(*(self._bring_down(cid, gate) for cid in communities))
        t5 = clock()
        for phase, seconds in (("communities", t1 - t0), ("up", t3 - t2), ("district", t4 - t3), ("down", t5 - t4)):
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.rounds_done += 1

    async def _pass_up(self, cid: str, t: int, gate: int) -> None:
        d = self.district.scenario.step
        res = await _call(self.ctl[cid], "upstream.residuals", {"time_delivery": [gate, gate + d]})
        if self.rounds_done and res["residuals"]:  # before the district's first round no slot is open
            await self.sessions[cid].place(res["residuals"], [gate, gate + d])
        flows = await _call(self.ctl[cid], "upstream.flows", {"time_delivery": [t, t + d]})
        self.sessions[cid].flows[t] = {"generation": flows["generation"], "external": flows["external"]}

    async def _bring_down(self, cid: str, gate: int) -> None:
        fills = self.sessions[cid].take_fills(gate)
        if fills:
            d = self.district.scenario.step
            await _call(self.ctl[cid], "upstream.fills", {"time_delivery": [gate, gate + d], "fills": fills})

    async def _step_community(self, cid: str, t: int) -> None:
        await _call(self.ctl[cid], "step", {"time": t})

    async def restart(self, cid: str) -> None:
        """Kill a community's server (SIGKILL) and start it again on its port and ledger; its
        members reconnect by themselves, the controller's session is made again."""
        proc = self.procs[cid]
        proc.kill()
        assert proc.proc is not None
        await proc.proc.wait()
        with contextlib.suppress(Exception):
            await self.ctl[cid].disconnect()
        await proc.start()
        self.ctl[cid] = await _controller(proc.url, self.tokens[cid][CONTROLLER_ID])
        await self._all_online(cid)  # every member back before the round goes on


async def run_district_socket(
    path: str | Path,
    ledger: str,
    *,
    between: Callable[[DistrictRunner, int], Awaitable[None]] | None = None,
    timing: dict[str, float] | None = None,
) -> dict[str, str]:
    """Every round of a district scenario over sockets; the ledgers by market id.
    `between(runner, k)` runs in round k after the communities stepped (a test kills one);
    `timing` gets the seconds of the start-up and of the rounds."""
    path = Path(path)
    district = load_district(path)
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
