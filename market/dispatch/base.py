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
from collections.abc import Awaitable, Callable, Coroutine
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

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as a task the server owns (cancelled and awaited at shutdown)."""

    async def persist(self) -> None:
        """Make the market's acknowledged actions durable (under `ack` durability)."""

    def meter_arrived(self, pid: str, slot: int) -> None: ...

    def participant_left(self, pid: str) -> None: ...

    def authenticated(self, sid: str, namespace: str) -> None:
        """The session `sid` logged in: its connection is no longer held to the login deadline."""


class Sessions:
    """Authenticated sessions of one namespace: one live session per participant id."""

    def __init__(self) -> None:
        self.pid_of: dict[str, str] = {}  # sid -> participant id
        self.sid_of: dict[str, str] = {}  # participant id -> sid
        self.role_of: dict[str, Role] = {}  # sid -> role

    def add(self, sid: str, pid: str, role: Role) -> str | None:
        """Register a session; returns the sid it replaces, if any."""
        old = self.sid_of.get(pid)
        self.pid_of[sid], self.sid_of[pid], self.role_of[sid] = pid, sid, role
        return old

    def remove(self, sid: str) -> str | None:
        pid = self.pid_of.pop(sid, None)
        self.role_of.pop(sid, None)
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
        try:
            return ok(**await fn(self, sid, data))
        except MarketError as err:
            return err.reply()
        except IllegalTransition as err:
            log.error("illegal transition: %s", err)
            return MarketError("unavailable", "the market cannot do that now").reply()
        except Exception:
            log.exception("handler %s failed", fn.__name__)
            return MarketError("unavailable", "internal error").reply()

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

    async def on_connect(self, sid: str, _environ: dict[str, Any], auth: Any = None) -> None:
        who = self.ms.registry.authenticate(auth)
        if who is None:
            log.warning("ns=%s refused: bad credentials", self.namespace)
            raise socketio.exceptions.ConnectionRefusedError("unauthorized: unknown id or wrong token")
        pid, role = who
        if role not in self.ROLES:
            raise socketio.exceptions.ConnectionRefusedError(f"unauthorized: role {role} may not use {self.namespace}")
        old = self.sessions.add(sid, pid, role)
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

    def _who(self, sid: str, *roles: Role) -> str:
        pid = self.sessions.pid_of.get(sid)
        if pid is None:
            raise MarketError("unauthorized", "no authenticated session")
        if roles and self.sessions.role_of[sid] not in roles:
            raise MarketError("forbidden", f"role {self.sessions.role_of[sid]} may not do this")
        if not self.ms.limiter.allow(pid):
            raise MarketError("rate_limited", "too many events: slow down")
        return pid
