"""The `/grid` periodic solver and the market clock (docs/parity.md, *Periodic solver*).

The namespace runs on a small stand-in for the server (registry, memory sink, clock): in sim
mode `on_time` is what the server calls after each `step`; in rt mode `follow_wall_clock`
sleeps until the next `k*solve_every + solve_delay` of a fake wall clock. Times: T is 12:00
UTC, LEMs are 15 minutes, the solver runs hourly a minute after the hour (the defaults).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from controller import cli, parity_flags
from controller.scenario import Scenario, load_scenario
from market.community.messages import KpiMeasureMsg, LemSetMsg, ParityConfig, PseudonymConfig, SlaSetMsg
from market.community.namespace import GridNamespace
from market.community.pseudonyms import create_key
from market.core.engine import MarketConfig
from market.core.protocol import decode
from market.core.records import Batch
from market.core.registry import Registry
from market.core.sink import MemorySink
from market.core.timing import RealTimeClock, SimClock
from market.dispatch.ratelimit import RateLimiter

T = 1_699_963_200  # 2023-11-14 12:00 UTC
Q = 900
H = 3600


class FakeWall(RealTimeClock):
    """A wall clock that moves only when told (fractional seconds)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def now(self) -> int:
        return int(self.t)

    def seconds_to_next(self, duration: int) -> float:
        return duration - (self.t % duration)


class Port:
    """What GridNamespace uses of the server."""

    def __init__(self, clock: SimClock | RealTimeClock, sink: MemorySink | None = None) -> None:
        self.config = MarketConfig(duration=Q)
        self.registry = Registry.from_dict(
            {
                "participants": [
                    {"id": "AGG", "token": "t-agg", "role": "aggregator"},
                    *({"id": p, "token": f"t-{p}", "role": "prosumer"} for p in ("P1", "P2")),
                ]
            }
        )
        self.sink = sink or MemorySink()
        self.clock = clock
        self.limiter = RateLimiter(100, 100)
        self.tasks: list[asyncio.Task[None]] = []

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.ensure_future(coro))


def grid(port: Port, config: ParityConfig | None = None) -> GridNamespace:
    return GridNamespace(port, config)  # type: ignore[arg-type]


async def set_lems(ns: GridNamespace, starts: list[int], now: int) -> None:
    """LEMs of P1 and P2 by AGG, as `lem.set` makes them (under their pseudonyms)."""
    agg, players = await ns._me("AGG"), await ns._players(["P1", "P2"], frozenset({"prosumer"}))
    for s in starts:
        msg = decode({"time_delivery": [s, s + Q], "players": players}, LemSetMsg)
        await ns._commit(ns.core.set_lem(agg, msg, now))


def hour(h: int) -> tuple[int, ...]:
    """The starts of the four LEMs of hour `h` after T."""
    return tuple(T + h * H + k * Q for k in range(4))


def solve_ids(sink: MemorySink) -> dict[int, str]:
    """LEM start -> the solve that solved it, from the records written."""
    return {
        r.time_delivery_start: r.solve_id  # type: ignore[attr-defined]
        for b in sink.batches
        for r in b.records
        if r.TABLE == "lem_results"
    }


# -- sim: the server's `step` drives the solver ------------------------------------------------


async def test_boundaries_passed_at_once_are_solved_one_by_one_in_order() -> None:
    clock = SimClock(T - Q)
    ns = grid(Port(clock))
    await ns.start()
    await set_lems(ns, [*hour(0), *hour(2)], T - Q)  # nothing in hour 1
    for now in (T, T + H, T + H + 59):  # not due yet: 13:00 is solved at 13:01
        await ns.on_time(now)
    assert ns.solved_at_boundary == {} and ns.periodic_solves == 0
    await ns.on_time(T + 3 * H + Q)  # a step from 12:00 to 15:15
    assert ns.solved_at_boundary == {T + H: hour(0), T + 3 * H: hour(2)}
    assert ns.periodic_solves == 2  # the boundary of 14:00 had nothing to solve: skipped
    ids = solve_ids(ns.ms.sink)  # type: ignore[arg-type]
    assert {ids[s] for s in hour(0)} == {f"s{T}-{T + H}"} and {ids[s] for s in hour(2)} == {f"s{T + 2 * H}-{T + 3 * H}"}
    writes = len(ns.ms.sink.batches)  # type: ignore[attr-defined]
    for now in (T + 3 * H + Q, T + 3 * H + 2 * Q, T, T + 4 * H + 59):  # again, later, earlier: nothing to do
        await ns.on_time(now)
    assert ns.periodic_solves == 2 and len(ns.ms.sink.batches) == writes  # type: ignore[attr-defined]


async def test_solve_delay_and_period_come_from_the_config() -> None:
    ns = grid(Port(SimClock(T - Q)), ParityConfig(solve_every=Q, solve_delay=0))
    await ns.start()
    await set_lems(ns, list(hour(0)), T - Q)
    await ns.on_time(T + Q - 1)
    assert ns.solved_at_boundary == {}
    await ns.on_time(T + Q)  # the first LEM ended at 12:15, solved at 12:15 exactly
    await ns.on_time(T + 3 * Q)  # 12:30 and 12:45 in turn
    assert ns.solved_at_boundary == {T + Q: (T,), T + 2 * Q: (T + Q,), T + 3 * Q: (T + 2 * Q,)}
    off = grid(Port(SimClock(T - Q)), ParityConfig(solve_every=0))
    await off.start()
    await set_lems(off, list(hour(0)), T - Q)
    await off.on_time(T + 9 * H)
    assert off.solved_at_boundary == {} and off.periodic_solves == 0


async def test_the_periodic_checker_checks_each_sla_once_an_hour_after_it_ends() -> None:
    """The seed's example: the SLA of 12:00-14:00 (two 1 h KPI periods) is checked at 15:00
    (`sla_grace` 3600, at the 15:01 boundary); a value that breaks its KPI costs its penalty
    once, a value inside the limit nothing, and later boundaries and restarts check nothing."""
    sink = MemorySink()
    ns = grid(Port(SimClock(T - Q), sink))
    await ns.start()
    agg, (p1, p2) = await ns._me("AGG"), await ns._players(["P1", "P2"], frozenset({"prosumer"}))
    kpi = {"id": "KPI1", "signal": "import_wh", "rule": "gt", "limit": 500.0, "penalty": 7_000, "resolution": H}
    sla = {"id": "SLA1", "start": T, "end": T + 2 * H, "kpis": [{**kpi, "players": [p1, p2]}]}
    await ns._commit(ns.core.set_sla(agg, decode(sla, SlaSetMsg), T - Q))
    for player, start, value in ((p1, T, 900.0), (p1, T + H, 100.0), (p2, T, 400.0)):
        saved = {"sla": "SLA1", "kpi": "KPI1", "time_interval": [start, start + H], "value": value}
        await ns._commit(ns.core.measure_kpi(player, decode(saved, KpiMeasureMsg), T + 2 * H))
    for now in (T + 2 * H + 61, T + 3 * H + 59):  # ended, but inside the grace hour
        await ns.on_time(now)
    assert ns.checked_slas == {}
    await ns.on_time(T + 3 * H + 60)
    assert ns.checked_slas == {"SLA1": T + 3 * H + 60}
    penalties = [r for b in sink.batches for r in b.records if r.TABLE == "token_transfers"]
    assert [(t.payer_id, t.payee_id, t.amount, t.time_start) for t in penalties] == [(p1, agg, 7_000, T)]  # type: ignore[attr-defined]
    assert ns.core.balances() == {agg: 7_000, p1: -7_000}
    writes = len(sink.batches)
    await ns.on_time(T + 6 * H)
    again = grid(Port(SimClock(T + 6 * H), sink), ParityConfig())
    again._pseudonyms = ns._pseudonyms  # the same in-memory key: the same pseudonyms
    await again.start()
    assert len(sink.batches) == writes and again.checked_slas == {} and again.core.balances() == ns.core.balances()


async def test_a_failed_solve_is_retried_at_the_next_boundary() -> None:
    class Flaky(MemorySink):
        fail = 0

        async def write(self, batch: Batch) -> None:
            if self.fail and any(r.TABLE == "lem_results" for r in batch.records):
                self.fail -= 1
                raise OSError("disk full")
            await super().write(batch)

    sink = Flaky()
    ns = grid(Port(SimClock(T - Q), sink))
    await ns.start()
    await set_lems(ns, [*hour(0), *hour(1)], T - Q)
    sink.fail = 1
    await ns.on_time(T + H + Q)  # the solve of 13:00 fails: logged, nothing applied
    assert ns.solved_at_boundary == {} and not any(ns.core.is_solved(s) for s in hour(0))
    await ns.on_time(T + 2 * H + Q)  # 14:00 solves both hours
    assert ns.solved_at_boundary == {T + 2 * H: hour(0) + hour(1)} and ns.periodic_solves == 2


async def test_a_restart_catches_up_boundary_by_boundary(tmp_path: Path) -> None:
    """A server restarted after several boundaries passed (sim: the clock resumes at the last
    `step`) solves what they left, as the running server would have: hour by hour."""
    sink = MemorySink()
    keyed = ParityConfig(pseudonyms=PseudonymConfig(key_file=str(tmp_path / "pseudonym.key")))
    first = grid(Port(SimClock(T - Q), sink), keyed)
    await first.start()
    await set_lems(first, [*hour(0), *hour(1)], T - Q)
    again = grid(Port(SimClock(T + 2 * H + Q), sink), keyed)  # resumed from the same ledger at 14:15
    await again.start()
    assert again.solved_at_boundary == {T + H: hour(0), T + 2 * H: hour(1)}
    ids = solve_ids(sink)
    assert {ids[s] for s in hour(1)} == {f"s{T + H}-{T + 2 * H}"}


async def test_a_restart_without_the_pseudonym_key_is_refused(tmp_path: Path) -> None:
    """The ledger holds pseudonyms made with a key: a server that would make a new key (the
    file is gone, or there is none) refuses to start instead of renaming everyone."""
    sink, key = MemorySink(), tmp_path / "pseudonym.key"
    keyed = ParityConfig(pseudonyms=PseudonymConfig(key_file=str(key)))
    first = grid(Port(SimClock(T - Q), sink), keyed)
    await first.start()
    agg = await first._me("AGG")  # the key file is made on first use, mode 0600
    assert key.stat().st_mode & 0o777 == 0o600 and agg.startswith("ps-")
    await set_lems(first, [T], T - Q)
    key.rename(tmp_path / "elsewhere")
    with pytest.raises(RuntimeError, match=f"the pseudonym key {key} does not exist"):
        await grid(Port(SimClock(T), sink), keyed).start()
    with pytest.raises(RuntimeError, match="no pseudonym key file"):
        await grid(Port(SimClock(T), sink)).start()  # a registry in memory, no key_file
    (tmp_path / "elsewhere").rename(key)
    again = grid(Port(SimClock(T), sink), keyed)
    await again.start()
    assert again.core.lem(T).aggregator == agg  # the same key: the same pseudonyms
    p1 = first.core.lem(T).players[0]  # a pseudonym the first run gave out names its player
    assert await again._players([p1, "P2"], frozenset({"prosumer"})) == list(first.core.lem(T).players)
    key.write_text("not a key\n")
    with pytest.raises(ValueError, match="not a pseudonym key"):
        await grid(Port(SimClock(T), sink), keyed).start()


async def test_a_restart_with_another_pseudonym_key_is_refused(tmp_path: Path) -> None:
    """A valid key file, but not the one the ledger's pseudonyms were made with (a key
    restored from the wrong backup): the server refuses to start instead of giving every
    participant new pseudonyms."""
    sink, key = MemorySink(), tmp_path / "pseudonym.key"
    keyed = ParityConfig(pseudonyms=PseudonymConfig(key_file=str(key)))
    first = grid(Port(SimClock(T - Q), sink), keyed)
    await first.start()
    await set_lems(first, [T], T - Q)
    key.rename(tmp_path / "right.key")
    create_key(key)  # another valid key in its place
    with pytest.raises(RuntimeError, match="not the key the ledger's pseudonyms were made with"):
        await grid(Port(SimClock(T), sink), keyed).start()
    key.unlink()
    (tmp_path / "right.key").rename(key)
    again = grid(Port(SimClock(T), sink), keyed)
    await again.start()
    assert again.core.lem(T).players == first.core.lem(T).players


def test_configure_only_before_start() -> None:
    ns = grid(Port(SimClock(T)))
    ns.configure(ParityConfig(lem_duration=300, solve_every=Q))
    assert ns.core.config.lem_duration == 300 and ns.core.config.solve_every == Q
    asyncio.run(ns.start())
    with pytest.raises(RuntimeError):
        ns.configure(ParityConfig())


# -- rt: the wall clock, no polling ------------------------------------------------------------


async def test_rt_sleeps_until_each_boundary_plus_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """In rt mode the solver sleeps exactly until the next `k*solve_every + solve_delay` (a
    millisecond after it) and solves there: one wake-up per boundary, no polling between."""
    wall = FakeWall(T - Q + 0.25)  # 11:45:00.25
    ns = grid(Port(wall))
    await set_lems(ns, [*hour(0), *hour(1)], T - Q)
    sleeps: list[float] = []
    solved_when: list[tuple[float, dict[int, tuple[int, ...]]]] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        if len(sleeps) == 3:
            raise asyncio.CancelledError
        sleeps.append(seconds)
        wall.t += seconds
        await real_sleep(0)
        solved_when.append((wall.t, dict(ns.solved_at_boundary)))

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    await ns.start()  # spawns follow_wall_clock (rt)
    task = ns.ms.tasks[0]  # type: ignore[attr-defined]
    with pytest.raises(asyncio.CancelledError):
        await task
    # 11:45:00.25 -> 12:01:00.001 (nothing ended by 12:00) -> 13:01:00.001 -> 14:01:00.001
    first = (T + 60) - (T - Q + 0.25)
    assert sleeps == pytest.approx([first + 0.001, H, H], abs=1e-6)
    assert ns.solved_at_boundary == {T + H: hour(0), T + 2 * H: hour(1)}
    # Each solve ran at the wake-up at its boundary + delay, not before and not later.
    assert [(round(t - T, 3), sorted(solved)) for t, solved in solved_when] == [
        (60.001, []),
        (H + 60.001, []),
        (2 * H + 60.001, [T + H]),
    ]


# -- configuration: scenario `[parity]` and the command line -----------------------------------


def test_scenario_parity_table_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[parity]\nlem_duration = 300\nsolve_every = 900\nsolve_delay = 30\n")
    scenario = load_scenario(path)
    assert scenario.parity_config() == ParityConfig(lem_duration=300, solve_every=900, solve_delay=30)
    assert scenario.parity_config(solve_delay=0, solve_every=None).solve_delay == 0
    assert Scenario().parity_config() == ParityConfig()
    with pytest.raises(SystemExit, match="solve_every"):
        Scenario().parity_config(solve_every=-1)
    path.write_text("[parity]\npoll = 1\n")
    with pytest.raises(SystemExit):
        load_scenario(path)

    args = cli.parser().parse_args(
        ["market", "--registry", "r.toml", "--lem-solve-every", "900", "--lem-duration", "300"]
    )
    assert parity_flags.parity_overrides(args) == {"lem_duration": 300, "solve_every": 900, "solve_delay": None}
    args = cli.parser().parse_args(["sim", "s.toml", "--lem-solve-delay", "0", "--lem-solve-every", "86400"])
    assert parity_flags.parity_flags(args) == ["--lem-solve-every", "86400", "--lem-solve-delay", "0"]
