"""Namespace `/fleet`: one connection speaks for many prosumers, each still authenticated.

A fleet connects with `auth = {"fleet": [{"id", "token"}, ...]}`; every member must be a
registered prosumer with its own token, or the whole connection is refused. The
connection receives `start_round` once, and `settled` / `delivery` as one batch per round
(`{"events": [{"participant", ...payload}]}`), or as tables (`settled.columns`,
`delivery.columns`) if it logged in with `auth.columns`; it sends `orders` and `meters`
batches whose items name their participant, which must be one of its members
(docs/protocol.md).
"""

from __future__ import annotations

import functools
import logging
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import socketio

from market.core.book import Entry
from market.core.engine import order_reply
from market.core.errors import MarketError
from market.core.fleet_columns import decode_meters, decode_orders
from market.core.protocol import EntryMsg, FleetMetersMsg, FleetOrdersMsg, MeterMsg, Side, decode
from market.core.registry import Role
from market.dispatch.base import Namespace, backing_off, login_keys, refuse_throttled, replying
from market.server.port import MarketPort

_Item = TypeVar("_Item", bound=tuple[Any, ...])  # an item of a batch, its participant first
_R = TypeVar("_R")
_first = operator.itemgetter(0)  # an item's participant

log = logging.getLogger("microte.market")
MAX_MEMBERS = 20000


class FleetNamespace(Namespace):
    ms: MarketPort

    NAME = "/fleet"
    EVENTS: ClassVar[dict[str, str] | None] = {
        "orders": "orders",
        "meters": "meters",
        "join": "join",
        "orders.columns": "orders_columns",
        "meters.columns": "meters_columns",
    }
    ROLES = frozenset[Role]({"prosumer"})

    def __init__(self, server: MarketPort) -> None:
        super().__init__(server)
        self.members: dict[str, frozenset[str]] = {}  # fleet sid -> its participants
        self.sid_of: dict[str, str] = {}  # participant -> fleet sid
        self.columnar: set[str] = set()  # fleet sids that logged in with `auth.columns`
        self._routes: dict[str, str] | None = None  # their members -> sid, until membership changes
        self._own: dict[str, frozenset[str]] = {}  # sid -> `_own_members`, until membership changes

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        logins = self.ms.limiter.logins
        address = login_keys(environ, [])
        refuse_throttled(logins.wait(address), self.namespace)  # before any member is checked
        if self.ms.market_ids:  # its batches name members by registry id: not under pseudonyms
            raise socketio.exceptions.ConnectionRefusedError(
                "unavailable: /fleet is off while the auction trades under pseudonyms "
                "([parity.pseudonyms] market = true): connect each prosumer on /market"
            )
        creds = auth.get("fleet") if isinstance(auth, dict) else None
        if not isinstance(creds, list) or not 0 < len(creds) <= MAX_MEMBERS:
            raise socketio.exceptions.ConnectionRefusedError(
                f"unauthorized: auth must be {{'fleet': [{{'id', 'token'}}, ...]}} with 1 to {MAX_MEMBERS} members"
            )
        columns = auth.get("columns", False)
        if not isinstance(columns, bool):
            raise socketio.exceptions.ConnectionRefusedError("invalid: auth.columns must be true or false")
        ids = [cred.get("id") if isinstance(cred, dict) else None for cred in creds]
        refuse_throttled(logins.wait(login_keys(environ, ids)), self.namespace)
        try:
            members = self._check_logins(environ, creds, ids)
        except MarketError as err:
            raise socketio.exceptions.ConnectionRefusedError(f"{err.code}: {err.message}") from None
        self.members[sid] = frozenset()
        if columns:
            self.columnar.add(sid)
            self._membership_changed()
        await self._admit_members(sid, members)
        log.info("ns=/fleet connect members=%d", len(members))

    def _check_logins(self, environ: dict[str, Any], creds: list[Any], ids: list[Any]) -> list[str]:
        """The members `creds` name, each with its own token and role prosumer, or
        `unauthorized` naming the first that is not (a wrong token counts as a failed login)."""
        logins = self.ms.limiter.logins
        pids = []
        for cred, name in zip(creds, ids, strict=True):
            who = self.ms.registry.authenticate(cred)
            if who is None or not self.ms.registry.has_role(who[0], "prosumer"):
                if who is None:  # a wrong token (a prosumer-only namespace is no guess)
                    logins.failed(login_keys(environ, [name]))
                log.warning("ns=/fleet refused: bad credentials for %r", name)
                raise MarketError("unauthorized", f"member {name!r}")
            pids.append(who[0])
        for pid in pids:
            logins.succeeded(f"id:{pid}")
        return pids

    async def _admit_members(self, sid: str, pids: list[str]) -> None:
        market_sessions = self.ms.sessions["/market"]
        for pid in pids:
            old = market_sessions.sid_of.get(pid)
            if old is not None:  # one live session per id: the fleet login replaces it
                market_sessions.pid_of.pop(old, None)
                await self.ms.sio.disconnect(old, namespace="/market")
            self.sid_of[pid] = sid
        self.members[sid] = members = self.members[sid] | frozenset(pids)
        self._membership_changed()  # after both maps: what it forgets is made again from them
        self.ms.authenticated(sid, self.namespace, len(members))

    @replying
    async def on_join(self, sid: str, data: Any) -> dict[str, Any]:
        """More members for a logged-in connection (`{"fleet": [{"id", "token"}, ...]}`), all
        or none: a connect packet is held to the server's byte budget before login (64 KB,
        ~1,000 members), so a larger fleet logs in with its first members and joins the rest."""
        members = self._fleet(sid)
        creds = data.get("fleet") if isinstance(data, dict) else None
        room = MAX_MEMBERS - len(members)
        if not isinstance(creds, list) or not 0 < len(creds) <= room:
            raise MarketError("invalid", f"payload must be {{'fleet': [{{'id', 'token'}}, ...]}} with 1 to {room} ids")
        environ = self.ms.sio.get_environ(sid, namespace=self.namespace) or {}
        ids = [cred.get("id") if isinstance(cred, dict) else None for cred in creds]
        wait = self.ms.limiter.logins.wait(login_keys(environ, ids))
        if wait > 0:
            raise MarketError("unauthorized", backing_off(wait).removeprefix("unauthorized: "))
        pids = self._check_logins(environ, creds, ids)
        await self._admit_members(sid, pids)
        log.info("ns=/fleet join members=%d total=%d", len(pids), len(self.members[sid]))
        return {"members": len(self.members[sid])}

    async def on_disconnect(self, sid: str, *_reason: Any) -> None:
        members = self.members.pop(sid, frozenset())
        self.columnar.discard(sid)
        self.ms.limiter.forget(_bucket(sid))  # sids are never reused: a bucket per connection would pile up
        self._membership_changed()
        for pid in members:
            if self.sid_of.get(pid) == sid:
                del self.sid_of[pid]
                self.ms.participant_left(pid)
        log.info("ns=/fleet disconnect members=%d", len(members))

    def _membership_changed(self) -> None:
        self._routes = None
        self._own.clear()

    def _own_members(self, sid: str) -> frozenset[str]:
        """The members `sid` speaks for: none logged in on another fleet connection since.
        A set, so that a batch's items are checked in one subset test, not one by one."""
        own = self._own.get(sid)
        if own is None:
            mine = self.sid_of
            own = self._own[sid] = frozenset(p for p in self.members[sid] if mine.get(p) == sid)
        return own

    def columnar_routes(self, elsewhere: Iterable[str]) -> dict[str, str]:
        """member -> sid of the `auth.columns` connections' members, but those in `elsewhere`
        (logged in on `/market` since: their events go there). Not to be changed by the caller."""
        routes = self._routes
        if routes is None:
            own = self._own_members
            routes = self._routes = {pid: sid for sid in self.columnar if sid in self.members for pid in own(sid)}
        away = {pid for pid in elsewhere if pid in routes}
        if not away:
            return routes
        return {pid: sid for pid, sid in routes.items() if pid not in away}

    def _fleet(self, sid: str) -> frozenset[str]:
        members = self.members.get(sid)
        if members is None:
            raise MarketError("unauthorized", "no authenticated fleet session")
        if not self.ms.limiter.allow(_bucket(sid)):
            raise MarketError("rate_limited", "too many events: slow down")
        return members

    def _charge_members(self, sid: str, participants: list[str]) -> None:
        """One rate token per item from each member's own bucket (the one its `/market`
        events use), all or nothing: `rate_limited` before any change if one cannot pay.
        Items of non-members are refused one by one and charge nobody."""
        own = self._own_members(sid)
        costs = Counter(participants)
        if not own.issuperset(costs):
            costs = Counter({p: n for p, n in costs.items() if p in own})
        if costs:
            self._charge(costs)

    def _for_members(
        self, sid: str, items: list[_Item], participants: list[str], book: Callable[[list[_Item]], list[_R]]
    ) -> list[_R | MarketError]:
        """`book` of the items (participant first, `participants` their participants) of this
        connection's members, in order; the others refused one by one as not members, in their places."""
        own = self._own_members(sid)
        if own.issuperset(participants):
            return list(book(items))
        foreign = {i for i, pid in enumerate(participants) if pid not in own}
        booked = iter(book([item for i, item in enumerate(items) if i not in foreign]))
        return [_not_member(item[0]) if i in foreign else next(booked) for i, item in enumerate(items)]

    async def _submit(
        self, sid: str, orders: list[tuple[str, Side, EntryMsg]]
    ) -> list[tuple[Entry, bool] | MarketError]:
        """Book a batch's orders, each accepted or refused on its own: the booked entry (and
        whether it repeated one) or the refusal, per order."""
        participants = list(map(_first, orders))
        self._charge_members(sid, participants)
        await self.ms.admit()
        results = self._for_members(sid, orders, participants, self.ms.market.submit_each)
        await self.ms.persist()
        return results

    async def _meter(
        self, sid: str, readings: list[tuple[str, MeterMsg]], book: Callable[[list[Any]], list[Any]] | None = None
    ) -> list[dict[str, Any] | MarketError]:
        """Each reading's reply or refusal, in order (`book`: the market's `meter_each`, or it
        with what the caller checked of the whole batch)."""
        participants = list(map(_first, readings))
        self._charge_members(sid, participants)
        await self.ms.admit()
        results = self._for_members(sid, readings, participants, book or self.ms.market.meter_each)
        await self.ms.persist()
        for (pid, reading), reply in zip(readings, results, strict=True):
            if not isinstance(reply, MarketError):
                self.ms.meter_arrived(pid, reading.time_interval[0])
        return results

    @replying
    async def on_orders(self, sid: str, data: Any) -> dict[str, Any]:
        self._fleet(sid)
        orders = decode(data, FleetOrdersMsg).orders
        results = await self._submit(sid, [(o.participant, o.side, o.entry()) for o in orders])
        return {"results": [order_reply(r) for r in results]}

    @replying
    async def on_meters(self, sid: str, data: Any) -> dict[str, Any]:
        self._fleet(sid)
        readings = decode(data, FleetMetersMsg).readings
        results = await self._meter(sid, [(r.participant, r.meter()) for r in readings])
        return {"results": [r.reply() if isinstance(r, MarketError) else {"ok": True, **r} for r in results]}

    @replying
    async def on_orders_columns(self, sid: str, data: Any) -> dict[str, Any]:
        """`orders.columns`: the reply is columnar too, a uuid per order (null if refused)
        and the refusals by index, instead of a dict per order."""
        self._fleet(sid)
        results = await self._submit(sid, decode_orders(data).items())
        uuids = [None if isinstance(r, MarketError) else r[0].uuid for r in results]
        return {"uuid": uuids, "refused": _refused(results)}

    @replying
    async def on_meters_columns(self, sid: str, data: Any) -> dict[str, Any]:
        self._fleet(sid)
        table = decode_meters(data)
        # Every reading's sources are among the columns: checked once for the batch.
        sources = (table.generation.keys(), table.bess.keys(), table.other.keys())
        book = functools.partial(self.ms.market.meter_each, sources=sources)
        results = await self._meter(sid, table.items(), book)
        return {"refused": _refused(results)}


def _bucket(sid: str) -> str:
    """The rate bucket of a fleet connection's own events (its members pay from theirs)."""
    return f"fleet:{sid}"


def _refused(results: Sequence[object]) -> list[dict[str, Any]]:
    return [
        {"index": i, "code": r.code, "message": r.message} for i, r in enumerate(results) if isinstance(r, MarketError)
    ]


def _not_member(pid: str) -> MarketError:
    return MarketError("unauthorized", f"{pid!r} is not a member of this fleet connection")
