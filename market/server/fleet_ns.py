"""Namespace `/fleet`: one connection speaks for many prosumers, each still authenticated.

A fleet connects with `auth = {"fleet": [{"id", "token"}, ...]}`; every member must be a
registered prosumer with its own token, or the whole connection is refused. The
connection receives `start_round` once, and `settled` / `delivery` as one batch per round
(`{"events": [{"participant", ...payload}]}`); it sends `orders` and `meters` batches whose
items name their participant, which must be one of its members (docs/protocol.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import socketio

from market.core.errors import MarketError
from market.core.protocol import FleetMetersMsg, FleetOrdersMsg, decode
from market.core.registry import Role
from market.dispatch.base import Namespace, login_keys, refuse_throttled, replying
from market.server.port import MarketPort

log = logging.getLogger("microte.market")
MAX_MEMBERS = 20000


class FleetNamespace(Namespace):
    ms: MarketPort

    NAME = "/fleet"
    ROLES = frozenset[Role]({"prosumer"})

    def __init__(self, server: MarketPort) -> None:
        super().__init__(server)
        self.members: dict[str, frozenset[str]] = {}  # fleet sid -> its participants
        self.sid_of: dict[str, str] = {}  # participant -> fleet sid

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
        ids = [cred.get("id") if isinstance(cred, dict) else None for cred in creds]
        refuse_throttled(logins.wait(login_keys(environ, ids)), self.namespace)
        pids = []
        for cred, name in zip(creds, ids, strict=True):
            who = self.ms.registry.authenticate(cred)
            if who is None or not self.ms.registry.has_role(who[0], "prosumer"):
                if who is None:  # a wrong token (a prosumer-only namespace is no guess)
                    logins.failed(login_keys(environ, [name]))
                log.warning("ns=/fleet refused: bad credentials for %r", name)
                raise socketio.exceptions.ConnectionRefusedError(f"unauthorized: member {name!r}")
            pids.append(who[0])
        for pid in pids:
            logins.succeeded(f"id:{pid}")
        members = frozenset(pids)
        market_sessions = self.ms.sessions["/market"]
        for pid in members:
            old = market_sessions.sid_of.get(pid)
            if old is not None:  # one live session per id: the fleet login replaces it
                market_sessions.pid_of.pop(old, None)
                await self.ms.sio.disconnect(old, namespace="/market")
            self.sid_of[pid] = sid
        self.members[sid] = members
        self.ms.authenticated(sid, self.namespace, len(members))
        log.info("ns=/fleet connect members=%d", len(members))

    async def on_disconnect(self, sid: str, *_reason: Any) -> None:
        members = self.members.pop(sid, frozenset())
        for pid in members:
            if self.sid_of.get(pid) == sid:
                del self.sid_of[pid]
                self.ms.participant_left(pid)
        log.info("ns=/fleet disconnect members=%d", len(members))

    def _fleet(self, sid: str) -> frozenset[str]:
        members = self.members.get(sid)
        if members is None:
            raise MarketError("unauthorized", "no authenticated fleet session")
        if not self.ms.limiter.allow(f"fleet:{sid}"):
            raise MarketError("rate_limited", "too many events: slow down")
        return members

    def _charge_members(self, sid: str, members: frozenset[str], participants: Iterable[str]) -> None:
        """One rate token per item from each member's own bucket (the one its `/market`
        events use), all or nothing: `rate_limited` before any change if one cannot pay.
        Items of non-members are refused one by one and charge nobody."""
        costs = Counter(p for p in participants if p in members and self.sid_of.get(p) == sid)
        if costs:
            self._charge(costs)

    def _member(self, members: frozenset[str], sid: str, pid: str) -> None:
        if pid not in members or self.sid_of.get(pid) != sid:
            raise MarketError("unauthorized", f"{pid!r} is not a member of this fleet connection")

    @replying
    async def on_orders(self, sid: str, data: Any) -> dict[str, Any]:
        members = self._fleet(sid)
        orders = decode(data, FleetOrdersMsg).orders
        self._charge_members(sid, members, (o.participant for o in orders))
        results = []
        await self.ms.admit()
        for order in orders:
            try:
                self._member(members, sid, order.participant)
                results.append({"ok": True, **self.ms.market.submit(order.participant, order.side, order.entry())})
            except MarketError as err:
                results.append(err.reply())
        await self.ms.persist()
        return {"results": results}

    @replying
    async def on_meters(self, sid: str, data: Any) -> dict[str, Any]:
        members = self._fleet(sid)
        readings = decode(data, FleetMetersMsg).readings
        self._charge_members(sid, members, (r.participant for r in readings))
        results: list[dict[str, Any]] = []
        arrived = []
        await self.ms.admit()
        for reading in readings:
            try:
                self._member(members, sid, reading.participant)
                results.append({"ok": True, **self.ms.market.meter(reading.participant, reading.meter())})
                arrived.append((reading.participant, reading.time_interval[0]))
            except MarketError as err:
                results.append(err.reply())
        await self.ms.persist()
        for pid, slot in arrived:
            self.ms.meter_arrived(pid, slot)
        return {"results": results}
