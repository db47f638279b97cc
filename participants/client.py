"""The socket shell around a `Prosumer`: connects to `/market`, answers `start_round` with
its orders and meter reading, feeds `settled` and `delivery` back into the prosumer.

`combined=True` speaks microte's extension (docs/protocol.md, *One event per round*): it
logs in with `auth.combined`, sends each round's orders and reading as one `round.submit`
and gets its fills and deliveries in one `round.result` per round. `round_start=True` (with
`combined`) also logs in with `auth.round_start`: in sim mode those come with the next
round's start, as one `round.start`."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import socketio
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from market.core import wire
from participants.prosumer import Prosumer, Stats

log = logging.getLogger(__name__)
_NO_REPLY: dict[str, Any] = {"ok": False, "error": {"code": "unavailable", "message": "no reply"}}


class ParticipantClient:
    def __init__(
        self,
        prosumer: Prosumer,
        *,
        namespace: str = "/market",
        timeout: float = 30.0,
        transports: Sequence[str] = ("websocket",),
        reconnection: bool = True,
        serializer: str = "json",
        combined: bool = False,
        round_start: bool = False,
    ) -> None:
        if round_start and not combined:
            raise ValueError("round_start needs combined")
        self.prosumer = prosumer
        self.combined = combined  # `round.submit` and `round.result` instead of the v1 events
        self.round_start = round_start  # sim: `round.result` and `start_round` as one `round.start`
        self.namespace = namespace
        self.timeout = timeout
        self.transports = list(transports)
        self.replies: deque[tuple[str, Any]] = deque(maxlen=256)  # (event, reply), newest last
        self.refusal: str | None = None  # the server's refusal of the last connect, if any
        self.transport_error: str | None = None  # why the last connect attempt found no server
        self._waiting: set[asyncio.Future[Any]] = set()
        self._closing = False
        self.last_seq = 0  # every private event (`settled`, `delivery`) up to this one was handled
        self._ahead: set[int] = set()  # handled events past a gap
        self._resuming: set[asyncio.Task[None]] = set()
        self.sio = socketio.AsyncClient(reconnection=reconnection, serializer=wire.serializer(serializer))
        for event, handler in (
            ("start_round", self._on_start_round),
            ("settled", self._on_settled),
            ("delivery", self._on_delivery),
            ("round.result", self._on_round_result),
            ("round.start", self._on_round_start),
            ("connect_error", self._on_connect_error),
            ("connect", self._on_connect),
        ):
            self.sio.on(event, handler, namespace=namespace)

    @property
    def stats(self) -> Stats:
        return self.prosumer.stats

    @property
    def connected(self) -> bool:
        return bool(self.sio.connected)

    async def connect(
        self,
        url: str,
        id: str | None = None,
        token: str = "",
        namespaces: Sequence[str] | None = None,
        *,
        wait_timeout: float = 10.0,
        connect_retry: float = 0.0,
    ) -> None:
        """Connect with `auth={"id", "token"}`; a refusal raises `socketio.exceptions.
        ConnectionError` whose message includes the server's reason (e.g. `unauthorized`).

        A transport failure (nothing listening yet, connection reset, a handshake that got
        no answer) is retried with jittered backoff for up to `connect_retry` seconds (0:
        one attempt). A refusal by the server (a connect error carrying the server's
        message: bad credentials, a login backing off, a role that may not use the
        namespace) is final at once: retrying cannot change the answer."""
        self._closing = False
        self.refusal = None
        self.transport_error = None
        auth: dict[str, Any] = {"id": id or self.prosumer.spec.id, "token": token}
        if self.combined:
            auth["combined"] = True
        if self.round_start:
            auth["round_start"] = True
        retrying = AsyncRetrying(
            wait=wait_random_exponential(multiplier=0.1, max=2.0),
            stop=stop_after_delay(connect_retry),
            retry=retry_if_exception(lambda e: isinstance(e, socketio.exceptions.ConnectionError) and not self.refusal),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self.sio.connect(
                        url,
                        auth=auth,
                        namespaces=list(namespaces or [self.namespace]),
                        transports=self.transports,
                        wait_timeout=wait_timeout,
                    )
        except socketio.exceptions.ConnectionError as exc:
            if self.refusal:
                raise socketio.exceptions.ConnectionError(f"{exc}: {self.refusal}") from exc
            raise

    async def disconnect(self) -> None:
        """Disconnect and release handlers still waiting for replies."""
        self._closing = True
        for fut in list(self._waiting):
            if not fut.done():
                fut.set_result(_NO_REPLY)
        await self.sio.disconnect()

    async def wait(self) -> None:
        await self.sio.wait()

    # -- handlers ------------------------------------------------------------------------

    async def _on_connect(self) -> None:
        # After a reconnect, ask for the private events missed while away. The call waits
        # for a reply, so it runs as a task: this handler runs inside the socket's reader.
        if self.last_seq:
            task = asyncio.ensure_future(self._resume())
            self._resuming.add(task)
            task.add_done_callback(self._resuming.discard)

    async def _resume(self) -> None:
        more = True
        while more:  # the server pages its reply (`more`: ask again after what arrived)
            since = self.last_seq
            reply = await self._reply(await self._emit("resume", {"since": since}))
            if not (isinstance(reply, dict) and reply.get("ok")):
                log.warning("%s: resume failed: %s", self.prosumer.spec.id, reply)
                self.stats.errors += 1
                return
            for item in reply.get("events", []):
                handler = {"settled": self._on_settled, "delivery": self._on_delivery}.get(item.get("event"))
                if handler is not None:
                    await handler(item.get("data"))
            more = bool(reply.get("more")) and self.last_seq > since

    async def _on_connect_error(self, data: Any = None) -> None:
        # The server refuses with a message object (a socket.io CONNECT_ERROR packet, or the
        # JSON body of a refused engine.io handshake, PROTOCOL.md *Connection*). A failure
        # to reach it comes from the client's own transport as a bare string ("Connection
        # error", "Connection refused by the server") or None.
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            self.refusal = data["message"]
        else:
            self.transport_error = str(data)

    async def _on_start_round(self, payload: Any) -> None:
        if self._closing:
            return
        try:
            meter, orders = self.prosumer.on_round(payload)
        except Exception:
            log.exception("%s: start_round failed", self.prosumer.spec.id)
            self.stats.errors += 1
            return
        if self.combined:
            await self._submit(meter, orders)
            return
        # Orders go out first: once the last meter of the round arrives the controller may
        # step on and close `next_settle`, and one socket delivers packets in order.
        sends: list[tuple[str, asyncio.Future[Any]]] = []
        if orders:
            sends.append(("orders", await self._emit("orders", {"orders": orders})))
        if meter is not None:
            sends.append(("meter", await self._emit("meter", meter)))
        replies = await self._replies([fut for _, fut in sends])
        for (event, _), reply in zip(sends, replies, strict=True):
            self._record(event, reply, len(orders))

    async def _submit(self, meter: dict[str, Any] | None, orders: list[Any]) -> None:
        """The round's orders and reading as one `round.submit`; its reply is recorded as the
        `orders` and `meter` replies would be. A reading refused as a whole (say `closed`:
        it came too late) refuses the orders with it: they are sent again as `orders`."""
        payload: dict[str, Any] = {}
        if orders:
            payload["orders"] = orders
        if meter is not None:
            payload["meter"] = meter
        if not payload:
            return
        reply = await self._reply(await self._emit("round.submit", payload))
        if isinstance(reply, dict) and reply.get("ok") is True:
            if orders:
                self._record("orders", {"ok": True, "results": reply.get("results", [])}, len(orders))
            if meter is not None:
                self._record("meter", reply.get("meter"), 0)
            return
        error = reply.get("error") if isinstance(reply, dict) else None
        if meter is not None and isinstance(error, dict) and error.get("part") == "meter":
            self._record("meter", reply, 0)
            if orders:
                self._record("orders", await self._reply(await self._emit("orders", {"orders": orders})), len(orders))
            return
        self._record("orders" if orders else "meter", reply, len(orders))

    async def _on_round_result(self, payload: Any) -> None:
        """One `round.result`: each `settled` and `delivery` payload it carries, as if it had
        come on its own (numbered, so a replay overlapping it is skipped)."""
        if not isinstance(payload, dict):
            self.stats.errors += 1
            return
        for event, handler in (("settled", self._on_settled), ("delivery", self._on_delivery)):
            items = payload.get(event, [])
            for item in items if isinstance(items, list) else []:
                await handler(item)

    async def _on_round_start(self, payload: Any) -> None:
        """One `round.start`: the fills and deliveries it carries first (as a `round.result`),
        then the round it starts (its other fields are `start_round`'s)."""
        await self._on_round_result(payload)
        await self._on_start_round(payload)

    async def _on_settled(self, payload: Any) -> None:
        if self._fresh(payload):
            self._guard(self.prosumer.on_settled, payload)

    async def _on_delivery(self, payload: Any) -> None:
        if self._fresh(payload):
            self._guard(self.prosumer.on_delivery, payload)

    def _fresh(self, payload: Any) -> bool:
        """False for an event already handled (a replay overlapping live events)."""
        seq = payload.get("seq") if isinstance(payload, dict) else None
        if not isinstance(seq, int):
            return True  # a server without numbering: nothing to deduplicate
        if seq <= self.last_seq or seq in self._ahead:
            return False
        # Live events can overtake a replay after a reconnect: remember those past a gap,
        # and move `last_seq` (what `resume` asks after) only over contiguous numbers.
        self._ahead.add(seq)
        while self.last_seq + 1 in self._ahead:
            self.last_seq += 1
            self._ahead.remove(self.last_seq)
        return True

    # -- plumbing ------------------------------------------------------------------------

    def _guard(self, fn: Any, payload: Any) -> None:
        try:
            fn(payload)
        except ValueError:
            log.exception("%s: bad payload", self.prosumer.spec.id)
            self.stats.errors += 1

    async def _emit(self, event: str, data: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def ack(*args: Any) -> None:
            if not fut.done():
                fut.set_result(args[0] if args else None)

        self._waiting.add(fut)
        try:
            await self.sio.emit(event, data, namespace=self.namespace, callback=ack)
        except Exception as exc:  # not connected: counted as an error, never raised
            fut.set_result({"ok": False, "error": {"code": "unavailable", "message": str(exc)}})
        return fut

    async def _reply(self, fut: asyncio.Future[Any]) -> Any:
        return (await self._replies([fut]))[0]

    async def _replies(self, futs: list[asyncio.Future[Any]]) -> list[Any]:
        """The replies to `futs`, in order: one deadline (`timeout`) for all of them, and a
        reply still missing then is `_NO_REPLY`. The futures are never cancelled.

        Like `asyncio.wait(futs, timeout=...)` with less bookkeeping (one waiter, one timer
        and a counter): every client waits for its acknowledgements every round."""
        try:
            pending = [f for f in futs if not f.done()]
            if pending:
                await self._all_done(pending)
            return [f.result() if f.done() and not f.cancelled() else _NO_REPLY for f in futs]
        finally:
            self._waiting.difference_update(futs)

    async def _all_done(self, futs: list[asyncio.Future[Any]]) -> None:
        """Return when every future of `futs` is done or `timeout` has passed."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        left = len(futs)

        def one_done(_: asyncio.Future[Any]) -> None:
            nonlocal left
            left -= 1
            if not left and not waiter.done():
                waiter.set_result(None)

        def expire() -> None:
            if not waiter.done():
                waiter.set_result(None)

        for f in futs:
            f.add_done_callback(one_done)
        timer = loop.call_later(self.timeout, expire)
        try:
            await waiter
        finally:
            timer.cancel()
            for f in futs:
                f.remove_done_callback(one_done)

    def _record(self, event: str, reply: Any, n_orders: int) -> None:
        self.replies.append((event, reply))
        if not (isinstance(reply, dict) and reply.get("ok") is True):
            self.stats.errors += 1
            if event == "orders":
                self.stats.rejected += n_orders  # a refused batch changes no state
            return
        if event == "orders":
            for result in reply.get("results", []):
                if isinstance(result, dict) and result.get("ok") is True:
                    self.stats.accepted += 1
                else:
                    self.stats.rejected += 1
