"""Connection hygiene (docs/reliability.md, *Bounds*): what an unauthenticated or hostile
client can hold is bounded, and the log says so once per interval, not once per event.

- `ConnectionGuard`: engine.io connections by address; a connection that has not
  authenticated to any namespace within `auth_timeout` is closed, at most `max_pending`
  are kept (a new one evicts the oldest, so a flood cannot lock real participants out:
  they authenticate within milliseconds), and one address holds at most
  `max_per_address` connections. Pure bookkeeping: the server closes what it returns.
- `GuardedServer`: python-socketio's server that refuses what the protocol does not
  define (binary attachments, events named like the reserved `connect`/`disconnect`) with
  an `invalid` reply or a disconnect, never a traceback.
- `raise_fd_limit`, `RepeatFilter`.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import OrderedDict
from typing import Any

import socketio
from socketio import packet

from market.core.errors import MarketError

log = logging.getLogger("microte.market")
RESERVED = frozenset({"connect", "disconnect", "connect_error"})


class ConnectionGuard:
    def __init__(self, *, auth_timeout: float = 5.0, max_pending: int = 512, max_per_address: int = 4096) -> None:
        self.auth_timeout = auth_timeout
        self.max_pending = max_pending
        self.max_per_address = max_per_address
        self._pending: OrderedDict[str, tuple[str, float]] = OrderedDict()  # eio sid -> (address, opened)
        self._address: dict[str, str] = {}  # eio sid -> address (every connection)
        self._per_address: dict[str, int] = {}
        self.refused = 0  # connections refused: address over its cap
        self.closed_unauthenticated = 0  # connections closed: no login in time, or evicted

    def opened(self, eio_sid: str, address: str, now: float) -> tuple[bool, list[str]]:
        """A new connection: (accepted?, connections to close to make room for it)."""
        if self._per_address.get(address, 0) >= self.max_per_address:
            self.refused += 1
            return False, []
        self._address[eio_sid] = address
        self._per_address[address] = self._per_address.get(address, 0) + 1
        self._pending[eio_sid] = (address, now)
        evict = []
        while len(self._pending) > self.max_pending:
            old, _ = self._pending.popitem(last=False)
            evict.append(old)
        self.closed_unauthenticated += len(evict)
        return True, evict

    def authenticated(self, eio_sid: str) -> None:
        self._pending.pop(eio_sid, None)

    def closed(self, eio_sid: str) -> None:
        self._pending.pop(eio_sid, None)
        address = self._address.pop(eio_sid, None)
        if address is not None:
            n = self._per_address[address] - 1
            if n:
                self._per_address[address] = n
            else:
                del self._per_address[address]

    def expired(self, now: float) -> list[str]:
        """Connections that did not authenticate in time (oldest first)."""
        out = []
        for sid, (_, t) in self._pending.items():
            if now - t < self.auth_timeout:
                break  # ordered by arrival
            out.append(sid)
        for sid in out:
            del self._pending[sid]
        self.closed_unauthenticated += len(out)
        return out

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def connections(self) -> int:
        return len(self._address)


class GuardedServer(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server, refusing what PROTOCOL.md does not define. Overrides two
    private dispatch methods of python-socketio 5 (checked by tests/e2e/test_hostile.py)."""

    text_only = True  # json serializer: binary frames are never part of the protocol
    max_queued = 256  # packets waiting to be sent to one client; past it the client is a slow reader

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        if self.text_only and (
            isinstance(data, bytes) or data[:1] in (str(packet.BINARY_EVENT), str(packet.BINARY_ACK))
        ):
            await self.eio.disconnect(eio_sid)  # binary attachments: refused, nothing buffered
            return
        try:
            await super()._handle_eio_message(eio_sid, data)
        except ValueError as err:  # a malformed packet: the client's fault, not a traceback
            log.warning("malformed packet from a client: %s", str(err)[:80])
            await self.eio.disconnect(eio_sid)

    def queued(self, eio_sid: str) -> int:
        sock = self.eio.sockets.get(eio_sid)
        return sock.queue.qsize() if sock is not None else 0

    async def drop_slow(self, eio_sid: str) -> None:
        """Close a client that does not read what it is sent, and free what waits for it
        (its private events stay in the outbox for `resume`)."""
        sock = self.eio.sockets.pop(eio_sid, None)
        if sock is None:
            return
        while not sock.queue.empty():
            sock.queue.get_nowait()
            sock.queue.task_done()
        try:
            await sock.close(wait=False, abort=True)
        except Exception:  # already closing: nothing more to free
            return

    async def _handle_event(self, eio_sid: str, namespace: str | None, id: int | None, data: Any) -> None:
        if self.queued(eio_sid) > self.max_queued:
            log.warning("slow reader: closed a connection with more than %d packets unsent", self.max_queued)
            await self.drop_slow(eio_sid)
            return
        if isinstance(data, list) and data and data[0] in RESERVED:
            if id is not None:
                reply = MarketError("invalid", f"unknown event {data[0]!r}").reply()
                ack = self.packet_class(packet.ACK, namespace=namespace or "/", id=id, data=[reply])
                await self._send_packet(eio_sid, ack)
            return
        await super()._handle_event(eio_sid, namespace, id, data)


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class RepeatFilter(logging.Filter):
    """At most `burst` records of one message template per `interval` seconds; the next
    one that passes says how many were suppressed."""

    def __init__(self, interval: float = 10.0, burst: int = 5) -> None:
        super().__init__()
        self.interval, self.burst = interval, burst
        self._seen: dict[tuple[str, str], list[float]] = {}  # (logger, template) -> [window start, count, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        w = self._seen.get(key)
        if w is None or now - w[0] >= self.interval:
            dropped = int(w[2]) if w else 0
            self._seen[key] = [now, 1, 0]
            if len(self._seen) > 4096:  # bounded: forget the oldest templates
                for k in list(self._seen)[:1024]:
                    del self._seen[k]
            if dropped:
                record.msg = f"{record.msg} [{dropped} similar suppressed]"
            return True
        w[1] += 1
        if w[1] <= self.burst:
            return True
        w[2] += 1
        return False


def install_repeat_filter() -> None:
    """Rate-limit repetitive log lines on the root logger's handlers (every logger's records
    pass there): a flood of bad clients must not fill the disk with log."""
    f = RepeatFilter()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(x, RepeatFilter) for x in handler.filters):
            handler.addFilter(f)
