"""In-process runs (`microte sim SCENARIO --transport inproc`): the sim server's round
(`MarketServer.step`, market/server/app.py) and the participant clients' handlers
(`ParticipantClient`), called directly: the same engine and the same `Prosumer`s, with no
server process, no sockets and no JSON. Same scenario and seed, same ledger as the socket
run, byte for byte (`tests/controller/test_inproc.py` compares the digests).

`InprocMarket` is also what the research environments step (controller/envs.py): a round
is `open` (fills announced, every prosumer meters and trades), `submit` for participants
driven from outside, then `close` (the slot is processed, deliveries handed out).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from controller import runloop
from controller.scenario import Scenario, run_record
from market.core.engine import Market, RoundOpen, SlotResult, order_reply, slot_records
from market.core.errors import MarketError
from market.core.protocol import EntryMsg, MeterMsg, OrdersMsg, Side, decode
from market.core.records import Batch, Record, RoundRecord, Settlement
from market.core.sink import Sink
from participants.messages import Settled, StartRound, parse
from participants.population import Population, plain
from participants.prosumer import Stats
from participants.sites import site_for
from participants.spec import ParticipantSpec
from participants.traders import Order

# Records kept before a write: the ledger is written in large batches (nobody waits for an
# acknowledgement in-process), and once more at the end. A database ledger is written by a
# child process (ledger/pipe_writer.py) in smaller ones: the rounds go on meanwhile, and
# only the last one is written after them.
WRITE_EVERY = 50_000
PIPE_EVERY = 4_000
# The child costs ~0.35 s to start (an interpreter and the database libraries), hidden only
# behind rounds that last longer: a run of fewer participant-rounds (~22 us each at N = 50)
# writes in this process.
PIPE_FROM = 40_000


class Site(Protocol):
    """What the in-process market asks of a participant (a `Prosumer`, or anything acting as one)."""

    def on_round_msg(self, msg: StartRound, *, trade: bool = True) -> tuple[dict[str, Any] | None, list[Order]]: ...
    def on_settled(self, payload: Any) -> None: ...
    def on_delivery(self, payload: Any) -> None: ...
    def take_records(self) -> list[Record]: ...


class InprocMarket:
    """One sim market and its prosumers in this process. Prosumers listed in `external`
    are metered and told of their fills and deliveries like the others, but trade only
    what `submit` gives them (their trader is not called)."""

    def __init__(
        self,
        scenario: Scenario,
        specs: Sequence[ParticipantSpec],
        *,
        base_dir: str | Path | None = None,
        external: Sequence[str] = (),
        upstream: bool = False,
        sites: Mapping[str, Site] | None = None,
        own: Sequence[str] = (),
        population: bool = True,
        crowd: bool = False,
        journal: bool = True,
    ) -> None:
        """`upstream`: this market trades its residuals in a market above (docs/hierarchy.md);
        `sites`: participants that are not built from specs (a community in its district).
        The plain prosumers that are neither external nor listed in `own` are members of one
        `Population` (participants/population.py: the same decisions as arrays; `population`
        False: a `Prosumer` each, the reference); the others are in `prosumers`. `crowd`: the
        plain external participants are members too, metered and never traded by it (a
        research environment's agents as arrays, controller/envs.py). `journal` False: the
        records of entries and readings are not made (`Market`), for a run that keeps no ledger."""
        if scenario.feeder is not None:
            raise ValueError(
                "--transport inproc does not run the DSO agent of a [feeder] scenario yet; use --transport socket"
            )
        self.scenario = scenario
        self.config = scenario.market_config("sim")
        self.market = Market(self.config, upstream=upstream, journal=journal)
        unknown = sorted(set(external) - {s.id for s in specs})
        if unknown:
            raise ValueError(f"external participants not in the scenario: {unknown}")
        apart = {*own} if crowd else {*external, *own}
        members = [s for s in specs if population and plain(s) and s.id not in apart]
        self.population = (
            Population(members, scenario.seed, timezone=scenario.timezone, base_dir=base_dir) if members else None
        )
        if self.population is not None:
            for pid in external:
                i = self.population.index.get(pid)
                if i is not None:
                    self.population.external[i] = True
        self._members = self.population.index if self.population is not None else {}
        self.prosumers = {
            s.id: site_for(s, scenario.seed, timezone=scenario.timezone, base_dir=base_dir, others=specs)
            for s in specs
            if s.id not in self._members
        }
        for pid in sites or {}:
            if pid in self.prosumers or pid in self._members:
                raise ValueError(f"participant {pid}: both a spec and a site")
        self._sites: dict[str, Site] = {**self.prosumers, **(sites or {})}  # everyone else, by id
        for pid in self._members:
            self._sites[pid] = _Member(self, pid)
        self.external = frozenset(external)
        # Who is handed a `delivery` payload: the members read the rows (`on_transactions`).
        self._delivered_to = frozenset(self._sites) - frozenset(self._members)
        self.order = [*(s.id for s in specs), *(sites or {})]  # the registry's order (the `missing` lists)
        self.records: list[Record] = []  # to be written, in the order the server writes them
        self.opened: RoundOpen | None = None
        self.message: StartRound | None = None  # the open round's `start_round`, decoded
        self.last: RoundRecord | None = None
        self.results: list[SlotResult] = []  # the slots the last `close` processed (a district reads them)
        self.refused = 0  # orders and readings the market refused (a client's `errors`)
        self.missing = 0  # readings missing, over every processed slot

    def stats(self, pid: str) -> Stats:
        """Participant `pid`'s counters and bill (a member of the population or a prosumer)."""
        i = self._members.get(pid)
        if i is not None:
            assert self.population is not None
            return self.population.stats_of(i)
        p = self._sites[pid]
        return p.stats  # type: ignore[attr-defined,no-any-return]

    def site(self, pid: str) -> Site:
        """The participant `pid`: a prosumer of the scenario, or a site given to the market."""
        return self._sites[pid]

    # -- one round ---------------------------------------------------------------------------

    def open(self, t: int) -> dict[str, Any]:
        """Open the round at `t` (as `step`): announce the fills, then every prosumer meters
        the current slot and trades `next_settle`. Returns the `start_round` payload."""
        if self.opened is not None:
            raise RuntimeError(f"round {self.opened.times.time} is still open: close it first")
        last = self.market.times
        if last is not None and t <= last.time:
            raise ValueError(f"round {t} is not after round {last.time}")
        self.opened = opened = self.market.open_round(t, None, parties=self._delivered_to)
        pop, members = self.population, self._members
        if pop is not None:
            pop.on_settlements(opened.settlements)
        for pid, payload in opened.settled:
            if pid in members:
                continue
            p = self._sites.get(pid)
            if p is not None:
                p.on_settled(payload)
        msg = self.message = parse(opened.start_round, StartRound)  # once for all: each client would parse its copy
        if pop is not None:  # the members' orders, then their readings, in member order
            meters, batch = pop.on_round(msg)
            ids = pop.ids
            if batch is not None and len(batch):
                booked = self.market.submit_each([(ids[m], side, e) for m, side, e in batch.entries()])
                self.refused += sum(1 for r in booked if isinstance(r, MarketError))
            if meters is not None:
                replies = self.market.meter_each(zip(ids, meters.messages(), strict=True), sources=meters.keys())
                self.refused += sum(1 for r in replies if isinstance(r, MarketError))
        for pid in self.order:
            if pid in members:
                continue
            p = self._sites[pid]
            meter, orders = p.on_round_msg(msg, trade=pid not in self.external)
            if orders:
                self.submit(pid, orders)
            if meter is not None:
                self._reply(pid, "meter", meter)
        return opened.start_round

    def submit(self, pid: str, orders: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Orders of `pid` for the open round, as an `orders` event: each order's reply."""
        reply = self._reply(pid, "orders", {"orders": orders})
        return list(reply.get("results", []))

    def close(self) -> RoundRecord:
        """Process the open round's slot (as the end of `step`) and hand out deliveries."""
        opened = self.opened
        if opened is None:
            raise RuntimeError("no round is open")
        self.opened = None
        self.results = []
        t = opened.times.time
        for skipped in [s for s in self.market.delivering() if s < t]:  # never when stepping by one slot
            self._finish(opened, skipped, [])
        summary = self._finish(opened, t, opened.settlements)
        for pid in self.order:  # what sites record of their own (a PEM site's houses)
            if pid not in self._members:
                self.records += self._sites[pid].take_records()
        return summary

    def step(self, t: int) -> RoundRecord:
        self.open(t)
        return self.close()

    def take_records(self) -> list[Record]:
        out, self.records = self.records, []
        return out

    # -- what the server does ------------------------------------------------------------------

    def _reply(self, pid: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Handle one event as the `/market` namespace does (round durability): the reply."""
        try:
            if event == "orders":
                OrdersMsg.check_size(data)
                reply: dict[str, Any] = {"results": self.market.submit_orders(pid, decode(data, OrdersMsg))}
                self.refused += sum(1 for r in reply["results"] if not r.get("ok"))
            else:
                reply = self.market.meter(pid, decode(data, MeterMsg))
        except MarketError as err:
            self.refused += 1
            return err.reply()
        return reply

    def submit_each(self, items: list[tuple[str, Side, EntryMsg]]) -> list[dict[str, Any] | None]:
        """Orders of participants already decoded (as `OrdersMsg` would: the caller built them
        within the protocol's bounds), in order, each booked or refused on its own: each
        order's refusal reply, or None where it was booked."""
        out = [order_reply(r) if isinstance(r, MarketError) else None for r in self.market.submit_each(items)]
        self.refused += sum(1 for r in out if r is not None)
        return out

    def _finish(self, opened: RoundOpen, slot: int, fills: Sequence[Settlement]) -> RoundRecord:
        result = self.market.process(slot, opened.times.time, parties=self._delivered_to)
        self.results.append(result)
        metered = set(result.metered)
        missing = [p for p in self.order if p not in metered]
        self.missing += len(missing)
        records, summary = slot_records(opened, result, self.market.take_journal(), fills, missing)
        self.records += records
        self.records.append(summary)
        self.last = summary
        if self.population is not None:
            self.population.on_transactions(slot, result.transactions)
        for pid, payload in result.deliveries.items():
            if pid in self._members:
                continue
            p = self._sites.get(pid)
            if p is not None:
                p.on_delivery(payload)
        return summary


class _Member:
    """A member of the market's population where a `Site` is asked for (a district's fills)."""

    def __init__(self, run: InprocMarket, pid: str) -> None:
        self._run, self._pid = run, pid

    @property
    def stats(self) -> Stats:
        return self._run.stats(self._pid)

    def on_round_msg(self, msg: StartRound, *, trade: bool = True) -> tuple[dict[str, Any] | None, list[Order]]:
        raise RuntimeError("a member of the population trades with it (InprocMarket.open)")

    def on_settled(self, payload: Any) -> None:
        pop = self._run.population
        assert pop is not None
        pop.on_settled(pop.index[self._pid], parse(payload, Settled))

    def on_delivery(self, payload: Any) -> None:
        raise RuntimeError("a member of the population is delivered with it (InprocMarket.close)")

    def take_records(self) -> list[Record]:
        return []


async def run_inproc(
    scenario: Scenario,
    specs: Sequence[ParticipantSpec],
    *,
    ledger: str,
    base_dir: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    sink: Sink | None = None,
) -> tuple[float, int]:
    """Every round of `scenario`, the ledger written to `ledger` (or to `sink`, not started
    yet: e.g. a `memory:` ledger the caller reads afterwards): (seconds the rounds took,
    readings missing). The SQLite or PostgreSQL ledger of a long run is written by a child
    process while the rounds step (`LedgerPipe`); the seconds include waiting for its last
    write."""
    # Here, not at the top: the database libraries are not for an environment, which writes no ledger.
    from controller.site_records import plain_database
    from ledger.pipe_writer import LedgerPipe

    piped = sink is None and plain_database(ledger) and scenario.rounds * len(specs) >= PIPE_FROM
    pipe = LedgerPipe(ledger) if piped else None
    try:
        if pipe is not None:
            await pipe.start()  # it loads on the other core while the run is built
        run = InprocMarket(scenario, specs, base_dir=base_dir)
        runloop.settle_heap()  # the imports and the prosumers are long-lived: collections skip them
        if pipe is not None:
            out = await _rounds(run, scenario, pipe.write, PIPE_EVERY, progress, pipe.finish)
            await pipe.close()
            return out
    except BaseException:
        if pipe is not None:
            with contextlib.suppress(Exception):  # the error that matters is the run's
                await pipe.close()
        raise
    if sink is None:
        from ledger import open_sink

        sink = open_sink(ledger)
    await sink.start()
    target = sink

    async def write(records: Sequence[Record]) -> None:
        await target.write(Batch(tuple(records)))

    try:
        return await _rounds(run, scenario, write, WRITE_EVERY, progress, None)
    finally:
        await sink.close()


async def _rounds(
    run: InprocMarket,
    scenario: Scenario,
    write: Callable[[Sequence[Record]], Awaitable[None]],
    every: int,
    progress: Callable[[int], None] | None,
    finish: Callable[[], Awaitable[None]] | None,
) -> tuple[float, int]:
    """Step every round, writing the records every `every` and at the end (then `finish`,
    which makes them durable, inside the time measured)."""
    await write([run_record(scenario, run.config)])
    t0 = time.perf_counter()
    for i in range(scenario.rounds):
        run.step(scenario.start_time + i * scenario.step)
        if len(run.records) >= every:
            await write(run.take_records())
        if progress is not None:
            progress(1)
    await write(run.take_records())
    if finish is not None:
        await finish()
    return time.perf_counter() - t0, run.missing
