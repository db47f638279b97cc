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

import contextlib
import logging
import re
import resource
import time
from collections import OrderedDict
from typing import Any

import socketio
from socketio import packet

from market.core.errors import MarketError
from market.dispatch.ratelimit import refill

log = logging.getLogger("microte.market")
RESERVED = frozenset({"connect", "disconnect", "connect_error"})
# A socket.io packet's header: type, attachments, namespace, ack id (the JSON follows).
_HEADER = re.compile(r"(?P<type>\d)(?:\d+-)?(?:(?P<nsp>/[^,\[{\"]*),)?(?P<id>\d{1,15})?")


# Bytes a connection may send before it has logged in: a login is ~100 bytes.
PENDING_RATE = 16_000.0  # per second
PENDING_BURST = 64_000.0


class ConnectionGuard:
    def __init__(
        self,
        *,
        auth_timeout: float = 5.0,
        max_pending: int = 512,
        max_per_address: int = 4096,
        inbound_rate: float = 1_000_000.0,
        inbound_burst: float = 2_000_000.0,
    ) -> None:
        self.auth_timeout = auth_timeout
        self.max_pending = max_pending
        self.max_per_address = max_per_address
        # Bytes per second (and burst) a logged-in connection may send, per participant it
        # speaks for (a /fleet login for 1,000 members gets 1,000 times as much): charged
        # before a packet is decoded, so a flood costs the server a length check, not a parse.
        self.inbound_rate = inbound_rate
        self.inbound_burst = inbound_burst
        self._budget: dict[str, list[float]] = {}  # eio sid -> [bytes left, last refill, rate, burst]
        self.over_budget = 0  # packets refused undecoded
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
        self._budget[eio_sid] = [PENDING_BURST, now, PENDING_RATE, PENDING_BURST]
        evict = []
        while len(self._pending) > self.max_pending:
            old, _ = self._pending.popitem(last=False)
            evict.append(old)
        self.closed_unauthenticated += len(evict)
        return True, evict

    def authenticated(self, eio_sid: str, members: int = 1) -> None:
        self._pending.pop(eio_sid, None)
        budget = self._budget.get(eio_sid)
        if budget is not None:
            rate, burst = self.inbound_rate * members, max(self.inbound_burst * members, budget[3])
            if rate > budget[2]:  # a connection's budget only grows (several namespaces)
                budget[0], budget[2], budget[3] = burst, rate, burst

    def charge(self, eio_sid: str, size: int, now: float) -> bool:
        """Take `size` bytes from the connection's budget; False (nothing taken) if it
        holds fewer."""
        budget = self._budget.get(eio_sid)
        if budget is None:
            return True  # not a connection this guard opened (closing): python-socketio decides
        left = refill(budget[0], budget[1], now, budget[2], budget[3])
        budget[1] = now
        if left < size:
            budget[0] = left
            self.over_budget += 1
            return False
        budget[0] = left - size
        return True

    def logged_in(self, eio_sid: str) -> bool:
        return eio_sid in self._budget and eio_sid not in self._pending

    def closed(self, eio_sid: str) -> None:
        self._pending.pop(eio_sid, None)
        self._budget.pop(eio_sid, None)
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
    guard: ConnectionGuard | None = None  # byte budgets, charged before decoding

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # engine.io starts a ping task per connection that sleeps `ping_interval` (25 s) and
        # holds the socket all that time, closed or not: a flood of short connections kept
        # ~20,000 of them alive and full collections grew to 0.7 s. `forget_pings` cancels
        # a connection's ping task when it closes.
        self._pings: dict[str, Any] = {}
        start = self.eio.start_background_task

        def start_background_task(target: Any, *a: Any, **kw: Any) -> Any:
            task = start(target, *a, **kw)
            if getattr(target, "__name__", "") == "_send_ping" and hasattr(target, "__self__"):
                sid = target.__self__.sid
                self._pings[sid] = task
                task.add_done_callback(lambda t: self._pings.pop(sid, None) if self._pings.get(sid) is t else None)
            return task

        self.eio.start_background_task = start_background_task

    def forget_pings(self, eio_sid: str) -> None:
        """The connection closed: its pending ping (if any) will never be sent."""
        task = self._pings.pop(eio_sid, None)
        if task is not None:
            task.cancel()

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        if self.text_only and (
            isinstance(data, bytes) or data[:1] in (str(packet.BINARY_EVENT), str(packet.BINARY_ACK))
        ):
            await self.eio.disconnect(eio_sid)  # binary attachments: refused, nothing buffered
            return
        if self.guard is not None and not self.guard.charge(eio_sid, len(data), time.monotonic()):
            await self._over_budget(eio_sid, data)
            return
        try:
            await super()._handle_eio_message(eio_sid, data)
        except ValueError as err:  # a malformed packet: the client's fault, not a traceback
            log.warning("malformed packet from a client: %s", str(err)[:80])
            await self.eio.disconnect(eio_sid)

    async def _over_budget(self, eio_sid: str, data: str | bytes) -> None:
        """Refuse a packet past the connection's byte budget, reading only its header: an
        event with an ack id hears `rate_limited`; a connection not logged in is closed."""
        assert self.guard is not None
        if not self.guard.logged_in(eio_sid):
            log.warning("closed a connection that sent more than %d bytes before logging in", int(PENDING_BURST))
            await self.eio.disconnect(eio_sid)
            return
        log.warning("refused packets past a connection's byte budget (%d bytes/s)", int(self.guard.inbound_rate))
        head = _HEADER.match(data if isinstance(data, str) else "")
        if head is None or head["type"] != str(packet.EVENT) or not head["id"]:
            return  # nothing to answer
        reply = MarketError("rate_limited", "this connection sent more bytes than its budget: slow down").reply()
        ack = self.packet_class(packet.ACK, namespace=head["nsp"] or "/", id=int(head["id"]), data=[reply])
        await self._send_packet(eio_sid, ack)

    def queued(self, eio_sid: str) -> int:
        sock = self.eio.sockets.get(eio_sid)
        return sock.queue.qsize() if sock is not None else 0

    async def drop_slow(self, eio_sid: str) -> None:
        """Close a client that does not read what it is sent, and free what waits for it
        (its private events stay in the outbox for `resume`)."""
        sock = self.eio.sockets.get(eio_sid)
        if sock is not None:
            while not sock.queue.empty():
                sock.queue.get_nowait()
                sock.queue.task_done()
        await self.close_now(eio_sid, abort=True)

    async def close_now(self, eio_sid: str, *, abort: bool) -> bool:
        """Close an engine.io connection without waiting for the client (False: it was not
        open). A websocket's TCP connection is aborted after its CLOSE packet: aiohttp would
        otherwise keep the connection, its buffers and tasks for up to 10 s waiting for the
        client's half of the close handshake, and a flood of clients that never read grew
        the heap until full collections stopped the loop for 0.8 s (hostile soak)."""
        sock = self.eio.sockets.pop(eio_sid, None)
        if sock is None:
            return False
        request = (self.environ.get(eio_sid) or {}).get("aiohttp.request")
        with contextlib.suppress(Exception):  # already closing: nothing more to free
            await sock.close(wait=False, abort=abort or not sock.upgraded)  # polling: nobody to tell
        if sock.upgraded and request is not None and request.transport is not None:
            request.transport.abort()
        return True

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
