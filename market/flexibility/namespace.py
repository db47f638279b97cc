"""The `/flex` namespace (docs/flexibility.md, seed 001): a thin adapter over `market.flexibility.machine`.

Event names contain dots (`flex.request`); `trigger_event` maps each to its
`on_<name with underscores>` handler and answers any other event `invalid`. Roles
`prosumer`, `aggregator`, `dso` and `operator` (who mints the aggregators' tokens) may
connect; each event checks who may send it.

Every event runs as one transaction: under a lock, expire due contracts and call the core
(a refusal is undone to a savepoint); then its ledger records are made durable and its
notices emitted before it is answered. Writes are group-committed: one write is in flight
at a time, and the events applied meanwhile (in order, each on the state the previous one
left) are stored together by the next. If a write fails, the core goes back to the
savepoint of the first event it held, which undoes that group and every event applied after
it (none of them stored yet), and all of them are answered `unavailable`: a failed event
changes no state, and nothing is answered before everything applied before it is durable.

A `flex.request` holds a second lock for its whole life (requests are handled one at a
time): it opens the request (offers go out), waits for the answers of the offered prosumers
that are online, never longer than the deadline (a silent prosumer counts as declined),
then allocates it; the state lock is free while it waits, so answers and other events go on.

`start()` rebuilds the core from the ledger's flexibility tables (`Flexibility.resume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import msgspec

from market.core.errors import MarketError
from market.core.protocol import EmptyMsg, decode
from market.core.records import Batch, Record
from market.core.registry import Role
from market.dispatch.base import Namespace, ServerPort, replying
from market.flexibility.contracts import Savepoint
from market.flexibility.machine import FLEX_RECORDS, Flexibility
from market.flexibility.messages import (
    AnswerMsg,
    ContractRefMsg,
    ContractRegisterMsg,
    ContractRenegotiateMsg,
    FlexConfig,
    FlexMeterMsg,
    FundMsg,
    Notice,
    RequestMsg,
    RequestRefMsg,
    ResultsMsg,
    StrategyMsg,
    TransferMsg,
)

log = logging.getLogger("microte.flex")

NAMESPACE = "/flex"
ROLES: frozenset[Role] = frozenset({"prosumer", "aggregator", "dso", "operator"})
TABLES = tuple(cls.TABLE for cls in FLEX_RECORDS)

# wire event -> handler suffix (`on_<suffix>`)
EVENTS: dict[str, str] = {
    "flex.contract.register": "contract_register",
    "flex.contract.renegotiate": "contract_renegotiate",
    "flex.contract.cancel": "contract_cancel",
    "flex.strategy": "strategy",
    "flex.request": "request",
    "flex.answer": "answer",
    "flex.meter": "meter",
    "flex.settle": "settle",
    "flex.status": "status",
    "flex.results": "results",
    "flex.fund": "fund",
    "flex.transfer": "transfer",
}


class _Applied(NamedTuple):
    """An event applied to the core, waiting for its records to be durable."""

    point: Savepoint  # the core before it
    records: list[Record]
    notices: list[Notice]
    done: asyncio.Future[None]


class FlexNamespace(Namespace):
    NAME = NAMESPACE
    ROLES = ROLES
    EVENTS = EVENTS

    def __init__(self, server: ServerPort, config: FlexConfig | None = None) -> None:
        super().__init__(server)
        # By default request windows align to the market's slot duration.
        self.core = Flexibility(config or FlexConfig(slot=server.config.duration))
        self._state = asyncio.Lock()  # one event's core call at a time
        self._one_request = asyncio.Lock()  # one flex.request at a time, answers included
        self._loaded = False
        self._open: str | None = None  # the request collecting answers
        self._waiting: set[str] = set()  # offered prosumers of `_open`, online, that have not answered
        self._answered = asyncio.Event()
        self._applied: list[_Applied] = []  # applied, for the next write
        self._writing = False  # a flusher task is storing groups

    async def start(self) -> None:
        """Resume from the ledger before the server accepts connections."""
        async with self._state:
            if not self._loaded:
                await self._resume()

    async def on_disconnect(self, sid: str, *reason: Any) -> None:
        pid = self.sessions.pid_of.get(sid)
        await super().on_disconnect(sid, *reason)
        if pid is not None and pid not in self.sessions.sid_of:
            self._waiting.discard(pid)  # a prosumer that left will not answer
        self._wake()

    # -- plumbing ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[int]:
        """Yield market time with the state locked; afterwards wait until the event's records
        (and those of every event before it) are durable and its notices emitted. A
        refusal, or a write that fails, undoes it (`unavailable` for the latter)."""
        async with self._state:
            if not self._loaded:
                await self._resume()
            point = self.core.savepoint()
            try:
                now = self.ms.clock.now()
                self.core.expire(now)
                yield now
            except BaseException:
                self.core.rollback(point)
                raise
            records, notices = self.core.take_outbox()
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._applied.append(_Applied(point, records, notices, done))
            if not self._writing:
                self._writing = True
                self.ms.spawn(self._flush())
        await done

    async def _flush(self) -> None:
        """Store the applied events group by group, in order; then emit their notices and
        let them reply. A failed write rolls the core back to its group's first savepoint."""
        try:
            while self._applied:
                group, self._applied = self._applied, []
                records = tuple(r for a in group for r in a.records)
                try:
                    if records:
                        await self.ms.sink.write(Batch(records))
                except Exception:
                    log.exception(
                        "flex: the ledger did not store %d records: %d events undone", len(records), len(group)
                    )
                    async with self._state:  # nothing applies meanwhile
                        self.core.rollback(group[0].point)
                        failed, self._applied = group + self._applied, []
                    for a in failed:
                        _fail(a.done, "the ledger could not store this event: undone")
                    continue
                for a in group:
                    for pid, event, payload in a.notices:
                        sid = self.sessions.sid_of.get(pid)
                        if sid is not None:
                            try:
                                await self.ms.sio.emit(event, payload, to=sid, namespace=NAMESPACE)
                            except Exception:  # a notice is best effort; the state is durable
                                log.exception("flex: notice %s to %s failed", event, pid)
                    if not a.done.done():
                        a.done.set_result(None)
        finally:
            self._writing = False
            for a in self._applied:  # only when cancelled (shutdown): never stored
                _fail(a.done, "the server is stopping")
            if self._applied:
                self._applied = []

    async def _resume(self) -> None:
        records: list[Record] = []
        for cls in FLEX_RECORDS:
            records += [msgspec.convert(row, cls) for row in await self.ms.sink.read(cls.TABLE)]
        self.core.resume(records)
        self._loaded = True
        if records:
            log.info(
                "flex resumed from the ledger: contracts=%d requests=%d",
                len(self.core.contracts()),
                len(self.core.requests()),
            )

    def _pending(self, request_id: str) -> list[str]:
        return [p for p in self.core.pending(request_id) if p in self.sessions.sid_of]

    def _wake(self) -> None:
        if self._open is not None and not self._waiting:
            self._answered.set()

    def _check_aggregator(self, pid: str) -> None:
        if not self.ms.registry.has_role(pid, "aggregator"):
            raise MarketError("not_found", f"unknown aggregator {pid!r}")

    def _online_prosumers(self) -> set[str]:
        roles = self.sessions.roles_of
        return {p for sid, p in self.sessions.pid_of.items() if "prosumer" in roles.get(sid, ())}

    # -- contracts -----------------------------------------------------------------------

    @replying
    async def on_contract_register(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        msg = decode(data, ContractRegisterMsg)
        self._check_aggregator(msg.aggregator)
        async with self._transaction() as now:
            return self.core.register(pid, msg, now)

    @replying
    async def on_contract_renegotiate(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        msg = decode(data, ContractRenegotiateMsg)
        async with self._transaction() as now:
            return self.core.renegotiate(pid, msg, now)

    @replying
    async def on_contract_cancel(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer", "aggregator")
        msg = decode(data, ContractRefMsg)
        async with self._transaction() as now:
            return self.core.cancel(pid, msg, now)

    @replying
    async def on_strategy(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "aggregator")
        msg = decode(data, StrategyMsg)
        async with self._transaction():
            return self.core.set_strategy(pid, msg)

    # -- requests ------------------------------------------------------------------------

    @replying
    async def on_request(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "dso")
        msg = decode(data, RequestMsg)
        self._check_aggregator(msg.aggregator)
        async with self._one_request:
            async with self._transaction() as now:
                stale = self.core.collecting()
                if stale is not None:  # left open by a write that failed twice: nobody handles it
                    self.core.abandon(stale)
                opened = self.core.open_request(pid, msg, now, reachable=self._online_prosumers())
            if opened.duplicate is not None:
                return opened.duplicate
            rid = opened.request.id
            within = msg.answer_within if msg.answer_within is not None else self.core.config.answer_timeout
            allocated = False
            try:
                self._open = rid
                self._waiting = set(self._pending(rid))
                self._answered.clear()
                self._wake()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._answered.wait(), within)
                self._open = None
                async with self._transaction() as now:
                    reply = self.core.allocate(rid, now)
                allocated = True
            finally:
                self._open = None
                self._waiting = set()
                if not allocated:  # failed or cancelled: let the next request open
                    async with self._state:
                        self.core.abandon(rid)
            log.info(
                "request=%s aggregator=%s power=%d allocated=%d shortfall=%d",
                rid,
                msg.aggregator,
                msg.power,
                reply["request"]["allocated"],
                reply["request"]["shortfall"],
            )
            return reply

    @replying
    async def on_answer(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        msg = decode(data, AnswerMsg)
        async with self._transaction() as now:
            reply = self.core.answer(pid, msg, now)
        self._waiting.discard(pid)
        self._wake()
        return reply

    # -- delivery and results --------------------------------------------------------------

    @replying
    async def on_meter(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        msg = decode(data, FlexMeterMsg)
        async with self._transaction() as now:
            return self.core.meter(pid, msg, now)

    @replying
    async def on_settle(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "aggregator", "dso")
        msg = decode(data, RequestRefMsg)
        async with self._transaction() as now:
            return self.core.settle(pid, msg, now)

    # -- tokens ----------------------------------------------------------------------------

    @replying
    async def on_fund(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "operator")
        msg = decode(data, FundMsg)
        self._check_aggregator(msg.aggregator)
        async with self._transaction() as now:
            return self.core.fund(pid, msg, now)

    @replying
    async def on_transfer(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid)
        msg = decode(data, TransferMsg)
        if self.ms.registry.role(msg.to) is None:
            raise MarketError("not_found", f"unknown participant {msg.to!r}")
        async with self._transaction() as now:
            return self.core.transfer(pid, msg, now)

    @replying
    async def on_status(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer", "aggregator", "operator")
        decode(data, EmptyMsg)
        async with self._transaction():
            return self.core.status(pid, self.sessions.roles_of.get(sid) or {self.sessions.role_of[sid]})

    @replying
    async def on_results(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "aggregator", "dso")
        msg = decode(data, ResultsMsg) if data is not None else ResultsMsg()
        async with self._transaction():
            return self.core.results(pid, msg)


def _fail(done: asyncio.Future[None], why: str) -> None:
    if not done.done():
        done.set_exception(MarketError("unavailable", why))
