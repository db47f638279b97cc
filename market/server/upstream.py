"""A community's own session in the market above it, in real time (`microte market
--upstream URL --upstream-id ID --upstream-token TOKEN`; docs/hierarchy.md).

The community server is a participant of the district: after each boundary's clearing it
places the residuals of the slots whose gate just closed (one order each, client id
`{slot}-{n}`, as `upstream.residuals` names them); each `settled` the district sends it is
settled in the community at once (`upstream.fills`: stored, then announced to the member);
after the community processes a slot it meters, in the district, what its upstream account
passed on in it. A lost connection is retried; on every (re)connection the district's
`resume` returns the fills sent meanwhile (settling one twice changes nothing: by its ref).

Timing in rt: the district must close a slot's gate after the communities (one round later:
its `close_steps` one less than theirs) and accept its readings after theirs are processed
(its `meter_grace` above theirs plus the time to process a slot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

import socketio

from market.core import wire
from market.core.hierarchy import fill_of, upstream_orders
from market.core.protocol import UpstreamFillMsg, UpstreamFillsMsg, decode

log = logging.getLogger("microte.upstream")
CALL_TIMEOUT = 30.0


class Community(Protocol):
    """What the link asks of its community's server (market/server/app.py)."""

    def upstream_residuals(self, start: int) -> list[dict[str, Any]]: ...

    async def upstream_fills(self, msg: UpstreamFillsMsg) -> dict[str, Any]: ...

    async def upstream_flows(self, start: int) -> dict[str, Any]: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...


class UpstreamLink:
    def __init__(self, community: Community, url: str, pid: str, token: str, serializer: str = "json") -> None:
        self.community, self.url, self.pid, self.token = community, url, pid, token
        self.sio = socketio.AsyncClient(reconnection=True, serializer=wire.serializer(serializer))
        self.sio.on("connect", self._on_connect, namespace="/market")
        self.sio.on("settled", self._on_settled, namespace="/market")
        self.sio.on("delivery", self._seen, namespace="/market")
        self.last_seq = 0  # the highest private event number seen (what `resume` asks after)
        self.placed = 0  # residual orders accepted above
        self.settled = 0  # fills settled here
        self.metered = 0  # readings accepted above
        self.errors: list[Any] = []  # refusals from above, newest last (bounded)
        self._lock = asyncio.Lock()  # one fill at a time, in the order they came

    async def run(self) -> None:
        """Connect (retrying while the district is away) and stay connected; owned by the server."""
        while True:
            try:
                auth = {"id": self.pid, "token": self.token}
                await self.sio.connect(self.url, namespaces=["/market"], transports=["websocket"], auth=auth)
                await self.sio.wait()
                return
            except socketio.exceptions.ConnectionError as err:
                log.warning("upstream %s: %s; retrying", self.url, err)
                await asyncio.sleep(2.0)

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()

    def _error(self, what: Any) -> None:
        self.errors = [*self.errors[-99:], what]
        log.warning("upstream %s: %s", self.url, what)

    # -- what the community does ----------------------------------------------------------

    async def pass_up(self, start: int, duration: int) -> None:
        """Place the residuals of a slot whose gate closed here (once; a resend is a duplicate above)."""
        orders = upstream_orders(self.pid, self.community.upstream_residuals(start), [start, start + duration])
        for i in range(0, len(orders), 1000):
            reply = await self._call("orders", {"orders": orders[i : i + 1000]})
            if reply is None:
                return
            for x in reply.get("results", []):
                if x.get("ok"):
                    self.placed += 1
                else:
                    self._error(x)

    async def processed(self, start: int, duration: int) -> None:
        """Meter above what the upstream account passed on in a slot processed here."""
        flows = await self.community.upstream_flows(start)
        reading = {
            "time_interval": [start, start + duration],
            "generation": flows["generation"],
            "consumption": {"other": {"external": flows["external"]}},
        }
        if await self._call("meter", reading) is not None:
            self.metered += 1

    async def _call(self, event: str, data: dict[str, Any]) -> dict[str, Any] | None:
        if "/market" not in self.sio.namespaces:  # (connected: the namespace is in, even in its connect handler)
            self._error(f"{event}: not connected")
            return None
        try:
            reply = await self.sio.call(event, data, namespace="/market", timeout=CALL_TIMEOUT)
        except Exception as err:  # a timeout or a lost connection: reported, never raised
            self._error(f"{event}: {err!r}")
            return None
        if not isinstance(reply, dict) or not reply.get("ok"):
            self._error(reply)
            return None
        return reply

    # -- what comes from above ------------------------------------------------------------

    async def _on_connect(self) -> None:
        self.community.spawn(self._resume(self.last_seq))  # from what was seen before this connection

    async def _resume(self, since: int) -> None:
        """The private events sent while away (numbered after `since`), page by page."""
        while True:
            reply = await self._call("resume", {"since": since})
            if reply is None:
                return
            events = reply.get("events", [])
            for e in events:
                if e.get("event") == "settled":
                    await self._on_settled(e.get("data"))
                since = max(since, int(e.get("data", {}).get("seq", since)))
            if not reply.get("more") or not events:
                return

    async def _seen(self, payload: Any) -> None:
        seq = payload.get("seq") if isinstance(payload, dict) else None
        if isinstance(seq, int):
            self.last_seq = max(self.last_seq, seq)

    async def _on_settled(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        await self._seen(payload)
        try:
            start, end = payload["time_delivery"]
            # Decoded as the controller's `upstream.fills` is: the same bounds, whoever sends it.
            fill = decode(fill_of(self.pid, payload), UpstreamFillMsg)
            async with self._lock:
                reply = await self.community.upstream_fills(UpstreamFillsMsg((int(start), int(end)), [fill]))
            self.settled += int(reply.get("settled", 0))
        except Exception as err:  # a fill that cannot be settled here is reported, not lost silently
            self._error(f"settled {payload.get('commit_id')}: {err!r}")
