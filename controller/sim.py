"""`microte sim SCENARIO`: the market server as a subprocess (exactly what a user runs by
hand), the scenario's participants as real socket.io clients on loopback, and the
controller stepping every round as fast as they all keep up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import socketio
import tomli_w
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_random_exponential
from tqdm import tqdm

from controller import runloop
from controller.report import Summary, render, summarize
from controller.scenario import Scenario, community, load_scenario, scenario_table
from controller.site_records import plain_database, site_records
from ledger import connect, is_memory, open_sink, read_rows
from market.community.pseudonyms import KEY_FILE
from market.core import wire
from market.core.sink import Sink
from participants.fleet import Fleet
from participants.fleet_client import FleetClient
from participants.parity_agents import ParityAgents
from participants.prosumer import Prosumer
from participants.spec import ParticipantSpec

log = logging.getLogger("microte.sim")

CONTROLLER_ID = "controller"
LISTENING = "microte market listening on "


class SimResult(msgspec.Struct, frozen=True):
    summary: Summary
    startup_seconds: float
    missing_total: int
    parity: ParitySummary | None = None  # a run with `[parity.agents]`


class ParitySummary(msgspec.Struct, frozen=True):
    """What the Parity flow left on the ledger (micro-currency)."""

    lems: int  # LEM slots solved
    lem_transfers: int
    lem_tokens: int  # tokens moved by LEM transfers
    penalties: int  # SLA penalties applied
    penalty_tokens: int
    slas_checked: int
    balance_sum: int  # every account summed: 0 when tokens are conserved

    def render(self) -> str:
        return (
            f"Parity: {self.lems} LEM slots solved, {self.lem_transfers} LEM transfers moving "
            f"{self.lem_tokens / 1e6:.2f} tokens; {self.slas_checked} SLAs checked, {self.penalties} penalties "
            f"({self.penalty_tokens / 1e6:.2f} tokens); token balances sum to {self.balance_sum}"
        )


def parity_summary(ledger: str) -> ParitySummary:
    transfers = read_rows(ledger, "token_transfers")
    balances: dict[str, int] = {}
    for t in transfers:
        balances[t["payer_id"]] = balances.get(t["payer_id"], 0) - t["amount"]
        balances[t["payee_id"]] = balances.get(t["payee_id"], 0) + t["amount"]
    lem = [t for t in transfers if t["kind"] == "lem"]
    penalties = [t for t in transfers if t["kind"] == "sla_penalty"]
    return ParitySummary(
        lems=len({r["time_delivery_start"] for r in read_rows(ledger, "lem_results")}),
        lem_transfers=len(lem),
        lem_tokens=sum(t["amount"] for t in lem),
        penalties=len(penalties),
        penalty_tokens=sum(t["amount"] for t in penalties),
        slas_checked=len(read_rows(ledger, "sla_results")),
        balance_sum=sum(balances.values()),
    )


class FleetConnections:
    """The participants split over `n` `/fleet` connections (contiguous groups, in order)."""

    def __init__(
        self,
        url: str,
        members: list[tuple[ParticipantSpec, str]],
        seed: int,
        n: int,
        warm: Sequence[tuple[int, int]] = (),
        **options: Any,
    ) -> None:
        size = -(-len(members) // n)
        self.url = url
        self.clients = [FleetClient(members[i : i + size], seed, **options) for i in range(0, len(members), size)]
        for client in self.clients:  # the first round's slots, before its deadline runs
            client.warm(warm)

    async def __aenter__(self) -> FleetConnections:
        await asyncio.gather(*(c.connect(self.url) for c in self.clients))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await asyncio.gather(*(c.disconnect() for c in self.clients), return_exceptions=True)


def _first_slots(scenario: Scenario) -> list[tuple[int, int]]:
    """What the first sim round meters (its current slot) and trades (its next_settle)."""
    t, d = scenario.start_time, scenario.step
    c = int(scenario.market.get("close_steps", 2))
    return [(t, t + d), (t + c * d, t + (c + 1) * d)]


def write_registry(path: Path, tokens: dict[str, str], roles: dict[str, str] | None = None) -> None:
    lines = []
    for pid, token in tokens.items():
        role = (roles or {}).get(pid) or ("controller" if pid == CONTROLLER_ID else "prosumer")
        lines.append(f'[[participants]]\nid = "{pid}"\ntoken = "{token}"\nrole = "{role}"\n')
    path.write_text("\n".join(lines))


def fresh_ledger(url: str) -> None:
    """A sim run writes a new ledger: remove an old SQLite file (and its WAL) first."""
    db = url.removeprefix("evm+").split("?", 1)[0]
    if db.startswith("sqlite:///"):
        base = Path(db.removeprefix("sqlite:///"))
        # The database, its WAL, and (evm+ ledgers) the in-process chain's state beside it.
        for suffix in ("", "-wal", "-shm", ".evm", ".evm.lock"):
            base.with_name(base.name + suffix).unlink(missing_ok=True)


async def wait_listening(proc: asyncio.subprocess.Process, timeout: float = 30.0) -> str:
    """The URL a `microte market` subprocess prints once it listens."""
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise RuntimeError(f"the market server exited (code {await proc.wait()}) before listening")
            if line.startswith(LISTENING):
                return line.removeprefix(LISTENING).strip()


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 15.0) -> None:
    """SIGTERM (graceful: a market flushes its ledger), then SIGKILL after `timeout` seconds."""
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        async with asyncio.timeout(timeout):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def market_process(args: Sequence[str], timeout: float = 30.0) -> AsyncIterator[str]:
    """Start `microte market` and yield its URL; SIGTERM (graceful: the ledger is flushed) at the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "market", *args, stdout=subprocess.PIPE
    )
    try:
        yield await wait_listening(proc, timeout)
    finally:
        await stop_process(proc)


async def run_sim(
    scenario_path: str | Path,
    *,
    ledger: str,
    participants: int | None = None,
    days: float | None = None,
    progress: bool = True,
    serializer: str = "json",
    fleets: int = 0,
    market_args: Sequence[str] = (),
    transport: str = "socket",
    overrides: Mapping[str, Any] | None = None,
    combined: bool = True,
) -> SimResult:
    """Run a scenario; `fleets` > 0 serves the participants over that many `/fleet`
    connections instead of one connection each, else each on its own `/market` connection
    speaking `round.submit` and `round.result` (`combined`, docs/protocol.md, with `round.start`
    where nothing reads the prosumers between steps; False: the v1 events, the same ledger);
    `market_args` go to `microte market` (the `--lem-*` flags).
    `transport="inproc"`: no server process and no sockets, the same ledger
    (controller/inproc.py). `overrides`: scenario values by dotted key (`load_scenario`)."""
    scenario = load_scenario(scenario_path, overrides)
    if days is not None:
        scenario = msgspec.structs.replace(scenario, days=days)
    specs = community(scenario, participants)
    if transport == "inproc":
        if scenario.parity_agents is not None:
            raise ValueError("[parity.agents] trades on /grid over sockets: use --transport socket")
        from controller.inproc import run_inproc

        fresh_ledger(ledger)
        # A memory: ledger is this process's own: the summary reads the rows from its sink.
        memory = open_sink(ledger) if is_memory(ledger) else None
        started = time.perf_counter()
        with tqdm(total=scenario.rounds, unit="round", disable=not progress, desc=scenario.name) as bar:
            seconds, missing = await run_inproc(
                scenario, specs, ledger=ledger, base_dir=Path(scenario_path).parent, progress=bar.update, sink=memory
            )
        summary = await _read_summary(memory, scenario, seconds) if memory else _summary(ledger, scenario, seconds)
        return SimResult(summary, time.perf_counter() - started - seconds, missing)
    if is_memory(ledger):
        # The server is another process: its rows would vanish with it, and the summary is
        # read from the ledger after the run.
        raise ValueError(
            "--ledger memory: keeps the ledger in the market server's process, which ends with the run; "
            "use --transport inproc (the same ledger, in this process) or a sqlite:/// ledger"
        )
    if any(s.pem is not None for s in specs) and not plain_database(ledger):
        # The server never sees a site's houses: this process writes their rows (`_site_records`).
        raise ValueError("a pem site's house rows need a sqlite:/// or postgresql:// ledger over sockets")
    tokens = {s.id: secrets.token_urlsafe(18) for s in specs} | {CONTROLLER_ID: secrets.token_urlsafe(18)}
    roles: dict[str, str] = {}
    agents_config = scenario.parity_agents
    if agents_config is not None:  # the Parity flow: its aggregator and oracle log in too
        if fleets:
            raise ValueError("[parity.agents] runs each prosumer on its own connection: leave out --fleet")
        for pid, role in agents_config.ids().items():
            tokens[pid], roles[pid] = secrets.token_urlsafe(18), role
        overrides = {**(overrides or {}), **_pseudonym_key(scenario, Path(scenario_path))}
    feeder_task = None
    if scenario.feeder is not None:  # grid physics: a DSO agent runs power flows (controller/dso.py)
        from market.feeder.network import Feeder

        tokens[scenario.feeder.dso_id] = secrets.token_urlsafe(18)
        roles[scenario.feeder.dso_id] = "dso"
        # pandapower takes seconds to import: load the feeder while the server starts.
        feeder_task = asyncio.ensure_future(
            asyncio.to_thread(Feeder.load, scenario.feeder, [s.id for s in specs], Path(scenario_path).parent)
        )
    fresh_ledger(ledger)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="microte-") as tmp:
        registry = Path(tmp) / "registry.toml"
        write_registry(registry, tokens, roles)
        server_scenario = Path(scenario_path)
        if overrides:  # the server reads the market settings from the overridden scenario
            server_scenario = Path(tmp) / "scenario.toml"
            server_scenario.write_text(tomli_w.dumps(scenario_table(scenario_path, overrides)))
        server_args = [
            "--registry",
            str(registry),
            "--scenario",
            str(server_scenario),
            "--port",
            "0",
            "--ledger",
            ledger,
            "--mode",
            "sim",
            "--log-level",
            "WARNING",
            "--serializer",
            serializer,
            *market_args,
        ]
        async with market_process(server_args) as url:
            members = [(s, tokens[s.id]) for s in specs]
            options: dict[str, Any] = {
                "timezone": scenario.timezone,
                "base_dir": Path(scenario_path).parent,
                "serializer": serializer,
            }
            clients = (
                FleetConnections(url, members, scenario.seed, fleets, _first_slots(scenario), **options)
                if fleets
                else Fleet(
                    url,
                    members,
                    scenario.seed,
                    concurrency=64,
                    combined=combined,
                    # Each step's results with the next round's start, one message fewer a
                    # round; not when something reads the prosumers right after a step (the
                    # Parity agents, a PEM site's records).
                    round_start=combined and agents_config is None and all(s.pem is None for s in specs),
                    **options,
                )
            )
            async with clients, contextlib.AsyncExitStack() as stack:
                dso = None
                if feeder_task is not None:
                    dso = await stack.enter_async_context(
                        _dso_agent(scenario, scenario_path, await feeder_task, url, tokens, ledger, specs, serializer)
                    )
                parity = None
                if agents_config is not None:
                    assert isinstance(clients, Fleet)
                    parity = ParityAgents(
                        agents_config,
                        {c.prosumer.spec.id: c.prosumer for c in clients.clients},
                        tokens,
                        lem_duration=scenario.parity.lem_duration,
                        step=scenario.step,
                        end=scenario.start_time + (scenario.rounds - 1) * scenario.step,
                        serializer=serializer,
                    )
                    stack.push_async_callback(parity.close)
                    await parity.connect(url)
                sites = await stack.enter_async_context(site_records(_sites_of(clients), ledger))
                ctl = socketio.AsyncClient(reconnection=False, serializer=wire.serializer(serializer))
                await ctl.connect(
                    url,
                    namespaces=["/simulation"],
                    transports=["websocket"],
                    auth={"id": CONTROLLER_ID, "token": tokens[CONTROLLER_ID]},
                )
                # The participants (thousands of prosumers in fleet mode) are built and
                # connected: out of the collector's way, as the server's heap is.
                runloop.settle_heap()
                startup = time.perf_counter() - started
                t0 = time.perf_counter()
                missing = await _step_all(ctl, scenario, progress, dso, parity, sites)
                seconds = time.perf_counter() - t0
                await ctl.disconnect()
    return SimResult(
        _summary(ledger, scenario, seconds),
        startup,
        missing,
        parity_summary(ledger) if agents_config is not None else None,
    )


def _pseudonym_key(scenario: Scenario, scenario_path: Path) -> dict[str, str]:
    """The key the server's pseudonyms use: the scenario's `key_file` (relative to the
    scenario), else the `pseudonym.key` beside it (as `microte init parity` writes), so the
    operator can resolve the run's pseudonyms afterwards; none: the server's own for the run."""
    cfg = scenario.parity.pseudonyms
    if cfg.uses_service:
        return {}
    path = scenario_path.parent / (cfg.key_file or KEY_FILE)
    return {"parity.pseudonyms.key_file": str(path.resolve())} if cfg.key_file or path.exists() else {}


def _summary(ledger: str, scenario: Scenario, seconds: float) -> Summary:
    """The run's summary, added up by its (database) ledger: `microte report`'s queries
    (sums per party and kind in the database, the meters' four columns in any order),
    which tests/controller/test_run_report.py holds equal to `summarize` of every row
    (read back row by row, a 1,000-participant day took ~1.0 s)."""
    from controller.run_report.queries import read  # here: numpy's tables only after a run

    with connect(ledger) as conn:
        summary = read(conn).summary()
    return msgspec.structs.replace(summary, rounds=scenario.rounds, seconds=seconds)


async def _read_summary(sink: Sink, scenario: Scenario, seconds: float) -> Summary:
    """The run's summary from the rows a sink of this process holds (a `memory:` ledger)."""
    transactions = await sink.read("transactions")
    meters = await sink.read("meters")
    settlements = len(await sink.read("settlements"))
    return summarize(transactions, meters, settlements, scenario.grid_tariff, scenario.rounds, seconds)


@contextlib.asynccontextmanager
async def _dso_agent(
    scenario: Scenario,
    scenario_path: str | Path,
    feeder: Any,
    url: str,
    tokens: dict[str, str],
    ledger: str,
    specs: list[ParticipantSpec],
    serializer: str,
) -> AsyncIterator[Any]:
    """The DSO agent on `/grid`, with its own connection to the ledger (results, readings)."""
    from controller.dso import DsoAgent
    from ledger import open_sink

    assert scenario.feeder is not None
    # Its own connection to a database ledger; a memory: ledger is the server's own, and a chain
    # ledger's (evm+) state belongs to the server: there the agent keeps its records in memory.
    sink = open_sink(ledger) if plain_database(ledger) else None
    if sink is not None:
        await sink.start()
    agent = DsoAgent(
        scenario,
        feeder,
        pid=scenario.feeder.dso_id,
        token=tokens[scenario.feeder.dso_id],
        sink=sink,
        base_dir=Path(scenario_path).parent,
        participants=[s.id for s in specs],
        serializer=serializer,
    )
    try:
        await agent.connect(url)
        yield agent
    finally:
        await agent.close()
        if sink is not None:
            await sink.close()


def _sites_of(clients: Fleet | FleetConnections) -> list[Prosumer]:
    if isinstance(clients, Fleet):
        return [c.prosumer for c in clients.clients]
    return [p for fc in clients.clients for p in fc.prosumers.values()]


# How long a `step` the market answers `unavailable` is asked again (its ledger could not
# store the round, say the disk is full: the retry is answered once the round is stored).
STEP_RETRY_SECONDS = 60.0


class StepUnavailable(Exception):
    """The market answered a `step` `unavailable` (the reply is the argument)."""


async def step(
    ctl: socketio.AsyncClient, t: int, timeout: float, retry_for: float = STEP_RETRY_SECONDS
) -> dict[str, Any]:
    """The `step` reply for time `t`, asked again with backoff while the market answers
    `unavailable`, for up to `retry_for` seconds (then `StepUnavailable`); any other reply
    is returned as it is."""
    retrying = AsyncRetrying(
        wait=wait_random_exponential(multiplier=0.1, max=2.0),
        stop=stop_after_delay(retry_for),
        retry=retry_if_exception_type(StepUnavailable),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            reply: dict[str, Any] = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=timeout)
            if not reply.get("ok") and (reply.get("error") or {}).get("code") == "unavailable":
                log.warning("step %s: %s; asking again", t, reply["error"].get("message"))
                raise StepUnavailable(reply)
    return reply


async def _step_all(
    ctl: socketio.AsyncClient,
    scenario: Scenario,
    progress: bool,
    dso: Any = None,
    parity: ParityAgents | None = None,
    sites: Callable[[], Awaitable[None]] | None = None,
) -> int:
    timeout = float(scenario.market.get("round_timeout", 10.0)) + 30
    missing = 0
    bar = tqdm(total=scenario.rounds, unit="round", disable=not progress, desc=scenario.name)
    for i in range(scenario.rounds):
        t = scenario.start_time + i * scenario.step
        if dso is not None:  # grid states of upcoming slots, before this step clears them
            await dso.before_step(t)
        if parity is not None:  # LEMs and SLAs to come, measurements of the ended ones
            await parity.before_step(t)
        try:
            reply = await step(ctl, t, timeout)
        except StepUnavailable as err:
            reply = err.args[0]
        if not reply.get("ok"):
            bar.close()
            raise RuntimeError(f"step {t} refused: {reply}")
        if dso is not None:  # the power flow of the slot just metered
            await dso.after_step((t, t + scenario.step))
        if sites is not None:  # the houses of the slot just metered
            await sites()
        missing += len(reply["round"]["missing"])
        bar.update()
    bar.close()
    if parity is not None and scenario.rounds:
        await parity.finish(scenario.start_time + (scenario.rounds - 1) * scenario.step)
    return missing


def main(
    scenario: str,
    ledger: str,
    participants: int | None,
    days: float | None,
    serializer: str,
    fleets: int = 0,
    market_args: Sequence[str] = (),
    transport: str = "socket",
) -> int:
    try:
        result = runloop.run(
            run_sim(
                scenario,
                ledger=ledger,
                participants=participants,
                days=days,
                serializer=serializer,
                fleets=fleets,
                market_args=market_args,
                transport=transport,
            )
        )
    except ValueError as err:  # a scenario this transport cannot run
        print(f"microte sim: {err}", file=sys.stderr)
        return 2
    print(render(result.summary, ledger))
    if result.parity is not None:
        print(result.parity.render())
    print(f"Start-up to first round: {result.startup_seconds:.2f} s; readings missing: {result.missing_total}")
    return 0
