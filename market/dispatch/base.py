"""The dispatch base every namespace adapter builds on: the `ServerPort` it is given (what a
namespace may use of the server, as a `typing.Protocol`), its authenticated `Sessions`, and
`Namespace`, which maps wire events to `on_<name>` handlers and turns a handler's result or
`MarketError` into a PROTOCOL.md reply.

The server imports the adapters; an adapter imports this module and its own core, never the
server (the layer rule in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, ClassVar, Protocol

import socketio

from market.core.engine import Market, MarketConfig
from market.core.errors import IllegalTransition, MarketError
from market.core.protocol import ok
from market.core.registry import Registry, Role
from market.core.sink import Sink
from market.core.timing import RealTimeClock, SimClock
from market.dispatch.ratelimit import RateLimiter

log = logging.getLogger("microte.market")


class ServerPort(Protocol):
    """What a namespace adapter may use of the market server."""

    config: MarketConfig
    market: Market
    registry: Registry
    sink: Sink
    clock: SimClock | RealTimeClock
    sio: socketio.AsyncServer
    limiter: RateLimiter

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coro` as a task the server owns (cancelled and awaited at shutdown); the task,
        for a caller that may cancel it sooner."""

    async def persist(self) -> None:
        """Make the market's acknowledged actions durable (under `ack` durability)."""

    def meter_arrived(self, pid: str, slot: int) -> None: ...

    def participant_left(self, pid: str) -> None: ...

    def replied(self, seconds: float, reply: dict[str, Any]) -> None:
        """An event was answered after `seconds` (acknowledgement latency, refusals by code)."""

    def authenticated(self, sid: str, namespace: str, members: int = 1) -> None:
        """The session `sid` logged in (for `members` participants): its connection is no
        longer held to the login deadline, and its byte budget is a participant's."""


class Sessions:
    """Authenticated sessions of one namespace: one live session per participant id."""

    def __init__(self) -> None:
        self.pid_of: dict[str, str] = {}  # sid -> participant id
        self.sid_of: dict[str, str] = {}  # participant id -> sid
        self.role_of: dict[str, Role] = {}  # sid -> role (the first of its roles the namespace admits)
        self.roles_of: dict[str, frozenset[Role]] = {}  # sid -> every role it holds that the namespace admits

    def add(self, sid: str, pid: str, role: Role, roles: frozenset[Role] | None = None) -> str | None:
        """Register a session (`roles`: all its admitted roles, default just `role`);
        returns the sid it replaces, if any."""
        old = self.sid_of.get(pid)
        self.pid_of[sid], self.sid_of[pid], self.role_of[sid] = pid, sid, role
        self.roles_of[sid] = roles or frozenset({role})
        return old

    def remove(self, sid: str) -> str | None:
        pid = self.pid_of.pop(sid, None)
        self.role_of.pop(sid, None)
        self.roles_of.pop(sid, None)
        if pid is not None and self.sid_of.get(pid) == sid:
            del self.sid_of[pid]
        return pid

    def online(self) -> list[str]:
        return sorted(self.sid_of)


Handler = Callable[[str, Any], Awaitable[dict[str, Any]]]


def replying(fn: Callable[..., Awaitable[dict[str, Any]]]) -> Handler:
    """Turn a handler's result or MarketError into a PROTOCOL.md reply; never let an
    unexpected error escape into the socket layer."""

    async def handler(self: Namespace, sid: str, data: Any = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            reply = ok(**await fn(self, sid, data))
        except MarketError as err:
            reply = err.reply()
        except IllegalTransition as err:
            log.error("illegal transition: %s", err)
            reply = MarketError("unavailable", "the market cannot do that now").reply()
        except Exception:
            log.exception("handler %s failed", fn.__name__)
            reply = MarketError("unavailable", "internal error").reply()
        self.ms.replied(time.perf_counter() - t0, reply)
        return reply

    handler.__name__ = fn.__name__
    return handler  # type: ignore[return-value]


class Namespace(socketio.AsyncNamespace):  # type: ignore[misc]
    # Wire event -> handler suffix (`on_<suffix>`), for names such as "asset.upsert";
    # None: the event name is the suffix. Anything else is answered `invalid`, never silence.
    EVENTS: ClassVar[dict[str, str] | None] = None
    NAME: ClassVar[str]  # the namespace, e.g. "/market"
    ROLES: ClassVar[frozenset[Role]]  # the registry roles that may connect to it
    _serial: asyncio.Lock | None = None  # set: the namespace handles one event at a time

    async def trigger_event(self, event: str, *args: Any) -> Any:
        if event in ("connect", "disconnect"):
            return await super().trigger_event(event, *args)
        suffix = event if self.EVENTS is None else self.EVENTS.get(event)
        if suffix is None or suffix in ("connect", "disconnect") or not hasattr(self, f"on_{suffix}"):
            return MarketError("invalid", f"unknown event {event!r}").reply()
        if self._serial is None:
            return await super().trigger_event(suffix, *args)
        async with self._serial:
            return await super().trigger_event(suffix, *args)

    def __init__(self, server: ServerPort) -> None:
        super().__init__(self.NAME)
        self.ms = server
        self.sessions = Sessions()

    async def start(self) -> None:
        """Called once the ledger is open, before the server accepts connections: resume
        from the ledger, start periodic tasks (through `ServerPort.spawn`)."""

    def participant_left(self, pid: str) -> None:
        """A participant's last session of this namespace closed."""

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        logins = self.ms.limiter.logins
        keys = login_keys(environ, [auth.get("id") if isinstance(auth, dict) else None])
        refuse_throttled(logins.wait(keys), self.namespace)
        who = self.ms.registry.authenticate(auth)
        if who is None:
            logins.failed(keys)
            log.warning("ns=%s refused: bad credentials", self.namespace)
            raise socketio.exceptions.ConnectionRefusedError("unauthorized: unknown id or wrong token")
        pid, role = who
        logins.succeeded(f"id:{pid}")
        # An id with several roles is admitted by any of them; its events check them all.
        admitted = [r for r in self.ms.registry.roles(pid) if r in self.ROLES]
        if not admitted:
            held = ", ".join(self.ms.registry.roles(pid)) or role
            raise socketio.exceptions.ConnectionRefusedError(f"unauthorized: role {held} may not use {self.namespace}")
        pid = self.session_id(pid)
        old = self.sessions.add(sid, pid, admitted[0], frozenset(admitted))
        self.ms.authenticated(sid, self.namespace)
        if old is not None:
            # One live session per id: the newest login wins, the old one is closed.
            self.sessions.pid_of.pop(old, None)
            await self.ms.sio.disconnect(old, namespace=self.namespace)
        log.info("ns=%s connect participant=%s role=%s", self.namespace, pid, role)

    async def on_disconnect(self, sid: str, *_reason: Any) -> None:
        pid = self.sessions.remove(sid)
        if pid is not None:
            log.info("ns=%s disconnect participant=%s", self.namespace, pid)
            self.participant_left(pid)

    def session_id(self, pid: str) -> str:
        """The name this namespace knows a logged-in registry id by (the auction's may be a pseudonym)."""
        return pid

    def _who(self, sid: str, *roles: Role, cost: int = 1) -> str:
        """The session's participant, if its role may act and its bucket can pay `cost`
        tokens (1 per event; a batch pays 1 per item)."""
        pid = self.sessions.pid_of.get(sid)
        if pid is None:
            raise MarketError("unauthorized", "no authenticated session")
        held = self.sessions.roles_of.get(sid) or frozenset({self.sessions.role_of[sid]})
        if roles and held.isdisjoint(roles):
            raise MarketError("forbidden", f"role {' + '.join(sorted(held))} may not do this")
        if cost == 1:
            if not self.ms.limiter.allow(pid):
                raise MarketError("rate_limited", "too many events: slow down")
        else:
            self._charge({pid: cost})
        return pid

    def _charge(self, costs: Mapping[str, int]) -> None:
        """Take each participant's cost from its bucket, all or nothing; `rate_limited` (and
        nothing taken) if one cannot pay."""
        limiter = self.ms.limiter
        if limiter.allow_all(costs):
            return
        what = ", ".join(f"{p} {c}" for p, c in sorted(costs.items())[:5])
        raise MarketError(
            "rate_limited",
            f"too many events: a batch costs one token per item ({what}{', ...' if len(costs) > 5 else ''});"
            f" burst {int(limiter.burst)}, refill {limiter.rate:g} per second: slow down or split the batch",
        )


def login_keys(environ: dict[str, Any], ids: list[Any]) -> list[str]:
    """The keys a login is throttled by: the peer address and each participant id it names
    (an id longer than any registered one is not tracked: it cannot be right)."""
    keys = [address_key(peer_address(environ))]
    keys += [f"id:{i}" for i in ids if isinstance(i, str) and 0 < len(i) <= 64]
    return keys


def address_key(address: str) -> str:
    """The login throttle's key of a peer address."""
    return f"addr:{address}"


def peer_address(environ: dict[str, Any]) -> str:
    """The peer address (engine.io's aiohttp driver leaves REMOTE_ADDR at 127.0.0.1)."""
    request = environ.get("aiohttp.request")
    remote = getattr(request, "remote", None)
    return str(remote or environ.get("REMOTE_ADDR") or "?")


def backing_off(wait: float) -> str:
    """The refusal of a login while its address or id backs off for `wait` seconds."""
    return f"unauthorized: too many failed logins from this address or for this id; retry in {math.ceil(wait)} s"


def refuse_throttled(wait: float, namespace: str) -> None:
    """Refuse a login while its address or id backs off from failed logins (even one with
    the right token: otherwise a guess would still be checked)."""
    if wait > 0:
        log.warning("ns=%s refused: login backing off after failed logins", namespace)
        raise socketio.exceptions.ConnectionRefusedError(backing_off(wait))
